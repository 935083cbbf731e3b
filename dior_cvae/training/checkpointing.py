"""Saving a training run safely: atomic folders, checkpoints with a manifest (each file's size and sha256) and the
run id, finding the checkpoint to resume from, pruning old ones, and the output folder's run id.

A folder is written under a hidden temporary name and renamed into place, so a kill leaves the previous folder or
the new one, never half of one. Non-finite weights are never saved. Everything here runs on every process of an
accelerate run and writes from the main process only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path

import torch

from .compiled import DeferredReadback

logger = logging.getLogger(__name__)

#: The keys a checkpoint's trainer_state.json must have to be resumed from.
TRAINER_STATE_KEYS = ("completed_steps", "epoch", "batches_in_epoch", "lr_scheduler", "files")


class TrainingError(SystemExit):
    """A run that cannot go on (a non-finite update, a broken checkpoint, a refused folder): exits with the message,
    without a traceback, as `train.py: error: ...`."""

    def __init__(self, message: str):
        super().__init__(f"train.py: error: {message}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and `os.replace`: a kill leaves the old or the new file, not half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def assert_finite_weights(model, where: str) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) when saving "
                            f"{where}: not saved")


@contextlib.contextmanager
def atomic_folder(accelerator, folder: Path, merge: bool = False):
    """Yield a hidden temporary folder to fill (by every process); then the main process renames it to `folder`
    (`merge=True`: moves its files into an existing `folder`, one `os.replace` each). A kill at any point leaves
    the previous `folder` or the new one, plus temporary folders that the next save removes."""
    folder = folder.resolve()  # "." has no name
    tmp = folder / ".model.tmp" if merge else folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    yield tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if merge:
            folder.mkdir(parents=True, exist_ok=True)
            for item in sorted(tmp.rglob("*"), key=lambda q: len(q.parts)):  # folders before their files
                target = folder / item.relative_to(tmp)
                if item.is_dir():
                    target.mkdir(exist_ok=True)
                else:
                    os.replace(item, target)
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_model_folder(accelerator, model, tokenizer, folder: Path, merge: bool = False) -> None:
    """save_pretrained (safetensors + remote code) and the tokenizer, written atomically by the main process."""
    assert_finite_weights(accelerator.unwrap_model(model), str(folder))
    with atomic_folder(accelerator, folder, merge) as tmp:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(accelerator, model, tokenizer, folder: Path, trainer_state: dict) -> None:
    """accelerate state (exact resume: weights, optimizer, RNG) + a loadable `pretrained/` folder, then
    trainer_state.json (written last; the lr schedule, the run id, and each file's size and sha256)."""
    assert_finite_weights(accelerator.unwrap_model(model), str(folder))
    with atomic_folder(accelerator, folder) as tmp:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(tmp / "pretrained")
            tokenizer.save_pretrained(tmp / "pretrained")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {q.relative_to(tmp).as_posix(): {"size": q.stat().st_size, "sha256": sha256(q)}
                     for q in sorted(tmp.rglob("*")) if q.is_file()}
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "files": files}, indent=2))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (naming the file), or None when it is intact."""
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"{state_file} is missing (not a checkpoint of this script, or an interrupted save)"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{state_file} is not valid JSON ({exc})"
    missing = [k for k in TRAINER_STATE_KEYS if k not in state]
    if missing:
        return f"{state_file} lacks {', '.join(missing)} (written by an older train.py? it is not loaded)"
    for name, expected in state["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} is truncated or changed ({path.stat().st_size} bytes, {expected['size']} expected)"
        if sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in {state_file} (changed or mixed with another save)"
    return None


def checkpoint_states(output_dir: Path, run_id: str | None) -> list[tuple[float, Path, dict | None]]:
    """(completed_steps, folder, trainer state) of the step_N / epoch_N folders in `output_dir`, newest first: the
    run `run_id`'s (every run's for None) and those whose state is unreadable (their step and run are unknown:
    listed first, as inf)."""
    found = []
    for folder in output_dir.glob("*_*"):
        if not (folder.is_dir() and re.fullmatch(r"(step|epoch)_\d+", folder.name)):
            continue
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and run_id is not None and state.get("run_id") != run_id:
            continue  # another run's, kept from before --overwrite_output_dir
        steps = state.get("completed_steps") if isinstance(state, dict) else None
        found.append((steps if isinstance(steps, int) else math.inf, folder, state))
    return sorted(found, key=lambda x: x[0], reverse=True)


def find_checkpoint(resume_from_checkpoint: str, output_dir: Path, run_id: str | None) -> Path | None:
    """The checkpoint to resume from: the folder given (it must be intact), or with "latest" the newest intact one of
    the run `run_id` in `output_dir` (the run that last wrote to it), warning about each broken one skipped."""
    if resume_from_checkpoint != "latest":
        folder = Path(resume_from_checkpoint)
        problem = checkpoint_problem(folder)
        if problem:
            raise TrainingError(f"--resume_from_checkpoint {folder}: {problem}")
        return folder
    for _, folder, _ in checkpoint_states(Path(output_dir), run_id):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning(f"--resume_from_checkpoint latest: skipping {folder}: {problem}")
    return None


def prune_checkpoints(output_dir: Path, run_id: str, limit: int | None) -> None:
    """--checkpoints_total_limit: delete this run's oldest checkpoints beyond `limit` (never another run's)."""
    if limit is None:
        return
    ours = [folder for steps, folder, state in checkpoint_states(output_dir, run_id) if steps < math.inf]
    for folder in ours[limit:]:
        logger.info(f"--checkpoints_total_limit {limit}: deleting {folder}")
        shutil.rmtree(folder)


def load_checkpoint(accelerator, lr_scheduler, folder: Path) -> dict:
    """Restore the accelerate state (safetensors + torch.load(weights_only=True)) and the lr schedule of `folder`;
    return its trainer state (completed_steps, epoch, batches_in_epoch, the best model's step and metric, ...)."""
    saved = json.loads((folder / "trainer_state.json").read_text())
    try:
        accelerator.load_state(str(folder))
        lr_scheduler.load_state_dict(saved.pop("lr_scheduler"))
    except Exception as exc:
        raise TrainingError(f"cannot resume from {folder}: {type(exc).__name__}: {exc}") from None
    return saved


def read_run_id(output_dir: Path) -> str | None:
    try:
        return json.loads((Path(output_dir) / "run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_output_dir(accelerator, output_dir: Path, resume_from_checkpoint: str | None,
                       overwrite_output_dir: bool) -> tuple[str, Path | None]:
    """Refuse a non-empty `output_dir` unless resuming or `overwrite_output_dir` (nothing is ever deleted); find the
    checkpoint to resume from; return this run's id (a resumed run keeps its checkpoint's), kept in run.json."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file, not a folder")
    if output_dir.is_dir() and not (resume_from_checkpoint or overwrite_output_dir):
        entries = sorted(q.name for q in output_dir.iterdir() if q.name != "run.json")  # a run that failed early
        if entries:
            raise TrainingError(
                f"--output_dir {output_dir} is not empty ({len(entries)} entries: "
                f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}): pass --resume_from_checkpoint to "
                "continue a run, --overwrite_output_dir to write into it anyway (replacing this script's outputs, "
                "deleting nothing), or choose another folder")
    resume_dir = (find_checkpoint(resume_from_checkpoint, output_dir, read_run_id(output_dir))
                  if resume_from_checkpoint else None)
    if resume_from_checkpoint == "latest" and resume_dir is None:
        logger.warning(f"--resume_from_checkpoint latest: no intact checkpoint in {output_dir}, starting from scratch")
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        run_id = json.loads((resume_dir / "trainer_state.json").read_text()).get("run_id") if resume_dir else None
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "run.json", json.dumps({"run_id": run_id or uuid.uuid4().hex}))
    accelerator.wait_for_everyone()
    return read_run_id(output_dir), resume_dir


def trim_log_history(log_file: Path, completed_steps: int | None) -> None:
    """Start log_history.jsonl afresh (`completed_steps` None) or, on resume, keep only the rows up to the
    checkpoint's step: the updates after it are replayed and logged again."""
    kept = []
    for line in (log_file.read_text().splitlines() if completed_steps is not None and log_file.is_file() else []):
        with contextlib.suppress(ValueError):  # a line cut by a kill
            if json.loads(line)["step"] <= completed_steps:
                kept.append(line + "\n")
    write_text_atomic(log_file, "".join(kept))


class NonFiniteGuard:
    """Stops a run at its first non-finite update, before anything from it on is saved. `push` each update's flag
    (its count of non-finite losses and gradient norms, reduced over the ranks, so that every rank stops at the same
    update) and loss; on CUDA the flag is read one update late (`DeferredReadback`: no host stall), so call `flush()`
    before anything is saved."""

    def __init__(self, device):
        self.readback = DeferredReadback(device)

    def push(self, flag: torch.Tensor, loss: torch.Tensor, step: int, epoch: int, batch_index: int) -> None:
        self._check(self.readback.push(torch.stack([flag, loss.detach().float()]), (step, epoch, batch_index)))

    def flush(self) -> None:
        self._check(self.readback.flush())

    @staticmethod
    def _check(readback) -> None:
        if readback is None:
            return
        (step, epoch, batch_index), (flag, loss) = readback[0], readback[1].tolist()
        if flag > 0:
            raise TrainingError(
                f"non-finite loss or gradient (loss {loss}) at update step {step} (epoch {epoch}, batch {batch_index}): "
                "stopping; no checkpoint or model from this update on is saved. Try a lower --learning_rate, "
                "--max_grad_norm, or --mixed_precision no.")
