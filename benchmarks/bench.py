"""Speed of Dior-CVAE against plain BART of the same shape, in one run on one device.

    python benchmarks/bench.py --fast                    # GPU: bart-base shapes, bf16 (compiles: minutes)
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
  equal those of transformers' loop under the same seed and given latents (on the CPU both calls are transformers'
  loop, so the check means something on CUDA only).
* prior = `model.sample_latents(context_vectors)` at batch 1 (on CUDA one CUDA graph for the noise-free solvers):
  the default sampler and steps (DPM-Solver++, 20 steps), and a sweep of steps (5, 10, 20) for each sampler
  (dpmsolver++, ddim, ddpm); `prior_share` = prior ms / batch-1 `generate()` ms, for the default path
  (`prior_share_default`) and the static-cache path (`prior_share_static`).
* `--fast` adds `generate(cache_implementation="static")` for both models (`--no-compile` passes
  `disable_compile=True`): for BART transformers torch.compiles the decoding step on CUDA
  (`GenerationConfig.compile_config`), for Dior it is the default path's captured step; at batch 1, 64, 256, with
  ratios to eager BART and to static BART. A static run that does not fit in what is left of `--budget-s` is
  skipped and recorded as "skipped: time budget" in `errors`. `bs1_tokens_per_s` is the best Dior batch-1 figure
  through `generate()`; `bs1_path` says which path ("default" or "static").

Each figure is the median of several timed calls after warm-up calls, with the device synchronised around each.
Peak memory is `torch.cuda.max_memory_allocated` per phase (reset before each). Everything lands in `--output`
(JSON, rewritten after every phase), a table is printed last, and `--plot` draws the ratios against their goals.
Result keys are `metric[_model][_variant]_bsN`: see `key()`.
"""

import argparse
import contextlib
import functools
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import transformers  # noqa: E402
from common import DTYPES, Timer, fmt, log, token_batch, write_json  # noqa: E402

from dior_cvae.scheduling_dior import SAMPLERS  # noqa: E402
from dior_cvae.training.compiled import CompiledTrainingForward  # noqa: E402

MODELS = ("bart", "dior")
GOALS = {  # the speed goals: ratios to BART of the same shape, same run
    "train_ratio_bs64": (">=", 0.85),
    "train_ratio_bs256": (">=", 0.90),
    "gen_ratio_bs64": (">=", 0.95),
    "gen_ratio_bs256": (">=", 1.0),
    "bs1_tokens_per_s": (">=", 1000.0),
    "prior_share": ("<=", 0.05),
}
PRIOR_STEPS = (5, 10, 20)  # each noise-free solver and step count compiles its own graph on CUDA
SKIPPED = "skipped: time budget"

FULL = dict(
    shape=common.BART_BASE, context=96, response=20, new_tokens=40, train_batches=(64, 256), gen_batches=(1, 64, 256),
    warmup=3, iters=10, gen_warmup=2, gen_iters=5,
)
TINY = dict(
    shape=dict(vocab_size=1000, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128),
    dior=dict(latent_size=8, denoiser_hidden_size=32),
    context=24, response=8, new_tokens=8, train_batches=(64, 256), gen_batches=(1, 64, 256),
    warmup=1, iters=1, gen_warmup=1, gen_iters=1,
)


def key(metric, model=None, variant=None, batch=None, unit=None):
    """The result key of one figure, `metric[_model][_variant][_bsN][_unit]`:
    key("peak_mem_train", "dior", "compiled", 64, "mib") == "peak_mem_train_dior_compiled_bs64_mib"."""
    return "_".join(str(p) for p in (metric, model, variant, None if batch is None else f"bs{batch}", unit) if p)


def ratio(numerator, denominator):
    """numerator / denominator, or None when either is missing (a failed or skipped phase) or zero."""
    return numerator / denominator if numerator and denominator else None


def generation_kwargs(spec):
    n = spec["new_tokens"]
    return dict(do_sample=True, top_k=50, top_p=0.9, min_new_tokens=n, max_new_tokens=n)


