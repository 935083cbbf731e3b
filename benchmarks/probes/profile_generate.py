"""Where the time of one sampled `generate()` goes, BART against Dior-CVAE (bart-base shapes, one CUDA GPU).

    python benchmarks/probes/profile_generate.py --output OUT.json

For each batch size and model (the models and batches of `benchmarks/bench.py`, bf16, 40 new tokens, top-k 50 /
top-p 0.9): the mean wall time of 5 calls after 3 warm-up calls; then one call under
`torch.cuda.set_sync_debug_mode("warn")`, which names every source line that synchronised the host with the GPU, and
one call under `torch.profiler`: kernel launches, GPU busy time, host (self CPU) time, and the aten ops with the most
host time. The numbers say whether a call is bound by the host (GPU busy ≪ wall) and by what. Prints a table last.
"""

import argparse
import collections
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import common  # noqa: E402
from common import write_json  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def profile_call(model, context, mask, kwargs, top):
    with torch.no_grad():
        for _ in range(3):
            model.generate(context, attention_mask=mask, **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            model.generate(context, attention_mask=mask, **kwargs)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) / 5 * 1e3
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.generate(context, attention_mask=mask, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model.generate(context, attention_mask=mask, **kwargs)
            torch.cuda.synchronize()
    events = prof.key_averages()
    sites = collections.Counter(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught)
    aten = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    return {
        "wall_ms": wall_ms,
        "kernel_launches": sum(e.count for e in events if e.key in LAUNCHES),
        "gpu_busy_ms": sum(e.self_device_time_total for e in events
                           if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3,
        "host_self_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
        "syncs": sum(sites.values()),
        "sync_sites": dict(sites.most_common()),
        "top_aten_by_host_time": [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                                   "self_cpu_us_per_call": e.self_cpu_time_total / max(e.count, 1)}
                                  for e in aten[:top]],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated")
    parser.add_argument("--top", type=int, default=15, help="aten ops listed per call")
    parser.add_argument("--output", required=True, help="JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_generate.py: needs a CUDA GPU (it profiles kernel launches and host syncs)")
    torch.backends.cuda.matmul.allow_tf32 = True
    spec, device = bench.FULL, torch.device("cuda")
    bart, dior = common.build_models(spec["shape"], 0, device, torch.bfloat16)
    kwargs = bench.generation_kwargs(spec)
    results = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "transformers": transformers.__version__, "generation": kwargs, "calls": {}}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        inputs = bench.batch_of(batch, spec, device, seed=0)
        context, mask = inputs["input_ids"], inputs["attention_mask"]
        for name, model in (("bart", bart), ("dior", dior)):
            results["calls"][f"{name}_bs{batch}"] = profile_call(model, context, mask, kwargs, args.top)
    write_json(results, args.output)
    print(common.format_table([("call", "wall ms", "launches", "GPU busy ms", "host ms", "syncs")] + [
        (name, f"{row['wall_ms']:.1f}", row["kernel_launches"], f"{row['gpu_busy_ms']:.1f}",
         f"{row['host_self_cpu_ms']:.1f}", row["syncs"]) for name, row in results["calls"].items()]))


if __name__ == "__main__":
    main()
