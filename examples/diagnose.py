#!/usr/bin/env python
"""Latent diagnostics of a trained Dior-CVAE on a DailyDialog split: active units, KL per layer, mutual information,
prior/posterior latent norm ratio, and a PNG of prior against posterior latents (see `dior_cvae.diagnostics`).

    python examples/diagnose.py --model_name_or_path outputs/dior --dataset_dir DIR --split validation \\
        --max_samples 2000 --output diag.json --plot diag.png
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from dior_cvae import DiorCVAEForConditionalGeneration
from dior_cvae.data import encode_examples, load_dailydialog_dir
from dior_cvae.diagnostics import latent_statistics, plot_latents


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    p.add_argument("--max_samples", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=500, help="also the batch of the mutual-information estimate")
    p.add_argument("--num_inference_steps", type=int, default=None, help="prior steps (default: the config's)")
    p.add_argument("--prior_sampler", choices=["dpmsolver++", "ddim", "ddpm"], help="default: the config's")
    p.add_argument("--max_source_length", type=int, default=256)
    p.add_argument("--max_target_length", type=int, default=64)
    p.add_argument("--output", required=True, help="JSON file for the diagnostics")
    p.add_argument("--plot", help="PNG of prior vs posterior latents")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not Path(args.model_name_or_path).is_dir():
        raise SystemExit(f"diagnose.py: error: --model_name_or_path: no such folder: {args.model_name_or_path}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DiorCVAEForConditionalGeneration.from_pretrained(args.model_name_or_path).to(device).eval()
    if args.prior_sampler:
        model.config.sampler = args.prior_sampler
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    examples = load_dailydialog_dir(args.dataset_dir, splits=[args.split])[args.split][: args.max_samples]
    encoded = encode_examples(tokenizer, examples, args.max_source_length, args.max_target_length, show_progress=False)
    collator = DataCollatorForSeq2Seq(tokenizer)
    batches = [collator(encoded[i : i + args.batch_size]) for i in range(0, len(encoded), args.batch_size)]
    torch.manual_seed(args.seed)
    stats = latent_statistics(model, batches, args.num_inference_steps,
                              generator=torch.Generator(device).manual_seed(args.seed))
    if args.plot:
        plot_latents(stats, args.plot, title=Path(args.model_name_or_path).name)
    summary = {k: v for k, v in stats.items() if not k.endswith("_pca")}
    summary.update(model=args.model_name_or_path, split=args.split, prior_type=model.config.prior_type,
                   sampler=model.config.sampler, num_inference_steps=args.num_inference_steps or model.config.num_inference_steps)
    text = json.dumps(summary, indent=2, allow_nan=True)
    Path(args.output).write_text(text + "\n")
    print(text)
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"diagnose.py: non-finite {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()