def batch_of(batch, spec, device, seed):
    """The run's token batch: a full context and a `<s> r </s>` response, the same for both models."""
    return token_batch(batch, spec["context"], spec["response"], spec["shape"]["vocab_size"], seed, device)


# ---- measurements -----------------------------------------------------------------------------------------------


def bench_train(model, batch, spec, timer, seed, compile_mode=None, compile_backend="inductor"):
    """examples/s of forward + backward + AdamW step; with `compile_mode` the forward (and its backward) run through
    `CompiledTrainingForward` (examples/train.py's `--torch_compile`), one static compile for this shape.

    Returns a dict: `rate` (examples/s), `peak` (MiB), `first_s` (the first step: the compile), and on CUDA the
    profile of 3 more steps: `kernel_ms` (GPU kernel time per step, CUDA-graph replays included), `busy`
    (kernel time / median step time: near 1 when the step is bound by the device's work, ≪ 1 when by the host)
    and `top_kernels`."""
    inputs = batch_of(batch, spec, timer.device, seed)
    model.train()
    on_cuda = timer.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_cuda)
    forward = model if compile_mode is None else CompiledTrainingForward(model, compile_mode, compile_backend,
                                                                         dynamic=False)

    def step():
        forward(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timer.reset_peak()
    warmup = spec["warmup"] + (2 if compile_mode else 0)  # a compiled step also records its graphs
    seconds = timer.median(step, warmup, spec["iters"])
    out = dict(rate=batch / seconds, peak=timer.peak_mib(), first_s=timer.first_s)
    if on_cuda:
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

    inputs = batch_of(batch, spec, device, seed)
    model.train()
    forward, backward = FlopCounterMode(display=False, depth=3), FlopCounterMode(display=False)
    with forward:
        loss = model(**inputs).loss
    with backward:
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    by_module = {".".join(name.split(".")[1:]): sum(ops.values()) / 1e9  # without the root class's name
                 for name, ops in forward.get_flop_counts().items() if 1 <= name.count(".") <= 2}
    return (forward.get_total_flops() + backward.get_total_flops()) / 1e9, by_module


def bench_generate(model, batch, spec, timer, seed, **extra):
    """(tokens/s, ms per call, peak MiB) of `generate()` with the run's sampling settings and `extra`."""
    model.eval()
    inputs = batch_of(batch, spec, timer.device, seed)
    kwargs = dict(generation_kwargs(spec), **extra)
    shapes = []

    def call():
        shapes.append(tuple(model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                           **kwargs).shape))

    timer.reset_peak()
    with torch.no_grad():
        seconds = timer.median(call, spec["gen_warmup"], spec["gen_iters"])
    new_tokens = shapes[-1][1] - 1  # minus the decoder start token
    if new_tokens != spec["new_tokens"]:
        raise RuntimeError(f"expected {spec['new_tokens']} new tokens, got {new_tokens}")
    return batch * new_tokens / seconds, seconds * 1e3, timer.peak_mib()


def bench_prior(dior, spec, timer, seed, sampler=None, steps=None):
    """ms of one `sample_latents` call at batch 1 (`sampler`/`steps` None: the configuration's defaults)."""
    dior.eval()
    inputs = batch_of(1, spec, timer.device, seed)
    configs = {id(c): c for c in (dior.config, getattr(dior.diffusion_prior, "config", dior.config))}.values()
    saved = [c.sampler for c in configs]
    try:
        if sampler is not None:
            for c in configs:
                c.sampler = sampler
        with torch.no_grad():
            _, context_vectors = dior.encode(inputs["input_ids"], inputs["attention_mask"])
            seconds = timer.median(functools.partial(dior.sample_latents, context_vectors, num_inference_steps=steps),
                                   spec["gen_warmup"] + 1, spec["gen_iters"] * 2)
    finally:
        for c, value in zip(configs, saved):
            c.sampler = value
    return seconds * 1e3


