"""One DailyDialog epoch with the quality recipe's shapes: padding waste with and without length grouping, and the
epoch time estimated as the sum of per-batch step times.

    python benchmarks/probes/epoch_estimate.py --data /work/shared/data/dailydialog/plato/dial.train.reconstructed.gz \\
        --tokenizer /work/shared/data/tokenizer/bart-base                 # padding only (seconds, CPU)
    python benchmarks/probes/epoch_estimate.py ... --measure                     # + step times of the recipe model (GPU)

The pairs (PLATO format: `context turns joined by __eou__ <TAB> response`) are tokenised as examples/train.py
does (BART tokenizer, `</s>` between turns, source left-truncated to 256, target to 64). Batches are formed as
train.py forms them: a seeded shuffle (`--no_group_by_length`) or `LengthGroupedSampler` (default), each padded to
its longest row, optionally rounded up to a multiple of `--pad_to_multiple_of`. Padding waste = padded tokens that
are padding, for the source (encoder), the target (decoder) and both.

With `--measure`, the training step (forward + backward + AdamW) of Dior-CVAE with the quality recipe shape
(experiments/dailydialog_experiments.py: d_model 512, 6+6 layers, FFN 2048, latent 32, diffusion prior) is timed at a
few padded shapes; a fit t(S, T) = a + b·S + c·T gives every batch's time, and their sum is the epoch estimate.
"""

import argparse
import gzip
import json
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from common import write_json  # noqa: E402

from dior_cvae.training.data import LengthGroupedSampler, encode_examples, load_bart_tokenizer_files  # noqa: E402

RECIPE = dict(vocab_size=50265, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
              decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=320,
              latent_size=32, prior_type="diffusion")


def read_pairs(path, limit=None):
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            context, response = line.rstrip("\n").split("\t")
            turns = [t.strip() for t in context.split("__eou__") if t.strip()]
            pairs.append({"context": turns, "response": response.strip()})
            if limit and len(pairs) >= limit:
                break
    return pairs


def batches_of(lengths, batch_size, group, seed, multiple):
    if group:
        keys = [(-(-s // (multiple or 1)), t) for s, t in lengths]
        return LengthGroupedSampler(keys, batch_size, seed=seed).batches()
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_shapes(batches, lengths, multiple):
    def rounded(n):
        return -(-n // multiple) * multiple if multiple else n

    return [(len(b), rounded(max(lengths[i][0] for i in b)), rounded(max(lengths[i][1] for i in b))) for b in batches]


def waste(shapes, lengths):
    real_s, real_t = sum(s for s, _ in lengths), sum(t for _, t in lengths)
    pad_s, pad_t = sum(n * s for n, s, _ in shapes), sum(n * t for n, _, t in shapes)
    return dict(source=1 - real_s / pad_s, target=1 - real_t / pad_t, total=1 - (real_s + real_t) / (pad_s + pad_t),
                distinct_shapes=len({(s, t) for _, s, t in shapes}))


def step_time_fit(batch_size, points, device, dtype, iters, shape):
    import torch

    model = common.build_model("dior", shape, 0, device, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    timer = common.Timer(device)
    measured = []
    for source, target in points:
        batch = common.token_batch(batch_size, source, target, shape["vocab_size"], 0, device)

        def step():
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        measured.append((source, target, timer.median(step, 2, iters)))
    # least squares t = a + b S + c T
    a_rows = torch.tensor([[1.0, s, t] for s, t, _ in measured], dtype=torch.float64)
    y = torch.tensor([[m] for *_, m in measured], dtype=torch.float64)
    coef = torch.linalg.lstsq(a_rows, y).solution.flatten().tolist()
    return coef, measured


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/shared/data/dailydialog/plato/dial.train.reconstructed.gz")
    p.add_argument("--tokenizer", default="/work/shared/data/tokenizer/bart-base")
    p.add_argument("--batch_size", type=int, default=96)
    p.add_argument("--max_source_length", type=int, default=256)
    p.add_argument("--max_target_length", type=int, default=64)
    p.add_argument("--pad_to_multiple_of", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    p.add_argument("--measure", action="store_true", help="time training steps and estimate the epoch time")
    p.add_argument("--small", action="store_true", help="with --measure: d_model 256, 4+4 layers (a CPU run)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)

    tokenizer = load_bart_tokenizer_files(args.tokenizer)
    pairs = read_pairs(args.data, args.limit)
    encoded = encode_examples(tokenizer, pairs, args.max_source_length, args.max_target_length, tokenizer.eos_token,
                              show_progress=False)
    lengths = [(len(e["input_ids"]), len(e["labels"])) for e in encoded]
    result = {"pairs": len(pairs), "batch_size": args.batch_size, "steps_per_epoch": math.ceil(len(pairs) / args.batch_size),
              "mean_source_tokens": statistics.mean(s for s, _ in lengths),
              "mean_target_tokens": statistics.mean(t for _, t in lengths),
              "max_source_tokens": max(s for s, _ in lengths), "max_target_tokens": max(t for _, t in lengths),
              "padding_waste": {}}
    shapes = {}
    for group in (False, True):
        for multiple in (None, args.pad_to_multiple_of):
            name = f"{'grouped' if group else 'random'}_pad{multiple or 1}"
            shapes[name] = padded_shapes(batches_of(lengths, args.batch_size, group, args.seed, multiple), lengths,
                                         multiple)
            result["padding_waste"][name] = waste(shapes[name], lengths)

    if args.measure:
        import torch

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        shape = dict(RECIPE, d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024) if args.small else RECIPE
        points = [(32, 16), (128, 32), (256, 64), (64, 48)]
        coef, measured = step_time_fit(args.batch_size, points, device, dtype, args.iters, shape)
        result["step_time_fit_s"] = dict(zip(("a", "per_source_token", "per_target_token"), coef))
        result["step_time_points"] = [dict(source=s, target=t, seconds=m) for s, t, m in measured]
        result["model_shape"] = shape
        result["device"], result["dtype"] = str(device), str(dtype)
        for name, batch_shapes in shapes.items():  # a partial last batch is counted as a full one
            result[f"epoch_s_{name}"] = sum(coef[0] + coef[1] * s + coef[2] * t for _, s, t in batch_shapes)

    print(json.dumps(result, indent=2))
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
