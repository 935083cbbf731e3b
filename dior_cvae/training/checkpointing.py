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
from .outputs import LOCK, MANIFEST, STAGING, OutputFolder, sha256, write_atomic

logger = logging.getLogger(__name__)

#: The keys a checkpoint's trainer_state.json must have to be resumed from.
TRAINER_STATE_KEYS = ("completed_steps", "epoch", "batches_in_epoch", "lr_scheduler", "files")


class TrainingError(SystemExit):
    """A run that cannot go on (a non-finite update, a broken checkpoint, a refused folder): exits with the message,
    without a traceback, as `train.py: error: ...`."""

    def __init__(self, message: str):
        super().__init__(f"train.py: error: {message}")


PROG = "train.py"
# what a run writes at the top of --output_dir besides the final model's files and its step_N / epoch_N folders
RUN_OUTPUTS = ("run.json", "training_args.json", "log_history.jsonl", "eval_results.json", "README.md",
               "training_curves.png", "best", "runs", ".dior-tokenizer.tmp", STAGING)
# the final model's files (save_pretrained + the tokenizer); the shipped *.py modules are matched by suffix
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")


def assert_finite_weights(model, where: str) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) when saving "
                            f"{where}: not saved")


@contextlib.contextmanager
def atomic_folder(accelerator, folder: Path, merge: bool = False):
    """Yield a hidden temporary folder to fill (by every process); then the main process renames it to `folder`
    (`merge=True`: a journalled move of its files into the existing `folder`, `OutputFolder.commit_staged`). A
    kill leaves the previous `folder` or the new one (a merge killed after its COMMIT is completed by the next run
    on the folder, and generate.py refuses the folder until then). A write error (a full disk) removes the
    temporary folder and stops with the folder's name."""
    folder = folder.resolve()  # "." has no name
    tmp = folder / STAGING if merge else folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    if accelerator.is_main_process:
        if not merge:
            OutputFolder(folder.parent, PROG).claim(folder.name)  # a run's checkpoint / best/, or refused
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        yield tmp
    except (OSError, RuntimeError) as exc:  # torch's writer says "basic_ios::clear" on a full disk
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"cannot write {folder}: {type(exc).__name__}: {exc} (is the disk full? free space "
                            "where --output_dir is, then resume)") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if merge:
            OutputFolder(folder, PROG).commit_staged(tmp)
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
        OutputFolder(output_dir, PROG).remove(folder.name)  # recorded as a run's, or refused


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


def _run_entries(output_dir: Path) -> list[str]:
    """The entries of --output_dir that a run may write: RUN_OUTPUTS, the final model's files, *.py, checkpoints."""
    if not output_dir.is_dir():
        return []
    names = set(RUN_OUTPUTS) | set(MODEL_FILES)
    return sorted(q.name for q in output_dir.iterdir() if q.name in names or q.suffix == ".py"
                  or re.fullmatch(r"(step|epoch)_\d+", q.name))


def _adopt_intact_checkpoints(folder: OutputFolder) -> None:
    """Record step_N / epoch_N folders that are intact checkpoints (their trainer_state.json lists each file's
    sha256: train.py wrote them, e.g. copied here to resume from) as a run's."""
    record = folder.manifest()
    for name in _run_entries(folder.folder):
        if (re.fullmatch(r"(step|epoch)_\d+", name) and name not in record
                and checkpoint_problem(folder.folder / name) is None):
            record[name] = None


def prepare_output_dir(accelerator, output_dir: Path, resume_from_checkpoint: str | None,
                       overwrite_output_dir: bool) -> tuple[str, Path | None]:
    """The output-folder policy (outputs.py): refuse a folder in use by another run (naming its pid), a non-empty
    folder without `resume_from_checkpoint` (an intact checkpoint of its run) or `overwrite_output_dir`, and any
    entry in the way that no run of this script wrote or that was changed since; then lock the folder for this
    run's lifetime, complete a final save that a kill interrupted, and record what this run writes. Returns this
    run's id (a resumed run keeps its checkpoint's, kept in run.json) and the checkpoint to resume from."""
    output_dir = Path(output_dir)
    folder = OutputFolder(output_dir, PROG)
    if output_dir.exists() and not output_dir.is_dir():
        raise TrainingError(f"--output_dir {output_dir} is a file, not a folder")
    if accelerator.is_main_process:
        folder.refuse_if_locked()
        if (output_dir / LOCK).exists() and (output_dir / MANIFEST).exists():  # a run's folder: lock, then look
            folder.lock()
            if folder.complete_interrupted_save():
                logger.warning(f"{output_dir}: completed the final save of a run that was killed during it")
    resume_dir = (find_checkpoint(resume_from_checkpoint, output_dir, read_run_id(output_dir))
                  if resume_from_checkpoint else None)
    if output_dir.is_dir() and resume_dir is None and not overwrite_output_dir:
        entries = sorted(q.name for q in output_dir.iterdir() if q.name not in ("run.json", MANIFEST, LOCK))
        if entries:
            latest = (f"has no intact checkpoint of its run to resume (--resume_from_checkpoint "
                      f"{resume_from_checkpoint}) and " if resume_from_checkpoint else "")
            raise TrainingError(
                f"--output_dir {output_dir} {latest}is not empty ({len(entries)} entries: "
                f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}): pass --resume_from_checkpoint to "
                "continue a run, --overwrite_output_dir to write into it anyway (replacing only what earlier runs of "
                "this script wrote there, deleting nothing else), or choose another folder")
    if accelerator.is_main_process:
        _adopt_intact_checkpoints(folder)
        folder.check_replaceable(_run_entries(output_dir))
    if resume_from_checkpoint == "latest" and resume_dir is None:
        logger.warning(f"--resume_from_checkpoint latest: no intact checkpoint in {output_dir}, starting from scratch")
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        folder.lock()  # held until the process ends
        folder.check_replaceable(_run_entries(output_dir))  # again, under the lock
        for name in RUN_OUTPUTS:
            folder.claim(name)
        run_id = json.loads((resume_dir / "trainer_state.json").read_text()).get("run_id") if resume_dir else None
        write_atomic(output_dir / "run.json", json.dumps({"run_id": run_id or uuid.uuid4().hex}))
    accelerator.wait_for_everyone()
    return read_run_id(output_dir), resume_dir