def same_tokens(dior, batch, spec, device, seed, **reference):
    """Fraction of rows where the default `generate()` gives the tokens of `generate(**reference)` (same latents,
    same sampling seed)."""
    dior.eval()
    inputs = batch_of(batch, spec, device, seed)
    latents = torch.randn(batch, dior.config.encoder_layers, dior.config.latent_size, device=device,
                          generator=torch.Generator(device).manual_seed(seed)).to(dior.dtype)
    kwargs = dict(generation_kwargs(spec), attention_mask=inputs["attention_mask"], latents=latents)
    with torch.no_grad():
        torch.manual_seed(seed)
        expected = dior.generate(inputs["input_ids"], **reference, **kwargs)
        torch.manual_seed(seed)
        default = dior.generate(inputs["input_ids"], **kwargs)
    return equal_rows(default, expected)


def equal_rows(a, b):
    """Fraction of rows of two (B, T) token tensors that are equal in every position (0 when the shapes differ)."""
    if a.shape != b.shape:
        return 0.0
    return (a == b).all(dim=1).float().mean().item()


def compiled(model):
    """Whether generate() went through transformers' torch.compile'd forward (set by `get_compiled_call`)."""
    return getattr(model, "_compiled_call", None) is not None


# ---- one run: the phases ----------------------------------------------------------------------------------------


