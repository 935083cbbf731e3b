"""Host-side cost of one Dior-CVAE training step: aten ops per step (the CUDA-launch proxy) and step time.

    python benchmarks/probes/train_step.py                     # CPU, d_model 256, 4+4 layers, batch 32, source 128, target 32
    python benchmarks/probes/train_step.py --bart              # the same for plain BART of that shape
    python benchmarks/probes/train_step.py --output ops.json   # also write the numbers as JSON

On a GPU the training step is host-bound (docs/performance.md): the number of kernels launched per step matters more
than their FLOPs. On the CPU that number is approximated by counting the aten ops that the dispatcher runs in
forward + backward (and, separately, in the AdamW step), leaving out pure view/metadata ops (`view`, `select`,
`transpose`, `expand`, ...), which launch no kernel. Step time = median wall time of forward + backward + AdamW
(foreach) on random full-length token batches, fp32, dropout as in bart-base.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from common import OpCounter, write_json  # noqa: E402

SMALL = dict(vocab_size=50265, d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=256)


def build(args):
    shape = dict(SMALL, vocab_size=args.vocab_size, d_model=args.d_model, encoder_layers=args.layers,
                 decoder_layers=args.layers, encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model)
    if args.bart:
        return common.build_model("bart", shape, args.seed).train()
    return common.build_model("dior", shape, args.seed, latent_size=args.latent_size,
                              prior_type=args.prior_type).train()


def measure(args):
    torch.set_num_threads(args.threads)
    model = build(args)
    batch = common.token_batch(args.batch, args.source, args.target, model.config.vocab_size, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

    def forward_backward():
        model(**batch).loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: AdamW state exists from here on
    with OpCounter() as fwd_bwd:
        forward_backward()
    with OpCounter() as opt:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    matmuls = sum(fwd_bwd.counts[k] for k in ("addmm", "mm", "bmm", "baddbmm"))

    for _ in range(args.warmup if args.iters else 0):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "model": "bart" if args.bart else f"dior-{args.prior_type}",
        "shape": dict(d_model=args.d_model, layers=args.layers, vocab_size=args.vocab_size, batch=args.batch,
                      source=args.source, target=args.target, latent_size=args.latent_size),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "param_tensors": sum(1 for _ in model.parameters()),
        "ops_forward_backward": fwd_bwd.total,
        "matmul_ops_forward_backward": matmuls,
        "ops_optimizer_step": opt.total,
        "ops_per_step": fwd_bwd.total + opt.total,
        "step_ms_median": statistics.median(times) * 1e3 if times else None,
        "step_ms_min": min(times) * 1e3 if times else None,
        "iters": args.iters,
        "top_ops": dict(fwd_bwd.counts.most_common(args.top)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bart", action="store_true", help="plain BART of the same shape instead of Dior-CVAE")
    p.add_argument("--prior_type", default="diffusion", choices=["diffusion", "gaussian", "standard"])
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=50265)
    p.add_argument("--latent_size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--source", type=int, default=128)
    p.add_argument("--target", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=8, help="timed steps (0: count ops only)")
    p.add_argument("--top", type=int, default=15, help="how many of the most frequent ops to list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=2))
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
