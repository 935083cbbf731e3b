#!/usr/bin/env python
"""Latent diagnostics of a trained Dior-CVAE on a DailyDialog split: active units, KL per layer, mutual information,
prior/posterior latent norm ratio, and a PNG of prior against posterior latents (see `dior_cvae.training.diagnostics`).

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
from dior_cvae.training.data import encode_examples, load_dailydialog_dir
from dior_cvae.training.diagnostics import latent_statistics, plot_latents


def diagnose(model_name_or_path, dataset_dir, split="validation", max_samples=2000, batch_size=500,
             num_inference_steps=None, prior_sampler=None, max_source_length=256, max_target_length=64, plot=None,
             seed=0) -> dict:
    """The diagnostics of `dior_cvae.training.diagnostics.latent_statistics` for a saved model on a DailyDialog split (the
    first `max_samples` pairs), as a JSON-ready dict; with `plot`, also the PNG of prior against posterior latents."""
    if not Path(model_name_or_path).is_dir():
        raise SystemExit(f"diagnose.py: error: --model_name_or_path: no such folder: {model_name_or_path}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = DiorCVAEForConditionalGeneration.from_pretrained(model_name_or_path).to(device).eval()
    if not model.config.has_latent:
        raise SystemExit(f"diagnose.py: error: {model_name_or_path} has no latent (prior_type \"none\")")
    if prior_sampler:
        model.config.sampler = prior_sampler
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    examples = load_dailydialog_dir(dataset_dir, splits=[split])[split][:max_samples]
    positions = model.config.max_position_embeddings  # a longer context would index past the position table
    encoded = encode_examples(tokenizer, examples, min(max_source_length, positions),
                              min(max_target_length, positions), show_progress=False)
    collator = DataCollatorForSeq2Seq(tokenizer)
    batches = [collator(encoded[i : i + batch_size]) for i in range(0, len(encoded), batch_size)]
    torch.manual_seed(seed)
    stats = latent_statistics(model, batches, num_inference_steps, generator=torch.Generator(device).manual_seed(seed))
    if plot:
        plot_latents(stats, plot, title=Path(model_name_or_path).name)
    summary = {k: v for k, v in stats.items() if not k.endswith("_pca")}
    summary.update(model=str(model_name_or_path), split=split, prior_type=model.config.prior_type,
                   sampler=model.config.sampler, num_inference_steps=num_inference_steps or model.config.num_inference_steps,
                   mutual_information_max=math.log(min(batch_size, len(encoded))))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    p.add_argument("--max_samples", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=500,
                   help="also the batch of the mutual-information estimate, which cannot exceed log(batch_size)")
    p.add_argument("--num_inference_steps", type=int, default=None, help="prior steps (default: the config's)")
    p.add_argument("--prior_sampler", choices=["dpmsolver++", "ddim", "ddpm"], help="default: the config's")
    p.add_argument("--max_source_length", type=int, default=256)
    p.add_argument("--max_target_length", type=int, default=64)
    p.add_argument("--output", required=True, help="JSON file for the diagnostics")
    p.add_argument("--plot", help="PNG of prior vs posterior latents")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = diagnose(args.model_name_or_path, args.dataset_dir, args.split, args.max_samples, args.batch_size,
                       args.num_inference_steps, args.prior_sampler, args.max_source_length, args.max_target_length,
                       args.plot, args.seed)
    text = json.dumps(summary, indent=2, allow_nan=True)
    Path(args.output).write_text(text + "\n")
    print(text)
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"diagnose.py: non-finite {bad}", file=sys.stderr)


if __name__ == "__main__":
    main()
