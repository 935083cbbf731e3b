"""Helpers for `examples/train.py`: KL annealing, learning-rate schedules, a deferred device read-back, a compiled
training forward (`--torch_compile`),
`--config_overrides` parsing, a weights checksum, markdown helpers for the model card, and the 🤗 Trainer route
(`DiorTrainer` + `KLAnnealingCallback`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Seq2SeqTrainer, TrainerCallback

from .utils_dior import compiled_training_problem
from .generation_dior import length_bucket

# ---------------------------------------------------------------------------------------------------------------
# KL annealing
# ---------------------------------------------------------------------------------------------------------------

KL_ANNEALING_SCHEDULES = ("linear", "cyclical", "none")
#: β of the "off" phase of the authors' cyclical schedule (`train.py:train`, `--cycle_annealing`).
CYCLICAL_MIN_BETA = 1e-5
#: The paper's linear schedule: β from 0 to 1 over 20k steps.
PAPER_KL_ANNEALING_STEPS = 20_000


def kl_weight(step: int, schedule: str, annealing_steps: int | None = None, steps_per_epoch: int | None = None) -> float:
    """β for the optimizer step `step` (0-based: the number of updates already done).

    - `"linear"` (the paper): β = min(1, step / annealing_steps), 20k steps when `annealing_steps` is None.
    - `"cyclical"` (the authors' code): cycles of two half-cycles of `annealing_steps` updates each (one epoch when
      None, which is the authors' per-epoch cycle): β = 1e-5 for the first half-cycle; in the second it rises
      linearly from 1e-5 and reaches 1 at its middle, then stays at 1.
    - `"none"`: β = 1.
    """
    if schedule == "none":
        return 1.0
    if schedule == "linear":
        total = PAPER_KL_ANNEALING_STEPS if annealing_steps is None else annealing_steps
        return 1.0 if total <= 0 else min(1.0, step / total)
    if schedule == "cyclical":
        half = annealing_steps if annealing_steps is not None else steps_per_epoch
        if not half or half <= 0:
            raise ValueError("cyclical KL annealing needs `annealing_steps` or `steps_per_epoch` >= 1")
        phase, position = divmod(step, half)
        if phase % 2 == 0:
            return CYCLICAL_MIN_BETA
        rise = max(1.0, half / 2)
        return min(1.0, CYCLICAL_MIN_BETA + (1.0 - CYCLICAL_MIN_BETA) * position / rise)
    raise ValueError(f"unknown KL annealing schedule {schedule!r}; choose from {KL_ANNEALING_SCHEDULES}")


# ---------------------------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------------------------

#: transformers' `SchedulerType` values (`inverse_sqrt` first: the paper's schedule).
LR_SCHEDULES = ("inverse_sqrt", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                "constant_with_warmup", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                "warmup_stable_decay", "greedy")


def create_lr_scheduler(name: str, optimizer, num_warmup_steps: int, num_training_steps: int, kwargs=None):
    """`transformers.get_scheduler(name, ...)`, stepped once per optimizer update (or, for the metric-driven ones,
    `reduce_lr_on_plateau` and `greedy`, once per validation with its loss: see `scheduler_needs_metric`).

    - `"inverse_sqrt"`: the paper's Noam schedule, normalised so the peak is the optimizer's lr: linear warmup to
      lr over `num_warmup_steps`, then lr·sqrt(warmup / step) (transformers' `inverse_sqrt` with timescale = warmup).
    - `"constant"` with warmup steps is `"constant_with_warmup"`.
    `kwargs` are transformers' `scheduler_specific_kwargs` (e.g. `{"min_lr_rate": 0.1}` for `cosine_with_min_lr`).
    """
    from transformers import SchedulerType, get_scheduler

    if name not in LR_SCHEDULES or name not in {s.value for s in SchedulerType}:
        raise ValueError(f"unknown lr schedule {name!r}; choose from {LR_SCHEDULES}")
    if name == "constant" and num_warmup_steps > 0:
        name = "constant_with_warmup"
    if name == "inverse_sqrt" and num_warmup_steps <= 0:
        raise ValueError("`inverse_sqrt` (Noam) needs --num_warmup_steps >= 1: its decay is sqrt(warmup / step)")
    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                         scheduler_specific_kwargs=kwargs or None)


def scheduler_needs_metric(scheduler) -> bool:
    """True for schedulers stepped with a validation metric (`step(metrics)`), not once per update."""
    import inspect

    return "metrics" in inspect.signature(scheduler.step).parameters


# ---------------------------------------------------------------------------------------------------------------
# Configuration overrides
# ---------------------------------------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _infer_value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    return text


def _cast_like(key: str, text: str, reference: Any) -> Any:
    if isinstance(reference, str):  # a string field takes the text as it is ("prior_type=none")
        return text
    if text.lower() in ("none", "null"):
        return None
    if isinstance(reference, bool):
        if text.lower() not in _TRUE | _FALSE:
            raise ValueError(f"--config_overrides: {key} expects a boolean (true/false), got {text!r}")
        return text.lower() in _TRUE
    if isinstance(reference, int):
        try:
            return int(text)
        except ValueError:
            try:  # "0.5" for a field whose default happens to be an int (e.g. dropout=0 written as float)
                return float(text)
            except ValueError:
                raise ValueError(f"--config_overrides: {key} expects a number, got {text!r}") from None
    if isinstance(reference, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--config_overrides: {key} expects a number, got {text!r}") from None
    return _infer_value(text)


def parse_config_overrides(overrides: str | None, config_class, current: Mapping[str, Any] | None = None) -> dict:
    """Parse `"d_model=256,encoder_layers=4,prior_type=gaussian"` into typed values.

    The type of each key comes from its current value in `current` (a loaded configuration's dict) or else from the
    default of the `config_class` dataclass field; keys that are neither raise `ValueError`, as in transformers'
    `update_from_string`. Fields whose default is None get int → float → bool → str inference.
    """
    if not overrides:
        return {}
    fields = {f.name: f for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}
    current = dict(current or {})
    parsed: dict[str, Any] = {}
    for item in overrides.split(","):
        if not item.strip():
            continue
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ValueError(f"--config_overrides: expected key=value, got {item!r}")
        if key in current:
            reference = current[key]
        elif key in fields:
            field = fields[key]
            reference = field.default if field.default is not dataclasses.MISSING else None
        elif hasattr(config_class, key) and not callable(getattr(config_class, key)):
            reference = getattr(config_class, key)
        else:
            raise ValueError(f"--config_overrides: {key!r} is not a field of {config_class.__name__}")
        parsed[key] = _cast_like(key, text, reference)
    return parsed


def complete_from_scratch_overrides(overrides: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Fill in the fields that must follow the ones given, for a model built from scratch.

    - `encoder_layers` and `decoder_layers` must be equal (one latent per layer): one given sets the other.
    - `d_model` given: attention heads default to d_model // 64 (BART's 768 / 12) and FFN sizes to 4·d_model,
      unless given too.
    Returns the completed dict and a list of human-readable notes about what was derived.
    """
    out, notes = dict(overrides), []
    for given, other in (("encoder_layers", "decoder_layers"), ("decoder_layers", "encoder_layers")):
        if given in out and other not in out:
            out[other] = out[given]
            notes.append(f"{other}={out[given]} (= {given})")
    if out.get("d_model"):
        d_model = out["d_model"]
        heads = max(1, d_model // 64)
        while d_model % heads:
            heads -= 1
        for key in ("encoder_attention_heads", "decoder_attention_heads"):
            if key not in out:
                out[key] = heads
                notes.append(f"{key}={heads} (d_model // 64)")
        for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
            if key not in out:
                out[key] = 4 * d_model
                notes.append(f"{key}={4 * d_model} (4 * d_model)")
    return out, notes


# ---------------------------------------------------------------------------------------------------------------
# Reading a per-update device value without draining the GPU queue
# ---------------------------------------------------------------------------------------------------------------


class DeferredReadback:
    """Reads a small per-update device tensor back one update late, so the host never waits for the GPU.

    `.item()` on a CUDA tensor waits for every kernel queued before it: in a host-bound training loop that empties the
    queue once per update, and the GPU then idles while the host launches the next forward. `push(value, tag)` instead
    copies `value` into pinned host memory without waiting and returns what the *previous* push held, by then long
    computed: `(tag, host_tensor)`, or None on the first push. `flush()` returns the latest push (it waits for it);
    call it wherever the latest value must be known, e.g. before saving weights. On other devices both read at once,
    so `push` returns its own value.
    """

    def __init__(self, device: torch.device):
        self.deferred = torch.device(device).type == "cuda"
        self._buffers: list[torch.Tensor] = []  # two pinned buffers, alternating: one written, one being read
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if self.deferred else []
        self._slot = 0
        self._pending: tuple[int, Any] | None = None  # (slot, tag) of the latest push

    def push(self, value: torch.Tensor, tag: Any) -> tuple[Any, torch.Tensor] | None:
        value = value.detach()
        if not self.deferred:
            return tag, value.cpu()
        if not self._buffers or self._buffers[0].shape != value.shape or self._buffers[0].dtype != value.dtype:
            self._buffers = [torch.empty(value.shape, dtype=value.dtype, pin_memory=True) for _ in range(2)]
        slot = self._slot
        self._buffers[slot].copy_(value, non_blocking=True)
        self._events[slot].record()
        previous, self._pending, self._slot = self._pending, (slot, tag), 1 - slot
        return self._read(previous)

    def flush(self) -> tuple[Any, torch.Tensor] | None:
        latest, self._pending = self._pending, None
        return self._read(latest)

    def _read(self, entry) -> tuple[Any, torch.Tensor] | None:
        if entry is None:
            return None
        slot, tag = entry
        self._events[slot].synchronize()
        return tag, self._buffers[slot].clone()


# ---------------------------------------------------------------------------------------------------------------
# A compiled training forward
# ---------------------------------------------------------------------------------------------------------------

#: `torch.compile` modes that replay the compiled kernels as CUDA graphs (inductor's cudagraph trees).
CUDAGRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


def uses_cuda_graphs(mode: str | None, backend: str = "inductor") -> bool:
    """Whether `torch.compile(mode=mode, backend=backend)` replays CUDA graphs (whose outputs the next call reuses)."""
    return backend == "inductor" and mode in CUDAGRAPH_COMPILE_MODES


class StaticShapeCollator:
    """A seq2seq collator whose batches have a few shapes, for a compiled training step that compiles once per shape
    and replays its CUDA graphs: `labels` padded to `target_length` (with -100) and `input_ids` / `attention_mask`
    (with `pad_token_id` / 0) to `source_length`, or, with `min_source_bucket`, to the batch's length bucket: the next
    power of two ≥ its longest context, at least `min_source_bucket`, at most `source_length` (with length-grouped
    batches the encoder then runs on about the real lengths, log2(source_length / min_source_bucket) + 1 shapes).
    Padding is masked, so it changes no loss; a batch longer than its static length is an error."""

    def __init__(self, collator, source_length: int, target_length: int, pad_token_id: int,
                 min_source_bucket: int | None = None):
        self.collator, self.source_length, self.target_length = collator, source_length, target_length
        self.pad_token_id, self.min_source_bucket = pad_token_id, min_source_bucket

    def __call__(self, features):
        batch = self.collator(features)
        source_length = self.source_length
        if self.min_source_bucket is not None:
            source_length = length_bucket(batch["input_ids"].shape[1], self.source_length, self.min_source_bucket)
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100}
        for key, value in fill.items():
            length = self.target_length if key == "labels" else source_length
            tensor = batch[key]
            if tensor.shape[1] > length:
                raise ValueError(f"a batch's {key} has {tensor.shape[1]} tokens, more than the static length {length}")
            batch[key] = torch.nn.functional.pad(tensor, (0, length - tensor.shape[1]), value=value)
        return batch


class CompiledTrainingForward:
    """`torch.compile` of a model's training forward (its backward is compiled with it), for a training loop that
    keeps the eager `model` for evaluation, generation and saving (same parameters, no recompilation for eval mode).

    Call it as the model, with a tensor `kl_weight` (a float would be a constant of the graph, recompiled at each new
    β): `forward(**batch, kl_weight=beta)`. With a CUDA-graph mode (`CUDAGRAPH_COMPILE_MODES`) each call first marks
    a new step for the cudagraph trees: the outputs of the previous call are then dead (their memory is reused by
    the replay), so a loop must use an update's outputs before its next forward — the loss, the logged terms and the
    deferred read-back all do. transformers installs its output-capturing hooks (Dior's encoder returns every
    layer's states) at the first forward, in a thread lock that dynamo cannot trace: the first call therefore runs
    the model eagerly once (RNG state restored) before the first compiled call, so that the graph has no break there.
    """

    def __init__(self, model: torch.nn.Module, mode: str | None = "reduce-overhead", backend: str = "inductor",
                 dynamic: bool | None = None):
        problem = compiled_training_problem()
        if problem:
            raise RuntimeError(problem)
        self.model = model
        self.uses_cuda_graphs = uses_cuda_graphs(mode, backend)
        # dynamic=False: one static compile per shape (train.py pads to one shape; benchmarks). None: the first shape
        # static, a second recompiles dynamic. True: one compile for every shape. With CUDA graphs, each new shape
        # records a graph.
        if backend == "inductor" and dynamic is not False:
            # torch 2.11's inductor asserts in its memory-coalescing analysis on this model with dynamic sizes
            # (tiling_utils.get_pw_red_splits; seen on the H200), an analysis its config says does not yet apply to
            # dynamic shapes: compile without it. The mode's own options (e.g. CUDA graphs) are kept, passed as
            # options, since torch.compile takes a mode or options, not both.
            from torch._inductor import list_mode_options

            options = (list_mode_options(mode, dynamic) if mode else {}) | {"triton.coalesce_tiling_analysis": False}
            self.compiled = torch.compile(model, backend=backend, options=options, dynamic=dynamic)
        else:
            self.compiled = torch.compile(model, backend=backend, mode=mode, dynamic=dynamic)
        self._hooks_installed = False

    def __call__(self, **inputs):
        if not self._hooks_installed:
            device = next(self.model.parameters()).device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                self.model(**inputs)
            self._hooks_installed = True
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(**inputs)


# ---------------------------------------------------------------------------------------------------------------
# Weights checksum (DDP consistency checks)
# ---------------------------------------------------------------------------------------------------------------


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (sorted by name, raw bytes): equal iff the weights are bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Markdown helpers (the model card's tables)
# ---------------------------------------------------------------------------------------------------------------

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# The 🤗 Trainer route: Seq2SeqTrainer + KL annealing
# ---------------------------------------------------------------------------------------------------------------

class KLAnnealingCallback(TrainerCallback):
    """Sets `beta` = `kl_weight(global_step, schedule, annealing_steps, steps_per_epoch)` at the start of every
    optimizer step (`steps_per_epoch` defaults to the Trainer's: max_steps / num_train_epochs). `DiorTrainer`
    passes `beta` to the model's forward as `kl_weight=` and logs it as `beta`."""

    def __init__(self, schedule: str = "linear", annealing_steps: int | None = None,
                 steps_per_epoch: int | None = None):
        kl_weight(0, schedule, annealing_steps, steps_per_epoch or 1)  # rejects an unknown schedule now
        self.schedule, self.annealing_steps, self.steps_per_epoch = schedule, annealing_steps, steps_per_epoch
        self.beta = kl_weight(0, schedule, annealing_steps, steps_per_epoch or 1)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.steps_per_epoch is None and state.num_train_epochs:
            self.steps_per_epoch = max(1, -(-state.max_steps // state.num_train_epochs))

    def on_step_begin(self, args, state, control, **kwargs):
        self.beta = kl_weight(state.global_step, self.schedule, self.annealing_steps, self.steps_per_epoch)


class DiorTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` for Dior-CVAE: training losses use β from `kl_annealing` (a `KLAnnealingCallback`, added to
    the callbacks), evaluation losses use β = 1 (the ELBO), and the logs get `beta`.

    β reaches the model as the `kl_weight=` argument of its forward, so nothing is stored on the model. The model's
    loss is already a per-example mean, so the Trainer's own `num_items_in_batch` normalisation is switched off
    (it would otherwise skip dividing by the gradient-accumulation steps)."""

    def __init__(self, *args, kl_annealing: KLAnnealingCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_annealing = kl_annealing or KLAnnealingCallback()
        self.add_callback(self.kl_annealing)
        self.model_accepts_loss_kwargs = False
        self._beta: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        beta = self.kl_annealing.beta if model.training else 1.0
        device = inputs["input_ids"].device
        if self._beta is None or self._beta.device != device:
            self._beta = torch.zeros((), device=device)
        # β as a 0-d device tensor, refilled in place: under `torch_compile=True` a float would be a constant of the
        # graph (a recompile at every new β of the annealing), and a new tensor from the host a copy each step
        outputs = model(**inputs, kl_weight=self._beta.fill_(beta))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log: the β of the latest update
            logs["beta"] = self.kl_annealing.beta
        super().log(logs, *args, **kwargs)


__all__ = [
    "KL_ANNEALING_SCHEDULES",
    "LR_SCHEDULES",
    "kl_weight",
    "create_lr_scheduler",
    "scheduler_needs_metric",
    "parse_config_overrides",
    "complete_from_scratch_overrides",
    "KLAnnealingCallback",
    "DiorTrainer",
    "weights_checksum",
    "CompiledTrainingForward",
    "CUDAGRAPH_COMPILE_MODES",
    "uses_cuda_graphs",
    "DeferredReadback",
    "markdown_table",
    "format_duration",
]