class Run:
    """One benchmark run: settings, models, and `results`, which is written to `--output` after every phase so that
    what was measured survives a later crash or timeout."""

    def __init__(self, args, spec, clock):
        self.args, self.spec, self.seed = args, spec, args.seed
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype_name = args.dtype or ("bf16" if self.device.type == "cuda" else "fp32")
        self.timer = Timer(self.device, clock)
        self.started = time.perf_counter()
        self.results = {
            "tiny": bool(args.tiny),
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "dtype": self.dtype_name,
            "train_precision": f"{self.dtype_name} weights, no autocast; AdamW (fused on CUDA); forward+backward+step",
            "attn_implementation": "sdpa",
            "shapes": {k: spec[k] for k in ("context", "response", "new_tokens", "train_batches", "gen_batches")},
            "model_shape": spec["shape"],
            "generation": generation_kwargs(spec),
            "timing": {k: spec[k] for k in ("warmup", "iters", "gen_warmup", "gen_iters")} | {"statistic": "median"},
            "errors": {},
        }
        self.models = dict(zip(MODELS, common.build_models(spec["shape"], self.seed, self.device,
                                                           DTYPES[self.dtype_name], **spec.get("dior", {}))))
        for name, model in self.models.items():
            self.results[f"params_{name}"] = sum(p.numel() for p in model.parameters())
        log(f"[bench] {self.device} {self.results['gpu'] or ''} {self.dtype_name}; "
            + ", ".join(f"{n} {self.results[f'params_{n}'] / 1e6:.1f}M parameters" for n in MODELS))

    def attempt(self, name, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None with the error recorded under `name`: one failing phase must not lose the
        others."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            self.results["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
            log(f"[bench] {name} failed:\n{traceback.format_exc()}")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            return None
        finally:
            self.results["wall_s"] = round(time.perf_counter() - self.started, 1)
            write_json(dict(self.results, complete=False), self.args.output)

    def budget_left(self):
        return self.args.budget_s - (time.perf_counter() - self.started)

    def dior_over_bart(self, metric, variant=None, batch=None):
        return ratio(self.results.get(key(metric, "dior", variant, batch)),
                     self.results.get(key(metric, "bart", variant, batch)))


def record_train(results, out, name, variant, batch):
    """bench_train's dict (None if the phase failed) under the run's keys."""
    out = out or {}
    results[key("train_examples_per_s", name, variant, batch)] = out.get("rate")
    results[key("peak_mem_train", name, variant, batch, "mib")] = out.get("peak")
    if "kernel_ms" in out:
        results[key("train_kernel_ms", name, variant, batch)] = out["kernel_ms"]
        results[key("train_gpu_busy", name, variant, batch)] = out["busy"]
        results[key("train_top_kernels", name, variant, batch)] = out["top_kernels"]


def measure_training(run):
    results, spec = run.results, run.spec
    for batch in spec["train_batches"]:
        for name, model in run.models.items():
            out = run.attempt(key("train", name, batch=batch), bench_train, model, batch, spec, run.timer, run.seed)
            record_train(results, out, name, None, batch)
            flops = run.attempt(key("train_flops", name, batch=batch), train_flops, model, batch, spec, run.device,
                                run.seed) or (None, None)
            results[key("train_gflop", name, batch=batch)] = flops[0]
            results[key("train_forward_gflop_by_module", name, batch=batch)] = flops[1]
            log(f"[bench] train {name} bs{batch}: {fmt(results[key('train_examples_per_s', name, batch=batch)])} "
                f"ex/s, {fmt(flops[0])} GFLOP")
        results[key("train_ratio", batch=batch)] = run.dior_over_bart("train_examples_per_s", batch=batch)
        # what the ratio would be if both steps were bound by their matmuls alone (BART's FLOPs / Dior's)
        results[key("train_flop_ratio", batch=batch)] = ratio(results[key("train_gflop", "bart", batch=batch)],
                                                              results[key("train_gflop", "dior", batch=batch)])


def measure_compiled_training(run):
    """Both models through train.py's --torch_compile, one static compile per batch size."""
    results, spec, args = run.results, run.spec, run.args
    results["train_compile_mode"] = args.compile_train
    results["train_compile_backend"] = args.compile_train_backend
    for batch in spec["train_batches"]:
        for name, model in run.models.items():
            out = run.attempt(key("train_compiled", name, batch=batch), bench_train, model, batch, spec, run.timer,
                              run.seed, args.compile_train, args.compile_train_backend)
            record_train(results, out, name, "compiled", batch)
            results[key("train_compile_s", name, batch=batch)] = (out or {}).get("first_s")
            log(f"[bench] train compiled ({args.compile_train}) {name} bs{batch}: "
                f"{fmt(results[key('train_examples_per_s', name, 'compiled', batch)])} ex/s")
        results[key("train_ratio", None, "compiled", batch)] = run.dior_over_bart("train_examples_per_s", "compiled",
                                                                                  batch)
        results[key("train_kernel_ratio", None, "compiled", batch)] = ratio(
            results.get(key("train_kernel_ms", "bart", "compiled", batch)),
            results.get(key("train_kernel_ms", "dior", "compiled", batch)))
        results[key("train_ratio", None, "compiled_vs_eager_bart", batch)] = ratio(
            results.get(key("train_examples_per_s", "dior", "compiled", batch)),
            results.get(key("train_examples_per_s", "bart", None, batch)))
    torch._dynamo.reset()  # the compiled training graphs are not needed by the generation phases


def record_generate(results, out, name, variant, batch):
    rate, ms, peak = out or (None, None, None)
    results[key("gen_tokens_per_s", name, variant, batch)] = rate
    results[key("gen_ms", name, variant, batch)] = ms
    if variant != "hfloop":
        results[key("peak_mem_gen", name, variant, batch, "mib")] = peak
    log(f"[bench] generate {name} {variant or 'default'} bs{batch}: {fmt(rate)} tok/s, {fmt(ms)} ms")


def measure_generation(run):
    """Both models' default `generate()`; Dior through transformers' own loop; the same-tokens check."""
    results, spec = run.results, run.spec
    for batch in spec["gen_batches"]:
        for name, model in run.models.items():
            out = run.attempt(key("gen", name, batch=batch), bench_generate, model, batch, spec, run.timer, run.seed)
            record_generate(results, out, name, None, batch)
        results[key("gen_ratio", batch=batch)] = run.dior_over_bart("gen_tokens_per_s", batch=batch)
    for batch in spec["gen_batches"]:
        out = run.attempt(key("gen", "dior", "hfloop", batch), bench_generate, run.models["dior"], batch, spec,
                          run.timer, run.seed, disable_compile=True)
        record_generate(results, out, "dior", "hfloop", batch)
        results[key("gen_ratio", None, "hfloop", batch)] = ratio(results[key("gen_tokens_per_s", "dior", "hfloop",
                                                                             batch)],
                                                                 results[key("gen_tokens_per_s", "bart", None, batch)])
    for batch in (1, min(64, max(spec["gen_batches"]))):
        name = key("same_tokens", batch=batch)
        results[name] = run.attempt(name, same_tokens, run.models["dior"], batch, spec, run.device, run.seed,
                                    disable_compile=True)
        log(f"[bench] default vs transformers' loop, same tokens bs{batch}: {results[name]}")


def measure_prior(run):
    """The prior at batch 1: the default sampler and steps, then every sampler over a sweep of steps."""
    results, dior = run.results, run.models["dior"]
    prior_config = getattr(dior.diffusion_prior, "config", dior.config)
    results["prior_default"] = {"sampler": prior_config.sampler, "num_inference_steps": prior_config.num_inference_steps}
    results["prior_ms_bs1"] = run.attempt("prior_default", bench_prior, dior, run.spec, run.timer, run.seed)
    sweep = results["prior_ms_bs1_sweep"] = {}
    for sampler in SAMPLERS:
        sweep[sampler] = {str(steps): run.attempt(f"prior_{sampler}_steps{steps}", bench_prior, dior, run.spec,
                                                  run.timer, run.seed, sampler=sampler, steps=steps)
                          for steps in PRIOR_STEPS}
    log(f"[bench] prior bs1 {results['prior_default']}: {fmt(results['prior_ms_bs1'], 2)} ms; sweep {sweep}")


def measure_static(run):
    """`generate(cache_implementation="static")` for both models: BART's decoding step compiled by transformers on
    CUDA, Dior's captured step; ratios to static and to eager BART."""
    results, spec, args = run.results, run.spec, run.args
    static = dict(cache_implementation="static") | (dict(disable_compile=True) if args.no_compile else {})
    will_compile = run.device.type == "cuda" and not args.no_compile
    results["static_compile_expected"] = will_compile
    results["static_compiled"], results["static_first_call_s"] = {}, {}
    need_s = args.compile_reserve_s if will_compile else 1.0  # one compile per model and batch shape
    for batch in spec["gen_batches"]:
        for name, model in run.models.items():
            path = key(None, name, "static", batch)
            out = None
            if run.budget_left() < need_s:
                results["errors"][f"gen_{path}"] = SKIPPED
            else:
                out = run.attempt(f"gen_{path}", bench_generate, model, batch, spec, run.timer, run.seed, **static)
                results["static_first_call_s"][path] = run.timer.first_s
                results["static_compiled"][path] = compiled(model)
            record_generate(results, out, name, "static", batch)
        dior_rate = results[key("gen_tokens_per_s", "dior", "static", batch)]
        results[key("gen_ratio", None, "static", batch)] = ratio(
            dior_rate, results[key("gen_tokens_per_s", "bart", "static", batch)])
        results[key("gen_ratio", None, "static_vs_eager_bart", batch)] = ratio(
            dior_rate, results.get(key("gen_tokens_per_s", "bart", None, batch)))


def record_headline(results, paths):
    """The batch-1 headline: the fastest Dior path through `generate()` ("default", "static") and its prior
    share; each path's figures under `bs1_candidates` and its own share."""
    prior_ms = results["prior_ms_bs1"]
    candidates = {}
    for path in paths:
        variant = None if path == "default" else path
        generate_ms = results[f"generate_ms_bs1_{path}"] = results.get(key("gen_ms", "dior", variant, 1))
        candidates[path] = {"tokens_per_s": results.get(key("gen_tokens_per_s", "dior", variant, 1)),
                            "prior_ms": prior_ms, "generate_ms": generate_ms}
        results[f"prior_share_{path}"] = ratio(prior_ms, generate_ms)
    usable = [path for path in paths if candidates[path]["tokens_per_s"]]
    best = max(usable, key=lambda path: candidates[path]["tokens_per_s"]) if usable else None
    results["bs1_path"] = best
    results["bs1_tokens_per_s"] = candidates[best]["tokens_per_s"] if best else None
    results["generate_ms_bs1"] = candidates[best]["generate_ms"] if best else None
    results["prior_share"] = ratio(prior_ms, results["generate_ms_bs1"])
    results["bs1_candidates"] = candidates


def run(args, spec=None, clock=time.perf_counter):
    """Every phase that `args` asks for; returns the results (the JSON's content). `spec` overrides the shapes and
    iteration counts of --tiny / the full run; `clock` is the timer's time source."""
    spec = spec or (TINY if args.tiny else FULL)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)  # Dior runs SDPA without cuDNN: give plain BART the same kernels
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: threads only contend
    current = Run(args, spec, clock)
    measure_training(current)
    if args.compile_train:
        measure_compiled_training(current)
    if not args.train_only:
        measure_generation(current)
        measure_prior(current)
        if args.fast:
            measure_static(current)
        record_headline(current.results, ("default", "static") if args.fast else ("default",))
    results = current.results
    results["goals"] = {k: goal_of(k) for k in GOALS}
    results["goals_met"] = {k: met(results.get(k), op, v) for k, (op, v) in GOALS.items()}
    results["wall_s"] = round(time.perf_counter() - current.started, 1)
    return results


