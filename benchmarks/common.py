"""What the benchmark and the probes share: the models, the token batches, timing, op counting, JSON and tables.

Scripts import it as `import common` (benchmarks/ is on their path); it puts the repository on `sys.path`, so that
every script runs from a checkout without installing.
"""

import collections
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import BartConfig, BartForConditionalGeneration  # noqa: E402

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration  # noqa: E402

# facebook/bart-base: 6+6 layers, d_model 768, 12 heads, FFN 3072, its vocabulary and dropouts
BART_BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)
DROPOUTS = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def build_model(name, shape, seed=0, device="cpu", dtype=torch.float32, **dior_kwargs):
    """A randomly initialised `"bart"` or `"dior"` of `shape` (BartConfig fields; bart-base's dropouts unless the
    shape sets them), SDPA attention, in eval mode. `dior_kwargs` go to the Dior config only."""
    config = dict(DROPOUTS, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        if name == "bart":
            model = BartForConditionalGeneration(BartConfig(**config))
        elif name == "dior":
            model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**config, **dior_kwargs))
        else:
            raise ValueError(f"build_model: name must be 'bart' or 'dior', got {name!r}")
    model.to(dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


def build_models(shape, seed=0, device="cpu", dtype=torch.float32, **dior_kwargs):
    """BART and Dior-CVAE of the same shape from the same seed: `(bart, dior)`."""
    return (build_model("bart", shape, seed, device, dtype),
            build_model("dior", shape, seed, device, dtype, **dior_kwargs))


def token_batch(batch, context, response, vocab_size, seed=0, device="cpu", padded=False):
    """Random tokens, the same for every model: `input_ids` (`<s> … </s>`, `context` tokens), `attention_mask`,
    `labels` (`<s> r </s>`, `response` tokens). With `padded`, the first half of the rows keep only the first half
    of their context (pad id 1, mask 0) and of their labels (-100), as real batches have padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab_size, (batch, context), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 0, 2
    labels = torch.randint(4, vocab_size, (batch, response), generator=g)
    labels[:, 0], labels[:, -1] = 0, 2
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[: batch // 2, context // 2:] = 0
        input_ids = input_ids.masked_fill(attention_mask == 0, 1)
        labels[: batch // 2, response // 2:] = -100
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "labels": labels.to(device)}


class Timer:
    """Median wall time of calls, the device synchronised around each. `clock` is the time source (a test
    passes a fake one); `first_s` is the first warm-up call's time (on a compiled path: the compile)."""

    def __init__(self, device, clock=time.perf_counter):
        self.device = torch.device(device)
        self.clock = clock
        self.first_s = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, fn):
        self.sync()
        start = self.clock()
        fn()
        self.sync()
        return self.clock() - start

    def median(self, fn, warmup, iters):
        warm = [self.call(fn) for _ in range(warmup)]
        self.first_s = warm[0] if warm else None
        return statistics.median(self.call(fn) for _ in range(iters))

    def reset_peak(self):
        """Start a phase's peak-memory count (CUDA only: on the CPU no peak is reported)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self):
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)


# ops that only make a new view of existing storage, or only read metadata: no kernel on a GPU
VIEW_OPS = {
    "view", "_unsafe_view", "reshape", "alias", "as_strided", "select", "slice", "t", "transpose", "permute",
    "expand", "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "unbind", "detach", "narrow",
    "lift_fresh", "_reshape_alias", "unflatten", "flatten", "diagonal", "view_as", "expand_as", "numpy_T",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "dim",
    "_has_compatible_shallow_copy_type", "empty_like_meta", "is_nonzero", "_local_scalar_dense",
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops the dispatcher runs: `counts` those that launch work (the CUDA-launch proxy on the CPU),
    `view_counts` the VIEW_OPS apart (no kernel, but host time)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self.view_counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        (self.view_counts if name in VIEW_OPS else self.counts)[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.counts.values())


def write_json(result, path):
    """`result` as indented JSON at `path` (parents created); nothing when `path` is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, default=str) + "\n")


def fmt(value, digits=1):
    """A table cell: `-` for a missing value, floats with thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def format_table(rows):
    """Rows of cells (the first row the header) as aligned text: the first column left-aligned, the others right,
    a rule under the header."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
