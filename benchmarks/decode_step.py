"""Host-side cost of decoding through `generate()`: aten ops per new token (the CUDA-launch proxy) and wall time.

    python benchmarks/decode_step.py                    # CPU, bart-base layer counts, d_model 64, batch 8
    python benchmarks/decode_step.py --output ops.json  # also write the numbers as JSON

On a GPU, sampled decoding at batch 1-256 is host-bound (docs/performance.md): what a step costs is the number of
kernels it launches. This counts, on the CPU, the aten ops (view/metadata ops left out, as in
`benchmarks/train_step.py`) of two `generate()` calls that differ only in `max_new_tokens` (N and 2N, the same
seed): their difference over N is the cost of one decoding step, without the encoder, the prior and the set-up.
BART and Dior-CVAE of the same shape are counted in one run; the context has padding (as in any real batch).
Wall time: the median of `--iters` whole `generate()` calls of 2N tokens, 1 thread; at the default tiny width the
CPU does almost no arithmetic, so this is the host's own cost (Python, dispatch), which is what bounds a GPU here.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import OpCounter  # noqa: E402
from transformers import BartConfig, BartForConditionalGeneration  # noqa: E402

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration  # noqa: E402


def build(args, dior: bool):
    shape = dict(vocab_size=args.vocab_size, d_model=args.d_model, encoder_layers=args.layers,
                 decoder_layers=args.layers, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model, max_position_embeddings=256)
    torch.manual_seed(args.seed)
    model = (DiorCVAEForConditionalGeneration(DiorCVAEConfig(**shape, latent_size=16)) if dior
             else BartForConditionalGeneration(BartConfig(**shape)))
    model.set_attn_implementation("sdpa")
    model.generation_config = type(model.generation_config)(
        decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1, forced_bos_token_id=0
    )
    return model.eval()


def count_generate(model, batch, new_tokens: int, args) -> int:
    torch.manual_seed(args.seed)
    with OpCounter() as counter:
        out = model.generate(**batch, do_sample=True, top_k=50, top_p=0.9, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, cache_implementation=args.cache)
    assert out.shape[1] >= new_tokens, out.shape  # no early stop: the difference is N whole steps
    return counter.total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--layers", type=int, default=6, help="encoder and decoder layers (bart-base: 6)")
    p.add_argument("--vocab_size", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--source", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="N: the two calls make N and 2N new tokens")
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--iters", type=int, default=5, help="timed generate() calls per model (0: count ops only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(4, args.vocab_size, (args.batch, args.source), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[: args.batch // 2, args.source // 2 :] = 0  # half the rows padded
    batch = dict(input_ids=input_ids.masked_fill(attention_mask == 0, 1), attention_mask=attention_mask)
    result = {"shape": dict(d_model=args.d_model, layers=args.layers, batch=args.batch, source=args.source),
              "cache": args.cache, "torch": torch.__version__}
    for name, dior in (("bart", False), ("dior", True)):
        model = build(args, dior)
        short, long = (count_generate(model, batch, n, args) for n in (args.steps, 2 * args.steps))
        result[f"ops_per_step_{name}"] = (long - short) / args.steps
        result[f"ops_setup_{name}"] = short - args.steps * result[f"ops_per_step_{name}"]
        result[f"ops_total_{name}"] = long
        times = []
        for _ in range(args.iters):
            torch.manual_seed(args.seed)
            start = time.perf_counter()
            model.generate(**batch, do_sample=True, top_k=50, top_p=0.9, max_new_tokens=2 * args.steps,
                           min_new_tokens=2 * args.steps, cache_implementation=args.cache)
            times.append(time.perf_counter() - start)
        result[f"generate_ms_{name}"] = statistics.median(times) * 1e3 if times else None
    result["ops_per_step_ratio"] = result["ops_per_step_dior"] / result["ops_per_step_bart"]
    result["ops_total_ratio"] = result["ops_total_bart"] / result["ops_total_dior"]  # BART / Dior: as a speed ratio
    if args.iters:
        result["generate_speed_ratio"] = result["generate_ms_bart"] / result["generate_ms_dior"]
    print(json.dumps(result, indent=2))
    print("\n| | BART | Dior | Dior / BART |\n|---|---|---|---|")
    print(f"| aten ops per decoding step ({args.cache} cache) | {result['ops_per_step_bart']:.0f} | "
          f"{result['ops_per_step_dior']:.0f} | {result['ops_per_step_ratio']:.2f} |")
    print(f"| aten ops outside the steps | {result['ops_setup_bart']:.0f} | {result['ops_setup_dior']:.0f} | |")
    print(f"| aten ops, {2 * args.steps} new tokens (speed ratio = BART / Dior) | {result['ops_total_bart']} | "
          f"{result['ops_total_dior']} | {result['ops_total_ratio']:.2f} |")
    if args.iters:
        print(f"| generate() ms, {2 * args.steps} new tokens (speed ratio) | {result['generate_ms_bart']:.1f} | "
              f"{result['generate_ms_dior']:.1f} | {result['generate_speed_ratio']:.2f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