def met(value, op, goal):
    if value is None:
        return None
    return bool(value >= goal) if op == ">=" else bool(value <= goal)


# ---- output -----------------------------------------------------------------------------------------------------


def table(results) -> str:
    """The run as text: one row per figure (BART, Dior, Dior/BART, goal), then the headline lines."""
    rows = [("metric", "BART", "Dior", "Dior/BART", "goal")]
    shapes = results["shapes"]

    def pair(label, metric, variant=None, batch=None, unit=None, goal="", digits=1, given_ratio=None):
        bart, dior = (results.get(key(metric, name, variant, batch, unit)) for name in MODELS)
        rows.append((label, fmt(bart, digits), fmt(dior, digits), fmt(given_ratio or ratio(dior, bart), 3), goal))

    for batch in shapes["train_batches"]:
        pair(f"train ex/s bs{batch}", "train_examples_per_s", batch=batch, goal=goal_of(f"train_ratio_bs{batch}"))
    for batch in shapes["train_batches"]:
        pair(f"  train GFLOP bs{batch} (BART/Dior: the ratio if matmul-bound)", "train_gflop", batch=batch,
             given_ratio=results.get(key("train_flop_ratio", batch=batch)))
        if key("train_gpu_busy", "dior", batch=batch) in results:
            pair(f"  train GPU busy bs{batch} (kernel time / step)", "train_gpu_busy", batch=batch, digits=2)
    for batch in shapes["train_batches"]:
        if key("train_examples_per_s", "dior", "compiled", batch) in results:
            pair(f"train ex/s bs{batch} compiled ({results['train_compile_mode']})", "train_examples_per_s",
                 "compiled", batch)
            rows.append((f"  Dior compiled / BART eager bs{batch}", "", "",
                         fmt(results.get(key("train_ratio", None, "compiled_vs_eager_bart", batch)), 3), ""))
            if key("train_kernel_ms", "dior", "compiled", batch) in results:
                pair(f"  compiled kernel ms/step bs{batch} (BART/Dior)", "train_kernel_ms", "compiled", batch,
                     digits=2, given_ratio=results.get(key("train_kernel_ratio", None, "compiled", batch)))
                pair(f"  compiled GPU busy bs{batch}", "train_gpu_busy", "compiled", batch, digits=2)
    for batch in shapes["gen_batches"]:
        pair(f"gen tok/s bs{batch}", "gen_tokens_per_s", batch=batch, goal=goal_of(f"gen_ratio_bs{batch}"))
        if key("gen_tokens_per_s", "dior", "hfloop", batch) in results:
            rows.append((f"  Dior through transformers' loop bs{batch}", "",
                         fmt(results[key("gen_tokens_per_s", "dior", "hfloop", batch)]),
                         fmt(results.get(key("gen_ratio", None, "hfloop", batch)), 3), ""))
    for batch in shapes["gen_batches"]:
        if key("gen_tokens_per_s", "dior", "static", batch) in results:
            pair(f"gen tok/s bs{batch} static", "gen_tokens_per_s", "static", batch)
            rows.append((f"  Dior static / BART eager bs{batch}", "", "",
                         fmt(results.get(key("gen_ratio", None, "static_vs_eager_bart", batch)), 3), ""))
    for batch in shapes["train_batches"]:
        pair(f"peak MiB train bs{batch}", "peak_mem_train", batch=batch, unit="mib")
    for batch in shapes["gen_batches"]:
        pair(f"peak MiB gen bs{batch}", "peak_mem_gen", batch=batch, unit="mib")
    default = results.get("prior_default", {})
    rows.append((f"prior ms bs1 ({default.get('sampler')}, {default.get('num_inference_steps')} steps)", "",
                 fmt(results.get("prior_ms_bs1"), 2), "", ""))
    for sampler, by_steps in results.get("prior_ms_bs1_sweep", {}).items():
        rows.append((f"prior ms bs1 {sampler} " + "/".join(by_steps) + " steps", "",
                     " / ".join(fmt(v, 2) for v in by_steps.values()), "", ""))

    met_ = results["goals_met"]
    lines = [common.format_table(rows), ""]
    lines.append("Dior batch-1 paths through generate(): " + "; ".join(
        f"{name} {fmt(c['tokens_per_s'])} tok/s (prior {fmt(c['prior_ms'], 2)} ms of {fmt(c['generate_ms'], 2)} ms)"
        for name, c in results.get("bs1_candidates", {}).items()))
    same = {k: v for k, v in results.items() if k.startswith("same_tokens_bs")}
    lines.append(f"default tokens == transformers' loop tokens (fraction of rows): {same}")
    if "static_compiled" in results:
        lines.append(f"static path compiled by transformers: {results['static_compiled']}")
    lines.append("prior_share: " + ", ".join(f"{path} {fmt(results[f'prior_share_{path}'], 4)}"
                                             for path in ("default", "static") if f"prior_share_{path}" in results))
    lines += [
        "",
        f"bs1_tokens_per_s (Dior, generate(), path={results.get('bs1_path')}): {fmt(results.get('bs1_tokens_per_s'))}"
        f"   goal {goal_of('bs1_tokens_per_s')}   met={met_.get('bs1_tokens_per_s')}",
        f"prior_share = prior_ms_bs1 {fmt(results.get('prior_ms_bs1'), 2)} / generate_ms_bs1 "
        f"{fmt(results.get('generate_ms_bs1'), 2)} = {fmt(results.get('prior_share'), 4)}   goal "
        f"{goal_of('prior_share')}   met={met_.get('prior_share')}",
        f"goals met: {met_}",
        f"device={results['device']} gpu={results['gpu']} dtype={results['dtype']} torch={results['torch']} "
        f"transformers={results['transformers']} tiny={results['tiny']} wall={results['wall_s']}s",
    ]
    epoch = results.get("dailydialog_epoch")
    if epoch:
        waste = epoch["padding_waste"]
        lines.append(
            f"DailyDialog epoch ({epoch['pairs']} pairs, batch {epoch['batch_size']}, {epoch['steps_per_epoch']} steps): "
            f"random {fmt(epoch.get('epoch_s_random_pad1'))} s (padding {waste['random_pad1']['total']:.0%}), "
            f"grouped+pad16 {fmt(epoch.get('epoch_s_grouped_pad16'))} s (padding {waste['grouped_pad16']['total']:.0%})")
    if results["errors"]:
        lines.append(f"errors: {results['errors']}")
    return "\n".join(lines)


