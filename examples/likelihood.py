"""Negative log-likelihood per response of a trained model: importance-weighted for a latent model, exact for the
plain seq2seq (`dior_cvae.training.likelihood`: for the diffusion prior through the VDM bound, an upper bound).

    python examples/likelihood.py --model_name_or_path DIR (--dataset_dir DIR --split test | --input_file F.jsonl) \\
        --num_samples 50 --output nll.json

`--input_file` rows are {"context": [turns], "reference" (or "response"): str | [str]}: every reference is one
response (a DailyDialog++ context with 5 references gives 5). Writes (and prints) one JSON object: estimator,
num_samples, responses, tokens, nll_per_response, neg_elbo_per_response, nll_per_token (nats).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dior_cvae.training.data import DataFormatError, load_dailydialog_dir


def load_pairs(args) -> list[dict]:
    """(context, response) examples: every reference of an --input_file row, or the DailyDialog split's pairs."""
    if args.input_file:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from generate import read_input_file  # the same reader as generation: one format for both

        try:
            rows = read_input_file(args.input_file)
        except DataFormatError as exc:
            raise SystemExit(f"likelihood.py: error: {exc}") from None
        if args.max_samples is not None:
            rows = rows[: args.max_samples]
        missing = [i for i, row in enumerate(rows) if row.get("reference") is None]
        if missing:
            raise SystemExit(f"likelihood.py: error: --input_file {args.input_file}: row {missing[0] + 1} has no "
                             f"reference ({len(missing)} rows without one): the likelihood needs a response")
        return [{"context": row["context"], "persona": row.get("persona") or [], "response": ref}
                for row in rows for ref in ([row["reference"]] if isinstance(row["reference"], str) else row["reference"])]
    pairs = load_dailydialog_dir(args.dataset_dir, splits=[args.split])[args.split]
    return pairs[: args.max_samples] if args.max_samples is not None else pairs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset_dir")
    src.add_argument("--input_file")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max_samples", type=int, help="only the first N contexts (--input_file) or pairs (--dataset_dir)")
    p.add_argument("--num_samples", type=int, default=50, help="posterior samples K per response (>= 50 recommended)")
    p.add_argument("--samples_per_pass", type=int, default=None, help="posterior samples decoded per pass (memory)")
    p.add_argument("--prior_bound_samples", type=int, default=1,
                   help="diffusion prior: evaluations of each latent's bound on -log p(z | c) averaged (each already "
                        "averages 16 stratified noise levels)")
    p.add_argument("--batch_size", type=int, default=16, help="responses per pass")
    p.add_argument("--max_source_length", type=int, default=256)
    p.add_argument("--max_target_length", type=int, default=64)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", help="write the JSON here too")
    args = p.parse_args(argv)
    for name in ("num_samples", "prior_bound_samples", "batch_size", "max_source_length", "max_target_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_samples is not None and args.max_samples < 1:
        p.error(f"--max_samples must be >= 1, got {args.max_samples}")

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from dior_cvae.training.likelihood import corpus_nll

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pairs = load_pairs(args)
    if not pairs:
        raise SystemExit("likelihood.py: error: no (context, response) pairs")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForSeq2SeqLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    except Exception as exc:
        raise SystemExit(f"likelihood.py: error: cannot load {args.model_name_or_path}: {type(exc).__name__}: {exc}") from None
    model.to(device).eval()
    started = time.perf_counter()
    result = corpus_nll(model, tokenizer, pairs, num_samples=args.num_samples, batch_size=args.batch_size,
                        samples_per_pass=args.samples_per_pass, prior_bound_samples=args.prior_bound_samples,
                        max_source_length=args.max_source_length, max_target_length=args.max_target_length,
                        seed=args.seed, show_progress=True)
    result.update(model=args.model_name_or_path, source=args.input_file or f"{args.dataset_dir}:{args.split}",
                  seconds=round(time.perf_counter() - started, 1))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