def seal_output_dir(output_dir: Path) -> None:
    """The end of a run: record each of its files' sha256, so that a file changed by hand later is the user's."""
    OutputFolder(output_dir, PROG).seal()


def trim_log_history(log_file: Path, completed_steps: int | None) -> None:
    """Start log_history.jsonl afresh (`completed_steps` None) or, on resume, keep only the rows up to the
    checkpoint's step: the updates after it are replayed and logged again."""
    kept = []
    for line in (log_file.read_text().splitlines() if completed_steps is not None and log_file.is_file() else []):
        with contextlib.suppress(ValueError):  # a line cut by a kill
            if json.loads(line)["step"] <= completed_steps:
                kept.append(line + "\n")
    write_atomic(log_file, "".join(kept))


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


# config fields that say nothing about what was trained
UNCHECKED_CONFIG_FIELDS = {"transformers_version", "_name_or_path", "architectures", "auto_map", "custom_pipelines",
                           "dtype", "torch_dtype", "use_cache", "output_hidden_states", "output_attentions",
                           "return_dict"}
BATCH_FLAGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "group_by_length", "pad_to_multiple_of",
               "seed", "torch_compile")
SCHEDULE_FLAGS = ("lr_scheduler_type", "lr_scheduler_kwargs", "learning_rate", "num_warmup_steps", "max_train_steps",
                  "kl_annealing", "kl_annealing_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                  "max_grad_norm")


def run_record(args, num_processes: int, train_encoded, config) -> dict:
    """What a checkpoint must be resumed with: the training data (a fingerprint of its token ids), the model
    config, the batches and the schedules. Kept in trainer_state.json ("record") and compared on resume."""
    if hasattr(train_encoded, "_fingerprint"):  # a datasets.Dataset
        fingerprint = train_encoded._fingerprint
    else:
        digest = hashlib.sha256()
        for example in train_encoded:
            digest.update(json.dumps([example["input_ids"], example["labels"]]).encode())
        fingerprint = digest.hexdigest()
    batch = {"num_processes": num_processes, **{name: getattr(args, name) for name in BATCH_FLAGS}}
    schedule = {name: getattr(args, name) for name in SCHEDULE_FLAGS}
    model_config = {k: v for k, v in config.to_dict().items() if k not in UNCHECKED_CONFIG_FIELDS}
    return json.loads(json.dumps({"data": fingerprint, "config": model_config, "batch": batch, "schedule": schedule},
                                 default=str))


def check_resume_record(resume_dir: Path, saved: dict | None, current: dict, ignore: bool) -> None:
    """Refuse to resume where the data, config, batches or schedules differ from the checkpoint's record (each
    difference named), unless `ignore` (--ignore_resume_mismatch: then each is a warning)."""
    if saved is None:
        logger.warning(f"{resume_dir}: no record of its data, config and schedule (an older train.py): not checked")
        return
    differences = []
    if saved.get("data") != current["data"]:
        differences.append("the training data (--dataset_name / --dataset_dir / --train_file, --max_train_samples, "
                           "--max_source_length, --max_target_length or the tokenizer) is not the checkpoint's")
    for key in sorted(set(saved.get("config", {})) | set(current["config"])):
        old, new = saved.get("config", {}).get(key), current["config"].get(key)
        if old != new:
            differences.append(f"config field {key} (--{key} / --config_name / --model_name_or_path): {old!r} in "
                               f"the checkpoint, {new!r} now")
    for group in ("batch", "schedule"):
        for key, new in current[group].items():
            old = saved.get(group, {}).get(key)
            if old != new:
                where = "processes" if key == "num_processes" else f"--{key}"
                differences.append(f"{where}: {old!r} in the checkpoint, {new!r} now")
    if differences and not ignore:
        raise TrainingError(f"--resume_from_checkpoint {resume_dir}: this run differs from the checkpoint's: "
                            + "; ".join(differences) + ". Resume with the checkpoint's settings, or pass "
                            "--ignore_resume_mismatch to resume anyway")
    for difference in differences:
        logger.warning(f"--ignore_resume_mismatch: resuming although {difference}")
