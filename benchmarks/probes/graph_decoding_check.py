"""Dior's default `generate()` against transformers' own loop (`disable_compile=True`) on one GPU: the fraction of
rows with the same tokens (bart-base shapes, bf16, random init, given latents, same seed; batch 64 and 1) and the
default path's sampled tokens/s (batch 1 and 64). Prints a table, writes JSON. CUDA only (on the CPU both paths are
transformers' loop).

    python benchmarks/probes/graph_decoding_check.py --output OUT.json
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from bench import FULL, bench_generate, same_tokens  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("graph_decoding_check.py needs a CUDA device: on the CPU the default path is transformers' loop")
    device = torch.device("cuda")
    dior = common.build_model("dior", FULL["shape"], 0, device, torch.bfloat16)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for batch in (64, 1):
        results[f"same_tokens_bs{batch}"] = same_tokens(dior, batch, FULL, device, 0, disable_compile=True)
    timer = common.Timer(device)
    for batch in (1, 64):
        results[f"gen_tokens_per_s_dior_bs{batch}"] = bench_generate(dior, batch, FULL, timer, 0)[0]
    common.write_json(results, args.output)
    print(common.format_table([("batch", "same tokens", "tokens/s")] + [
        (batch, f"{results[f'same_tokens_bs{batch}']:.4f}", common.fmt(results[f"gen_tokens_per_s_dior_bs{batch}"]))
        for batch in (1, 64)]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
