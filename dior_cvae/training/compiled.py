"""The training step on an accelerator without host stalls: a deferred read-back of per-update values, a collator
of a few static batch shapes, and the compiled training forward (`--torch_compile`)."""

from __future__ import annotations

from typing import Any

import torch

from ..utils_dior import compiled_training_problem
from ..generation_dior import length_bucket


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
        # dynamic=False: one static compile per shape (train.py pads to a few shapes). None: the first shape static,
        # a second recompiles dynamic. True: one compile for every shape. With CUDA graphs, each new shape records a
        # graph.
        if backend == "inductor" and dynamic is not False:
            # inductor's memory-coalescing analysis can assert on this model with dynamic sizes
            # (tiling_utils.get_pw_red_splits), and its config says it does not yet apply to dynamic shapes: compile
            # without it (docs/performance.md). The mode's own options (e.g. CUDA graphs) are kept, passed as
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