def goal_of(name):
    op, value = GOALS.get(name, (None, None))
    return f"{op} {value}" if op else ""


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2.4]})
    names = ["train_ratio_bs64", "train_ratio_bs256", "gen_ratio_bs1", "gen_ratio_bs64", "gen_ratio_bs256"]
    colors = ["#4c72b0"] * 2 + ["#55a868"] * 3
    for batch in results["shapes"]["gen_batches"]:
        if key("gen_ratio", None, "static", batch) in results:
            names.append(key("gen_ratio", None, "static", batch))
            colors.append("#c44e52")
    values = [results.get(n) or 0 for n in names]
    bars = left.bar(range(len(names)), values, color=colors)
    for i, name in enumerate(names):
        if name in GOALS:
            left.hlines(GOALS[name][1], i - 0.4, i + 0.4, colors="red", linestyles="--")
    for bar, value in zip(bars, values):
        left.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(names)), [n.replace("_ratio_", "\n").replace("static_", "static\n") for n in names],
                    fontsize=7)
    left.set_ylabel("Dior / BART (same run)")
    left.axhline(1.0, color="grey", linewidth=0.5)
    left.set_title("throughput ratios (red: goal)")

    labels, rates = [], []
    for name, variant, label in (("bart", None, "BART eager"), ("dior", None, "Dior eager"),
                                 ("bart", "static", "BART static\n(+compile)"),
                                 ("dior", "static", "Dior static\n(+compile)")):
        if results.get(key("gen_tokens_per_s", name, variant, 1)):
            labels.append(label)
            rates.append(results[key("gen_tokens_per_s", name, variant, 1)])
    right.bar(range(len(rates)), rates, color="#8172b2")
    right.axhline(GOALS["bs1_tokens_per_s"][1], color="red", linestyle="--")
    right.set_xticks(range(len(rates)), labels, fontsize=7)
    right.set_ylabel("tokens/s at batch 1")
    share = results.get("prior_share")
    right.set_title(f"batch 1 (goal 1000 tok/s); prior share {share:.3f}" if share is not None else "batch 1")
    fig.suptitle(f"{results['gpu'] or results['device']}, {results['dtype']}{' (tiny)' if results['tiny'] else ''}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few iterations (CPU smoke run)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--output", default="results/speed.json")
    parser.add_argument("--plot", default=None, help="also draw a PNG, e.g. results/speed.png")
    parser.add_argument("--fast", action="store_true",
                        help='also measure generate(cache_implementation="static") (auto torch.compile on CUDA), '
                             "both models")
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
                        help="also estimate one DailyDialog epoch of the quality recipe (probes/epoch_estimate.py)")
    parser.add_argument("--epoch-data", default="/work/shared/data/dailydialog/plato/dial.train.reconstructed.gz")
    parser.add_argument("--epoch-tokenizer", default="/work/shared/data/tokenizer/bart-base")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = run(args)
    if args.epoch:  # padding waste with/without length grouping, and the epoch time from measured step times
        sys.path.insert(0, str(Path(__file__).resolve().parent / "probes"))
        import epoch_estimate

        try:
            with contextlib.redirect_stdout(sys.stderr):  # the table comes last on stdout
                results["dailydialog_epoch"] = epoch_estimate.main(
                    ["--data", args.epoch_data, "--tokenizer", args.epoch_tokenizer, "--measure",
                     "--device", results["device"]] + (["--small", "--limit", "2000", "--iters", "1"] if args.tiny else []))
        except Exception as error:
            results["errors"]["dailydialog_epoch"] = f"{type(error).__name__}: {error}"[:2000]
    results["complete"] = True
    write_json(results, args.output)
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
