"""Speed of Dior-CVAE against plain BART of the same shape, in one run on one device.

    python benchmarks/bench.py --fast                    # GPU: bart-base shapes, bf16, ~3–5 minutes (compiles)
    python benchmarks/bench.py --tiny --output tmp.json  # CPU smoke run (CI / tests); its numbers mean nothing
    python benchmarks/bench.py --train-only --compile-train reduce-overhead   # GPU: training, eager and compiled

Both models are randomly initialised with the bart-base shape (6+6 layers, d_model 768, 12 heads, FFN 3072,
vocabulary 50,265; dropouts 0.1 as in facebook/bart-base), SDPA attention, and see the same random token batches:
contexts of 96 tokens (no padding), responses `<s> r </s>` of 20 tokens.

* training step = forward + backward + AdamW step on **bf16 weights** (no autocast; AdamW fused on CUDA), both
  models alike; examples/s. What bounds it: the FLOPs of one forward + backward (`train_gflop_*`,
  torch.utils.flop_counter; `train_flop_ratio_bs*` = BART's / Dior's, the ratio a step bound by its matmuls would
  have; the forward's by module) and, on CUDA, the GPU kernel time of 3 more steps under torch.profiler
  (`train_kernel_ms_*`; `train_gpu_busy_*` = kernel time / step time: ≈ 1 device-bound, ≪ 1 host-bound).
* generation = the public `generate()` with sampling (do_sample, top_k=50, top_p=0.9) of exactly 40 new tokens
  (`min_new_tokens = max_new_tokens = 40`), batch 1, 64, 256; tokens/s = batch·40 / wall time of the whole call
  (for Dior that includes encoding and the 20-step prior sample).
  Dior's default `generate()` on CUDA replays one CUDA graph per token (dior_cvae/generation_dior.py); the same
  calls through transformers' own loop (`disable_compile=True`: the dynamic cache, eager) are
  `gen_tokens_per_s_dior_hfloop_bs*`, and `same_tokens_bs{1,64}` is the fraction of rows whose default tokens
  equal those of transformers' loop under the same seed and given latents.
* prior = `model.sample_latents(context_vectors)` at batch 1 (on CUDA one CUDA graph for the noise-free solvers):
  the default sampler and steps (DPM-Solver++, 20 steps), and a sweep of steps (5, 10, 20) for each sampler
  (dpmsolver++, ddim, ddpm); `prior_share` = prior ms / batch-1 `generate()` ms, for the default path
  (`prior_share_default`) and the static-cache path (`prior_share_static`).
* `--fast` adds `generate(cache_implementation="static")` for both models (`--no-compile` passes
  `disable_compile=True`): for BART transformers torch.compiles the decoding step on CUDA
  (`GenerationConfig.compile_config`), for Dior it is the default path's captured step; at batch 1, 64, 256, with
  ratios to eager BART and to static BART. Compiling is slow: a static run that does not fit in what is left of `--budget-s` is
  skipped and recorded as "skipped: time budget" in `errors`. `bs1_tokens_per_s` is the best Dior batch-1 figure
  through `generate()`; `bs1_path` says which path ("default" or "static").

Each figure is the median of several timed calls after warm-up calls, with the device synchronised around each.
Peak memory is `torch.cuda.max_memory_allocated` per phase (reset before each). Everything lands in `--output`
(JSON), a table is printed last, and `--plot` draws the ratios against their goals.
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import transformers  # noqa: E402
from transformers import BartConfig, BartForConditionalGeneration  # noqa: E402

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration  # noqa: E402
from dior_cvae.scheduling_dior import SAMPLERS  # noqa: E402
from dior_cvae.training_utils import CompiledTrainingForward  # noqa: E402

GOALS = {  # the speed issue's goals (ratios to BART of the same shape, same run)
    "train_ratio_bs64": (">=", 0.85),
    "train_ratio_bs256": (">=", 0.90),
    "gen_ratio_bs64": (">=", 0.95),
    "gen_ratio_bs256": (">=", 1.0),
    "bs1_tokens_per_s": (">=", 1000.0),
    "prior_share": ("<=", 0.05),
}
PRIOR_STEPS = (5, 10, 20)  # each noise-free solver and step count compiles its own graph on CUDA
SKIPPED = "skipped: time budget"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

FULL = dict(
    shape=dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
               decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024),
    context=96, response=20, new_tokens=40, train_batches=(64, 256), gen_batches=(1, 64, 256),
    warmup=3, iters=10, gen_warmup=2, gen_iters=5,
)
TINY = dict(
    shape=dict(vocab_size=1000, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128),
    dior=dict(latent_size=8, denoiser_hidden_size=32),
    context=96, response=20, new_tokens=40, train_batches=(64, 256), gen_batches=(1, 64, 256),
    warmup=1, iters=2, gen_warmup=1, gen_iters=2,
)
DROPOUTS = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)  # facebook/bart-base


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class Timer:
    def __init__(self, device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def median(self, fn, warmup, iters):
        self.first_s = None
        for i in range(warmup):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            if i == 0:
                self.first_s = time.perf_counter() - start  # on the static path on CUDA: includes the compile
        times = []
        for _ in range(iters):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def reset_peak(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self):
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)


def build_models(spec, device, dtype, seed):
    common = dict(spec["shape"], **DROPOUTS)
    torch.manual_seed(seed)
    with torch.device(device):
        bart = BartForConditionalGeneration(BartConfig(**common))
    torch.manual_seed(seed)
    with torch.device(device):
        dior = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**common, **spec.get("dior", {})))
    for model in (bart, dior):
        model.to(dtype)
        model.set_attn_implementation("sdpa")
        model.eval()
    return bart, dior


def token_batch(batch, spec, device, seed):
    """The same random tokens for both models: a full 96-token context and a 20-token `<s> r </s>` response."""
    vocab = spec["shape"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(4, vocab, (batch, spec["context"]), generator=g)
    context[:, 0], context[:, -1] = 0, 2
    labels = torch.randint(4, vocab, (batch, spec["response"]), generator=g)
    labels[:, 0], labels[:, -1] = 0, 2
    mask = torch.ones_like(context)
    return context.to(device), mask.to(device), labels.to(device)


def generation_kwargs(spec):
    n = spec["new_tokens"]
    return dict(do_sample=True, top_k=50, top_p=0.9, min_new_tokens=n, max_new_tokens=n)


# ---- phases ---------------------------------------------------------------------------------------------------------


def bench_train(model, batch, spec, timer, device, seed, compile_mode=None, compile_backend="inductor"):
    """examples/s of forward + backward + AdamW step; with `compile_mode` the forward (and its backward) run through
    `CompiledTrainingForward` (examples/train.py's `--torch_compile`), one static compile for this shape.

    Returns a dict: `rate` (examples/s), `peak` (MiB), `first_s` (the first step: the compile), and on CUDA the
    profile of 3 more steps: `kernel_ms` (GPU kernel time per step, CUDA-graph replays included), `busy`
    (kernel time / median step time: near 1 when the step is bound by the device's work, ≪ 1 when by the host)
    and `top_kernels`."""
    context, mask, labels = token_batch(batch, spec, device, seed)
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    forward = model if compile_mode is None else CompiledTrainingForward(model, compile_mode, compile_backend,
                                                                             dynamic=False)

    def step():
        loss = forward(input_ids=context, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timer.reset_peak()
    seconds = timer.median(step, spec["warmup"] + (2 if compile_mode else 0), spec["iters"])  # + graph recording
    out = dict(rate=batch / seconds, peak=timer.peak_mib(), first_s=timer.first_s)
    if device.type == "cuda":
        out["kernel_ms"], out["top_kernels"] = kernel_time(step, calls=3)
        out["busy"] = out["kernel_ms"] / (seconds * 1e3)
    del optimizer, forward
    model.zero_grad(set_to_none=True)
    model.eval()
    return out


def kernel_time(fn, calls, top=8):
    """GPU kernel milliseconds per call of `fn` under torch.profiler (CUPTI sees kernels replayed from CUDA graphs),
    and the `top` kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / calls
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return total_ms, [{"kernel": e.key[:160], "ms_per_call": e.self_device_time_total / 1e3 / calls,
                       "launches_per_call": e.count / calls} for e in ranked]


def train_flops(model, batch, spec, device, seed):
    """Floating-point operations of one training forward + backward (torch.utils.flop_counter: matmuls and
    attention), in GFLOP, and the forward's by module (two levels deep, e.g. `model.encoder`; the backward's
    attribution to modules is not reliable, so it is counted as a whole)."""
    from torch.utils.flop_counter import FlopCounterMode

    context, mask, labels = token_batch(batch, spec, device, seed)
    model.train()
    forward, backward = FlopCounterMode(display=False, depth=3), FlopCounterMode(display=False)
    with forward:
        loss = model(input_ids=context, attention_mask=mask, labels=labels).loss
    with backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    by_module = {".".join(name.split(".")[1:]): sum(ops.values()) / 1e9  # without the root class's name
                 for name, ops in forward.get_flop_counts().items() if 1 <= name.count(".") <= 2}
    return (forward.get_total_flops() + backward.get_total_flops()) / 1e9, by_module


def bench_generate(model, batch, spec, timer, device, seed, **extra):
    model.eval()
    context, mask, _ = token_batch(batch, spec, device, seed)
    kwargs = dict(generation_kwargs(spec), **extra)
    shapes = []

    def call():
        out = model.generate(context, attention_mask=mask, **kwargs)
        shapes.append(tuple(out.shape))

    timer.reset_peak()
    with torch.no_grad():
        seconds = timer.median(call, spec["gen_warmup"], spec["gen_iters"])
    peak = timer.peak_mib()
    new_tokens = shapes[-1][1] - 1  # minus the decoder start token
    if new_tokens != spec["new_tokens"]:
        raise RuntimeError(f"expected {spec['new_tokens']} new tokens, got {new_tokens}")
    return batch * new_tokens / seconds, seconds * 1e3, peak


def bench_prior(dior, spec, timer, device, seed, sampler=None, steps=None):
    """ms of one `sample_latents` call at batch 1 (`sampler`/`steps` None: the configuration's defaults)."""
    dior.eval()
    context, mask, _ = token_batch(1, spec, device, seed)
    configs = {id(c): c for c in (dior.config, getattr(dior.diffusion_prior, "config", dior.config))}.values()
    saved = [c.sampler for c in configs]
    try:
        if sampler is not None:
            for c in configs:
                c.sampler = sampler
        with torch.no_grad():
            _, context_vectors = dior.encode(context, mask)
            seconds = timer.median(lambda: dior.sample_latents(context_vectors, num_inference_steps=steps),
                                   spec["gen_warmup"] + 1, spec["gen_iters"] * 2)
    finally:
        for c, value in zip(configs, saved):
            c.sampler = value
    return seconds * 1e3


def same_tokens(dior, batch, spec, device, seed, **reference):
    """Fraction of rows where the default `generate()` gives the tokens of `generate(**reference)` (same latents,
    same sampling seed)."""
    dior.eval()
    context, mask, _ = token_batch(batch, spec, device, seed)
    latents = torch.randn(batch, dior.config.encoder_layers, dior.config.latent_size, device=device,
                          generator=torch.Generator(device).manual_seed(seed)).to(dior.dtype)
    kwargs = dict(generation_kwargs(spec), latents=latents)
    with torch.no_grad():
        torch.manual_seed(seed)
        eager = dior.generate(context, attention_mask=mask, **reference, **kwargs)
        torch.manual_seed(seed)
        fast = dior.generate(context, attention_mask=mask, **kwargs)
    if eager.shape != fast.shape:
        return 0.0
    return (eager == fast).all(dim=1).float().mean().item()


def compiled(model):
    """Whether generate() went through transformers' torch.compile'd forward (set by `get_compiled_call`)."""
    return getattr(model, "_compiled_call", None) is not None


def run(args):
    spec = TINY if args.tiny else FULL
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: threads only contend (CI boxes are small and shared)
    timer = Timer(device)
    started = time.perf_counter()

    results = {
        "tiny": bool(args.tiny),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "train_precision": f"{dtype_name} weights, no autocast; AdamW (fused on CUDA); forward+backward+step",
        "attn_implementation": "sdpa",
        "shapes": {k: spec[k] for k in ("context", "response", "new_tokens", "train_batches", "gen_batches")},
        "model_shape": spec["shape"],
        "generation": generation_kwargs(spec),
        "timing": {k: spec[k] for k in ("warmup", "iters", "gen_warmup", "gen_iters")} | {"statistic": "median"},
        "errors": {},
    }
    bart, dior = build_models(spec, device, dtype, args.seed)
    results["params_bart"] = sum(p.numel() for p in bart.parameters())
    results["params_dior"] = sum(p.numel() for p in dior.parameters())
    log(f"[bench] {device} {results['gpu'] or ''} {dtype_name}; BART {results['params_bart'] / 1e6:.1f}M, "
        f"Dior {results['params_dior'] / 1e6:.1f}M parameters")

    def attempt(name, fn):
        try:
            return fn()
        except Exception as error:  # one failing phase must not lose the others
            results["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
            log(f"[bench] {name} failed:\n{traceback.format_exc()}")
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return None
        finally:  # what is measured so far survives a timeout or a crash later on
            results["wall_s"] = round(time.perf_counter() - started, 1)
            write_json(results, args.output, complete=False)

    # training
    for batch in spec["train_batches"]:
        for name, model in (("bart", bart), ("dior", dior)):
            out = attempt(f"train_{name}_bs{batch}", lambda: bench_train(model, batch, spec, timer, device, args.seed))
            _record_train(results, out, f"{name}_bs{batch}")
            flops = attempt(f"train_flops_{name}_bs{batch}", lambda: train_flops(model, batch, spec, device, args.seed))
            results[f"train_gflop_{name}_bs{batch}"], results[f"train_forward_gflop_by_module_{name}_bs{batch}"] = (
                flops or (None, None))
            log(f"[bench] train {name} bs{batch}: {_fmt(results[f'train_examples_per_s_{name}_bs{batch}'])} ex/s, "
                f"GPU busy {_fmt(results.get(f'train_gpu_busy_{name}_bs{batch}'), 2)}, "
                f"{_fmt(results[f'train_gflop_{name}_bs{batch}'])} GFLOP")
        results[f"train_ratio_bs{batch}"] = _ratio(results, f"train_examples_per_s_{{}}_bs{batch}")
        # what the ratio would be if both steps were bound by their matmuls alone (BART's FLOPs / Dior's)
        results[f"train_flop_ratio_bs{batch}"] = _ratio_inverse(results, f"train_gflop_{{}}_bs{batch}")
    if args.compile_train:  # both models through train.py's --torch_compile, one static compile per batch size
        results["train_compile_mode"] = args.compile_train
        results["train_compile_backend"] = args.compile_train_backend
        for batch in spec["train_batches"]:
            for name, model in (("bart", bart), ("dior", dior)):
                out = attempt(f"train_compiled_{name}_bs{batch}", lambda: bench_train(
                    model, batch, spec, timer, device, args.seed, args.compile_train, args.compile_train_backend))
                _record_train(results, out, f"{name}_compiled_bs{batch}")
                results[f"train_compile_s_{name}_bs{batch}"] = (out or {}).get("first_s")
                log(f"[bench] train compiled ({args.compile_train}) {name} bs{batch}: "
                    f"{_fmt(results[f'train_examples_per_s_{name}_compiled_bs{batch}'])} ex/s, first call "
                    f"{_fmt(results[f'train_compile_s_{name}_bs{batch}'])} s, GPU busy "
                    f"{_fmt(results.get(f'train_gpu_busy_{name}_compiled_bs{batch}'), 2)}")
            results[f"train_ratio_compiled_bs{batch}"] = _ratio(results, f"train_examples_per_s_{{}}_compiled_bs{batch}")
            results[f"train_kernel_ratio_compiled_bs{batch}"] = _ratio_inverse(
                results, f"train_kernel_ms_{{}}_compiled_bs{batch}")
            eager_bart, compiled_dior = (results.get(f"train_examples_per_s_bart_bs{batch}"),
                                         results.get(f"train_examples_per_s_dior_compiled_bs{batch}"))
            results[f"train_ratio_compiled_vs_eager_bart_bs{batch}"] = (
                compiled_dior / eager_bart if eager_bart and compiled_dior else None)
        torch._dynamo.reset()  # the compiled training graphs are not needed by the generation phases
    if args.train_only:
        return _finish(results, started)

    # generation, eager (the default path of both)
    for batch in spec["gen_batches"]:
        for name, model in (("bart", bart), ("dior", dior)):
            out = attempt(f"gen_{name}_bs{batch}", lambda: bench_generate(model, batch, spec, timer, device, args.seed))
            rate, ms, peak = out or (None, None, None)
            results[f"gen_tokens_per_s_{name}_bs{batch}"] = rate
            results[f"gen_ms_{name}_bs{batch}"] = ms
            results[f"peak_mem_gen_{name}_bs{batch}_mib"] = peak
            log(f"[bench] generate {name} bs{batch}: {rate and round(rate, 1)} tok/s, {ms and round(ms, 1)} ms")
        results[f"gen_ratio_bs{batch}"] = _ratio(results, f"gen_tokens_per_s_{{}}_bs{batch}")
    # Dior through transformers' own loop (what the default was before the captured step), and the same-tokens check
    for batch in spec["gen_batches"]:
        out = attempt(f"gen_dior_hfloop_bs{batch}", lambda: bench_generate(
            dior, batch, spec, timer, device, args.seed, disable_compile=True))
        rate, ms, _ = out or (None, None, None)
        results[f"gen_tokens_per_s_dior_hfloop_bs{batch}"], results[f"gen_ms_dior_hfloop_bs{batch}"] = rate, ms
        log(f"[bench] generate dior, transformers' loop, bs{batch}: {rate and round(rate, 1)} tok/s")
        if rate and results.get(f"gen_tokens_per_s_bart_bs{batch}"):
            results[f"gen_ratio_hfloop_bs{batch}"] = rate / results[f"gen_tokens_per_s_bart_bs{batch}"]
    for batch in (1, min(64, max(spec["gen_batches"]))):
        key = f"same_tokens_bs{batch}"
        results[key] = attempt(key, lambda: same_tokens(dior, batch, spec, device, args.seed, disable_compile=True))
        log(f"[bench] default vs transformers' loop, same tokens bs{batch}: {results[key]}")

    # the prior at batch 1: the default sampler and steps, then every sampler over a sweep of steps
    prior_config = getattr(dior.diffusion_prior, "config", dior.config)
    results["prior_default"] = {"sampler": prior_config.sampler, "num_inference_steps": prior_config.num_inference_steps}
    results["prior_ms_bs1"] = attempt("prior_default", lambda: bench_prior(dior, spec, timer, device, args.seed))
    log(f"[bench] prior bs1 {results['prior_default']}: {results['prior_ms_bs1'] and round(results['prior_ms_bs1'], 2)} ms")
    sweep = results["prior_ms_bs1_sweep"] = {}
    for sampler in SAMPLERS:
        sweep[sampler] = {}
        for steps in PRIOR_STEPS:
            sweep[sampler][str(steps)] = attempt(f"prior_{sampler}_steps{steps}", lambda: bench_prior(
                dior, spec, timer, device, args.seed, sampler=sampler, steps=steps))
        log(f"[bench] prior bs1 {sampler}: " + ", ".join(f"{k} steps {v and round(v, 2)} ms" for k, v in sweep[sampler].items()))
    results["generate_ms_bs1_default"] = results.get("gen_ms_dior_bs1")
    candidates = {"default": (results.get("gen_tokens_per_s_dior_bs1"), results["prior_ms_bs1"],
                              results["generate_ms_bs1_default"])}

    if args.fast:
        # a static cache for both models: BART's decoding step compiled by transformers, Dior's captured step
        static = dict(cache_implementation="static") | (dict(disable_compile=True) if args.no_compile else {})
        will_compile = device.type == "cuda" and not args.no_compile
        results["static_compile_expected"] = will_compile
        results["static_compiled"] = {}
        results["static_first_call_s"] = {}
        need_s = args.compile_reserve_s if will_compile else 1.0  # one compile per model and batch shape
        for batch in spec["gen_batches"]:
            for name, model in (("bart", bart), ("dior", dior)):
                key = f"{name}_static_bs{batch}"
                rate = ms = peak = None
                if _budget_left(args, started) < need_s:
                    results["errors"][f"gen_{key}"] = SKIPPED
                else:
                    out = attempt(f"gen_{key}", lambda: bench_generate(
                        model, batch, spec, timer, device, args.seed, **static))
                    rate, ms, peak = out or (None, None, None)
                    results["static_first_call_s"][key] = timer.first_s
                    results["static_compiled"][key] = compiled(model)
                results[f"gen_tokens_per_s_{key}"] = rate
                results[f"gen_ms_{key}"] = ms
                results[f"peak_mem_gen_{key}_mib"] = peak
                log(f"[bench] generate {name} static bs{batch}: {rate and round(rate, 1)} tok/s, "
                    f"{ms and round(ms, 1)} ms (first call {timer.first_s and round(timer.first_s, 1)} s, "
                    f"compiled={compiled(model)})")
            dior_rate = results[f"gen_tokens_per_s_dior_static_bs{batch}"]
            for base, key in (("bart_static", f"gen_ratio_static_bs{batch}"),
                              ("bart", f"gen_ratio_static_vs_eager_bart_bs{batch}")):
                base_rate = results.get(f"gen_tokens_per_s_{base}_bs{batch}")
                results[key] = dior_rate / base_rate if dior_rate and base_rate else None
        results["generate_ms_bs1_static"] = results.get("gen_ms_dior_static_bs1")
        candidates["static"] = (results.get("gen_tokens_per_s_dior_static_bs1"), results["prior_ms_bs1"],
                                results["generate_ms_bs1_static"])

    # the headline batch-1 figure: the fastest Dior path through generate(), and its own prior share
    usable = {k: v for k, v in candidates.items() if v[0]}
    if usable:
        path = max(usable, key=lambda k: usable[k][0])
        rate, prior_ms, gen_ms = usable[path]
        results["bs1_path"] = path
        results["bs1_tokens_per_s"] = rate
        results["prior_ms_bs1"] = prior_ms
        results["generate_ms_bs1"] = gen_ms
        results["prior_share"] = prior_ms / gen_ms if prior_ms and gen_ms else None
    else:
        results.update(bs1_path=None, bs1_tokens_per_s=None, prior_ms_bs1=None, generate_ms_bs1=None, prior_share=None)
    for key, (_, prior_ms, gen_ms) in candidates.items():
        results[f"prior_share_{key}"] = prior_ms / gen_ms if prior_ms and gen_ms else None
    results["bs1_candidates"] = {k: {"tokens_per_s": v[0], "prior_ms": v[1], "generate_ms": v[2]}
                                 for k, v in candidates.items()}

    return _finish(results, started)


def _record_train(results, out, suffix):
    """bench_train's dict (None if the phase failed) under the keys of `results/speed.json`."""
    out = out or {}
    results[f"train_examples_per_s_{suffix}"] = out.get("rate")
    results[f"peak_mem_train_{suffix}_mib"] = out.get("peak")
    if "kernel_ms" in out:
        results[f"train_kernel_ms_{suffix}"] = out["kernel_ms"]
        results[f"train_gpu_busy_{suffix}"] = out["busy"]
        results[f"train_top_kernels_{suffix}"] = out["top_kernels"]


def _ratio_inverse(results, pattern):
    """BART / Dior of a time (the throughput ratio it implies)."""
    bart, dior = results.get(pattern.format("bart")), results.get(pattern.format("dior"))
    return bart / dior if bart and dior else None


def _finish(results, started):
    results["goals"] = {k: f"{op} {v}" for k, (op, v) in GOALS.items()}
    results["goals_met"] = {k: _met(results.get(k), op, v) for k, (op, v) in GOALS.items()}
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def _budget_left(args, started):
    return args.budget_s - (time.perf_counter() - started)


def _ratio(results, pattern):
    bart, dior = results.get(pattern.format("bart")), results.get(pattern.format("dior"))
    return dior / bart if bart and dior else None


def _met(value, op, goal):
    if value is None:
        return None
    return bool(value >= goal) if op == ">=" else bool(value <= goal)


# ---- output ---------------------------------------------------------------------------------------------------------


def _fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def table(results) -> str:
    rows = [("metric", "BART", "Dior", "Dior/BART", "goal")]

    def add(label, key, goal="", digits=1, ratio=None):
        """A BART / Dior row; the last column is Dior / BART unless `ratio` is given."""
        bart, dior = results.get(key.format("bart")), results.get(key.format("dior"))
        if ratio is None:
            ratio = dior / bart if bart and dior else None
        rows.append((label, _fmt(bart, digits), _fmt(dior, digits), _fmt(ratio, 3), goal))

    for batch in results["shapes"]["train_batches"]:
        add(f"train ex/s bs{batch}", f"train_examples_per_s_{{}}_bs{batch}",
            {64: ">= 0.85", 256: ">= 0.90"}.get(batch, ""))
    for batch in results["shapes"]["train_batches"]:
        add(f"  train GFLOP bs{batch} (BART/Dior: the ratio if matmul-bound)", f"train_gflop_{{}}_bs{batch}",
            ratio=results.get(f"train_flop_ratio_bs{batch}"))
        if f"train_gpu_busy_dior_bs{batch}" in results:
            add(f"  train GPU busy bs{batch} (kernel time / step)", f"train_gpu_busy_{{}}_bs{batch}", digits=2)
    for batch in results["shapes"]["train_batches"]:
        if f"train_examples_per_s_dior_compiled_bs{batch}" in results:
            add(f"train ex/s bs{batch} compiled ({results['train_compile_mode']})",
                f"train_examples_per_s_{{}}_compiled_bs{batch}")
            rows.append((f"  Dior compiled / BART eager bs{batch}", "", "",
                         _fmt(results.get(f"train_ratio_compiled_vs_eager_bart_bs{batch}"), 3), ""))
            if f"train_kernel_ms_dior_compiled_bs{batch}" in results:
                add(f"  compiled kernel ms/step bs{batch} (BART/Dior)", f"train_kernel_ms_{{}}_compiled_bs{batch}",
                    digits=2, ratio=results.get(f"train_kernel_ratio_compiled_bs{batch}"))
                add(f"  compiled GPU busy bs{batch}", f"train_gpu_busy_{{}}_compiled_bs{batch}", digits=2)
    for batch in results["shapes"]["gen_batches"]:
        add(f"gen tok/s bs{batch}", f"gen_tokens_per_s_{{}}_bs{batch}", {64: ">= 0.95", 256: ">= 1.0"}.get(batch, ""))
        if f"gen_tokens_per_s_dior_hfloop_bs{batch}" in results:
            rows.append((f"  Dior through transformers' loop bs{batch}", "",
                         _fmt(results[f"gen_tokens_per_s_dior_hfloop_bs{batch}"]),
                         _fmt(results.get(f"gen_ratio_hfloop_bs{batch}"), 3), ""))
    for batch in results["shapes"]["gen_batches"]:
        if f"gen_tokens_per_s_dior_static_bs{batch}" in results:
            add(f"gen tok/s bs{batch} static", f"gen_tokens_per_s_{{}}_static_bs{batch}")
            rows.append((f"  Dior static / BART eager bs{batch}", "", "",
                         _fmt(results.get(f"gen_ratio_static_vs_eager_bart_bs{batch}"), 3), ""))
    for batch in results["shapes"]["train_batches"]:
        add(f"peak MiB train bs{batch}", f"peak_mem_train_{{}}_bs{batch}_mib")
    for batch in results["shapes"]["gen_batches"]:
        add(f"peak MiB gen bs{batch}", f"peak_mem_gen_{{}}_bs{batch}_mib")
    default = results.get("prior_default", {})
    rows.append((f"prior ms bs1 ({default.get('sampler')}, {default.get('num_inference_steps')} steps)", "",
                 _fmt(results.get("prior_ms_bs1"), 2), "", ""))
    for sampler, by_steps in results.get("prior_ms_bs1_sweep", {}).items():
        rows.append((f"prior ms bs1 {sampler} " + "/".join(by_steps) + " steps", "",
                     " / ".join(_fmt(v, 2) for v in by_steps.values()), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    met = results["goals_met"]
    lines.append("")
    lines.append("Dior batch-1 paths through generate(): " + "; ".join(
        f"{name} {_fmt(c['tokens_per_s'])} tok/s (prior {_fmt(c['prior_ms'], 2)} ms of {_fmt(c['generate_ms'], 2)} ms)"
        for name, c in results.get("bs1_candidates", {}).items()))
    same = {k: results.get(k) for k in results if k.startswith("same_tokens_bs")}
    lines.append(f"default tokens == transformers' loop tokens (fraction of rows): {same}")
    if "static_compiled" in results:
        lines.append(f"static path compiled by transformers: {results.get('static_compiled')}")
    lines.append("prior_share: " + ", ".join(
        f"{k.removeprefix('prior_share_')} {_fmt(results.get(k), 4)}" for k in ("prior_share_default", "prior_share_static")
        if k in results))
    lines += [
        "",
        f"bs1_tokens_per_s (Dior, generate(), path={results.get('bs1_path')}): {_fmt(results.get('bs1_tokens_per_s'))}"
        f"   goal >= 1000   met={met.get('bs1_tokens_per_s')}",
        f"prior_share = prior_ms_bs1 {_fmt(results.get('prior_ms_bs1'), 2)} / generate_ms_bs1 "
        f"{_fmt(results.get('generate_ms_bs1'), 2)} = {_fmt(results.get('prior_share'), 4)}   goal <= 0.05   "
        f"met={met.get('prior_share')}",
        f"goals met: {met}",
        f"device={results['device']} gpu={results['gpu']} dtype={results['dtype']} torch={results['torch']} "
        f"transformers={results['transformers']} tiny={results['tiny']} wall={results['wall_s']}s",
    ]
    epoch = results.get("dailydialog_epoch")
    if epoch:
        waste = epoch["padding_waste"]
        lines.append(
            f"DailyDialog epoch ({epoch['pairs']} pairs, batch {epoch['batch_size']}, {epoch['steps_per_epoch']} steps): "
            f"random {_fmt(epoch.get('epoch_s_random_pad1'))} s (padding {waste['random_pad1']['total']:.0%}), "
            f"grouped+pad16 {_fmt(epoch.get('epoch_s_grouped_pad16'))} s (padding {waste['grouped_pad16']['total']:.0%})")
    if results["errors"]:
        lines.append(f"errors: {results['errors']}")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2.4]})
    names = ["train_ratio_bs64", "train_ratio_bs256", "gen_ratio_bs1", "gen_ratio_bs64", "gen_ratio_bs256"]
    goals = [0.85, 0.90, None, 0.95, 1.0]
    colors = ["#4c72b0"] * 2 + ["#55a868"] * 3
    for batch in results["shapes"]["gen_batches"]:
        if f"gen_ratio_static_bs{batch}" in results:
            names.append(f"gen_ratio_static_bs{batch}"), goals.append(None), colors.append("#c44e52")
    values = [results.get(n) or 0 for n in names]
    bars = left.bar(range(len(names)), values, color=colors)
    for i, goal in enumerate(goals):
        if goal:
            left.hlines(goal, i - 0.4, i + 0.4, colors="red", linestyles="--")
    for bar, value in zip(bars, values):
        left.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(names)), [n.replace("_ratio_", "\n").replace("static_", "static\n") for n in names],
                    fontsize=7)
    left.set_ylabel("Dior / BART (same run)")
    left.axhline(1.0, color="grey", linewidth=0.5)
    left.set_title("throughput ratios (red: goal)")

    labels, rates = [], []
    for key, label in (("gen_tokens_per_s_bart_bs1", "BART eager"), ("gen_tokens_per_s_dior_bs1", "Dior eager"),
                       ("gen_tokens_per_s_bart_static_bs1", "BART static\n(+compile)"),
                       ("gen_tokens_per_s_dior_static_bs1", "Dior static\n(+compile)")):
        if results.get(key):
            labels.append(label), rates.append(results[key])
    right.bar(range(len(rates)), rates, color="#8172b2")
    right.axhline(1000, color="red", linestyle="--")
    right.set_xticks(range(len(rates)), labels, fontsize=7)
    right.set_ylabel("tokens/s at batch 1")
    share = results.get("prior_share")
    right.set_title(f"batch 1 (goal 1000 tok/s); prior share {share:.3f}" if share is not None else "batch 1")
    fig.suptitle(f"{results['gpu'] or results['device']}, {results['dtype']}{' (tiny)' if results['tiny'] else ''}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(results, path, complete):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(results, complete=complete), indent=2, default=str) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few iterations (CPU smoke run)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--output", default="results/speed.json")
    parser.add_argument("--plot", default=None, help="also draw a PNG, e.g. results/speed.png")
    parser.add_argument("--fast", action="store_true",
                        help='also measure generate(cache_implementation="static") (auto torch.compile on CUDA), '
                             "both models, and check it gives the eager tokens")
    parser.add_argument("--no-compile", action="store_true",
                        help="with --fast: static cache without transformers' automatic torch.compile")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall budget of the run: a compiled static run is skipped if less than "
                             "--compile-reserve-s is left")
    parser.add_argument("--compile-reserve-s", type=float, default=75.0,
                        help="seconds one compiled static run (one model, one batch size) may take")
    parser.add_argument("--compile-train", default=None, metavar="MODE",
                        help="also time the training step of both models through examples/train.py's --torch_compile "
                             "with this torch.compile mode (e.g. reduce-overhead: CUDA graphs)")
    parser.add_argument("--compile-train-backend", default="inductor",
                        help="torch.compile backend of --compile-train (aot_eager: a CPU smoke test)")
    parser.add_argument("--train-only", action="store_true", help="only the training phases (with --compile-train: "
                        "eager and compiled, both models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epoch", action="store_true",
                        help="also estimate one DailyDialog epoch of the quality recipe (benchmarks/epoch_estimate.py)")
    parser.add_argument("--epoch-data", default="/work/shared/data/dailydialog/plato/dial.train.reconstructed.gz")
    parser.add_argument("--epoch-tokenizer", default="/work/shared/data/tokenizer/bart-base")
    args = parser.parse_args(argv)
    # Dior runs SDPA without cuDNN (attention_dior.SDPA_BACKENDS); give plain BART the same kernels
    torch.backends.cuda.enable_cudnn_sdp(False)

    results = run(args)
    if args.epoch:  # padding waste with/without length grouping, and the epoch time from measured step times
        import contextlib

        import epoch_estimate

        try:
            with contextlib.redirect_stdout(sys.stderr):  # the table comes last on stdout
                results["dailydialog_epoch"] = epoch_estimate.main(
                    ["--data", args.epoch_data, "--tokenizer", args.epoch_tokenizer, "--measure",
                     "--device", str(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))]
                    + (["--small", "--limit", "2000", "--iters", "1"] if args.tiny else []))
        except Exception as error:
            results["errors"]["dailydialog_epoch"] = f"{type(error).__name__}: {error}"[:2000]
    results["complete"] = True
    write_json(results, args.output, complete=True)
    if args.plot:
        try:
            plot(results, args.plot)
        except Exception as error:
            log(f"[bench] plot failed: {type(error).__name__}: {error}")
    print(table(results))
    print(f"wrote {args.output}" + (f" and {args.plot}" if args.plot else ""))
    return results


if __name__ == "__main__":
    main()
