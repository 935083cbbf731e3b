"""Host-side cost of Dior-CVAE against BART of the same shape: aten ops (the CUDA-launch proxy) and wall time at a
width where the CPU does almost no arithmetic, for one training step and for decoding through `generate()`.

    python benchmarks/probes/host_cost.py                          # d_model 32/64, bart-base layer counts, 1 thread
    python benchmarks/probes/host_cost.py --output results/host_cost_cpu.json

On a GPU, training at the quality recipe's size and sampled decoding at batch 1-256 are host-bound
(docs/performance.md): a step costs what the host spends launching it (Python, dispatch, one launch per kernel), not
its FLOPs. Both are measured here on the CPU, on tiny widths where the arithmetic is negligible:
- aten ops, counted with a `TorchDispatchMode` (view/metadata ops apart, as in `benchmarks/probes/train_step.py`; the
  decoding step's are reported too: they launch no kernel but cost host time):
  training forward + backward; decoding as the difference of two `generate()` calls of N and 2N new tokens under the
  same seed, over N (one decoding step), and the rest of the 2N-token call (encoder, prior, set-up);
- wall time: the minimum over `--iters` calls, BART and Dior interleaved (the minimum, because a shared host adds
  noise to any one call, never takes it away).
Ratios are BART / Dior, as speed ratios (1 = as fast as BART). The context batch has padding, as real batches do.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from common import OpCounter, write_json  # noqa: E402


def build(name: str, d_model: int, layers: int, vocab_size: int, seed: int, train: bool):
    shape = dict(vocab_size=vocab_size, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * d_model,
                 decoder_ffn_dim=4 * d_model, max_position_embeddings=256)
    # the denoiser as narrow as the rest (its default width, 512, is real arithmetic for a CPU)
    dior_kwargs = dict(latent_size=16, denoiser_hidden_size=d_model) if name == "dior" else {}
    model = common.build_model(name, shape, seed, **dior_kwargs)
    model.generation_config = type(model.generation_config)(
        decoder_start_token_id=2, bos_token_id=0, eos_token_id=2, pad_token_id=1, forced_bos_token_id=0
    )
    return model.train(train)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6, help="encoder and decoder layers (bart-base: 6)")
    p.add_argument("--vocab_size", type=int, default=1000)
    p.add_argument("--train_d_model", type=int, default=32)
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--train_source", type=int, default=16)
    p.add_argument("--train_target", type=int, default=8)
    p.add_argument("--decode_d_model", type=int, default=64)
    p.add_argument("--decode_batch", type=int, default=8)
    p.add_argument("--decode_source", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="N: the decoding op count compares N and 2N new tokens")
    p.add_argument("--iters", type=int, default=40, help="timed calls per model and measurement (0: ops only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = ("bart", "dior")
    train_models = {n: build(n, args.train_d_model, args.layers, args.vocab_size, args.seed, True) for n in names}
    decode_models = {n: build(n, args.decode_d_model, args.layers, args.vocab_size, args.seed, False) for n in names}
    train_batch = common.token_batch(args.train_batch, args.train_source, args.train_target, args.vocab_size,
                                     args.seed, padded=True)
    decode_batch = common.token_batch(args.decode_batch, args.decode_source, 2, args.vocab_size, args.seed,
                                      padded=True)
    del decode_batch["labels"]

    def train_step(model):
        model(**train_batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def generate(model, new_tokens):
        torch.manual_seed(args.seed)
        out = model.generate(**decode_batch, do_sample=True, top_k=50, top_p=0.9, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens)
        assert out.shape[1] >= new_tokens, out.shape  # no early stop: the difference is N whole steps

    result = {"shape": {k: v for k, v in vars(args).items() if k not in ("output", "iters", "seed")},
              "threads": 1, "torch": torch.__version__}
    for name in names:
        train_step(train_models[name])  # warm-up
        with OpCounter() as counter:
            train_step(train_models[name])
        result[f"train_ops_{name}"] = counter.total
        counts, views = [], []
        for new_tokens in (args.steps, 2 * args.steps):
            with OpCounter() as counter:
                generate(decode_models[name], new_tokens)
            counts.append(counter.total)
            views.append(sum(counter.view_counts.values()))
        result[f"decode_ops_per_step_{name}"] = (counts[1] - counts[0]) / args.steps
        result[f"decode_view_ops_per_step_{name}"] = (views[1] - views[0]) / args.steps
        result[f"decode_ops_outside_steps_{name}"] = counts[1] - 2 * args.steps * result[f"decode_ops_per_step_{name}"]
        result[f"generate_ops_{name}"] = counts[1]
    best = {f"{what}_{n}": float("inf") for what in ("train_ms", "generate_ms") for n in names}
    for _ in range(args.iters):
        for name in names:
            start = time.perf_counter()
            train_step(train_models[name])
            best[f"train_ms_{name}"] = min(best[f"train_ms_{name}"], (time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            generate(decode_models[name], 2 * args.steps)
            best[f"generate_ms_{name}"] = min(best[f"generate_ms_{name}"], (time.perf_counter() - start) * 1e3)
    if args.iters:
        result.update(best)
    rows = [("training step (fwd + bwd): aten ops", "train_ops"),
            ("decoding step: aten ops", "decode_ops_per_step"),
            ("decoding step: view / metadata ops (no kernel)", "decode_view_ops_per_step"),
            (f"generate(), {2 * args.steps} new tokens: aten ops", "generate_ops")]
    if args.iters:
        rows += [("training step (fwd + bwd): ms, min", "train_ms"),
                 (f"generate(), {2 * args.steps} new tokens: ms, min", "generate_ms")]
    for _, key in rows:
        result[f"{key}_ratio"] = result[f"{key}_bart"] / result[f"{key}_dior"]
    print(json.dumps(result, indent=2))
    print("\n| host cost (CPU, 1 thread, tiny width) | BART | Dior | speed ratio BART / Dior |\n|---|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {result[f'{key}_bart']:,.1f} | {result[f'{key}_dior']:,.1f} | {result[f'{key}_ratio']:.2f} |")
    write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
