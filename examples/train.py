#!/usr/bin/env python
"""Train Dior-CVAE on dialog data with 🤗 Accelerate (flags and habits of transformers'
`run_summarization_no_trainer.py`).

    accelerate launch examples/train.py            # no arguments: a ~4-minute CPU demo on the shipped
    python examples/train.py                       #   DailyDialog sample (from scratch, trained tokenizer)

    accelerate launch examples/train.py \\
        --model_name_or_path facebook/bart-base --dataset_dir path/to/ijcnlp_dailydialog \\
        --learning_rate 5e-4 --lr_scheduler_type inverse_sqrt --num_warmup_steps 20000 \\
        --kl_annealing linear --kl_annealing_steps 20000 --per_device_train_batch_size 32 \\
        --checkpointing_steps 5000 --eval_steps 5000 --with_tracking --output_dir outputs/dior-dd

Data (one source): `--dataset_name daily_dialog` (Hub, via `datasets`), `--dataset_dir DIR` (ijcnlp DailyDialog
files, plain or .gz), `--dataset_name personachat [--personachat_dir DIR]` (ParlAI files, or the Hub), any other
`--dataset_name` Hub id, or `--train_file/--validation_file/--test_file`: JSON Lines ({"context": [...], "response":
"...", "persona": [...]}, read without `datasets`) or JSON / CSV (read with `datasets`). Column names:
`--context_column/--response_column/--persona_column`; a string context holds turns separated by `__eou__`.
Model: `--model_name_or_path` (a BART checkpoint → `from_bart`, or a Dior-CVAE folder), or from scratch with
`--config_name` / `--config_overrides "d_model=256,encoder_layers=4,latent_size=16,prior_type=gaussian"`.

Outputs in `--output_dir`: the final model + tokenizer (loadable with `trust_remote_code=True`), README.md (model
card), eval_results.json, log_history.jsonl, training_args.json, training_curves.png, run.json (this run's id),
`best/` (lowest finite validation loss, or the best `--metric_for_best_model`), `step_N/` or `epoch_N/` checkpoints (accelerate state for exact resume + a
`pretrained/` model folder), `runs/` (TensorBoard).

Safety: a non-empty `--output_dir` is refused unless `--resume_from_checkpoint` or `--overwrite_output_dir` is given
(which writes into it and deletes nothing). Checkpoints are written to a hidden temporary folder, then renamed; their
trainer_state.json lists every file's size and sha256 and the run id, so `--resume_from_checkpoint latest` takes the
newest intact checkpoint of this run (warning about any it skips). A non-finite loss or gradient norm stops training
(on CUDA one update later: the flag is read back without waiting for the GPU) before any checkpoint or model of that
update is written; non-finite weights are never saved. No pickle is unpickled beyond `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from huggingface_hub import HfApi
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import transformers
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, PreTrainedConfig

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
from dior_cvae.data import (
    DataFormatError,
    LengthGroupedSampler,
    encode_examples,
    load_bart_tokenizer_files,
    load_dailydialog_dir,
    load_dailydialog_hub,
    load_dialog_dataset,
    load_jsonl,
    load_personachat_hub,
    load_personachat_parlai,
    parse_record,
    tokenize_dataset,
    train_tokenizer,
)
from dior_cvae.diagnostics import latent_statistics
from dior_cvae.dior_compat import compiled_training_problem
from dior_cvae.metrics import score_generations
from dior_cvae.modelcard_dior import METRIC_NAMES, eval_results, model_card
from dior_cvae.training_utils import (
    KL_ANNEALING_SCHEDULES,
    LR_SCHEDULES,
    CompiledTrainingForward,
    StaticShapeCollator,
    DeferredReadback,
    complete_from_scratch_overrides,
    create_lr_scheduler,
    format_duration,
    scheduler_needs_metric,
    kl_weight,
    markdown_table,
    parse_config_overrides,
    uses_cuda_graphs,
    weights_checksum,
)

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO_ROOT / "data" / "dailydialog_sample"
LOSS_KEYS = ("loss", "rc_loss", "kl_loss", "neg_entropy", "prior_loss")
# --torch_compile: the shortest context bucket; 64, 128, 256 for the DailyDialog recipe: three compiles per run
COMPILED_MIN_SOURCE_BUCKET = 64
# --metric_for_best_model: +1 where higher is better (the sampled responses' metrics), -1 for the loss
GENERATION_METRICS = ("bleu1", "bleu2", "distinct1", "distinct2", "entropy1", "entropy2", "entropy3")  # of evaluate()
BEST_MODEL_METRICS = {"loss": -1, **dict.fromkeys(GENERATION_METRICS, 1)}

# `python examples/train.py` with no arguments: a small from-scratch model (3.8M parameters, diffusion prior) on the
# shipped DailyDialog sample, about 4 minutes on 2 CPU cores, then 3 validation contexts with 4 sampled responses each
# (4 prior draws).
DEFAULT_ARGS = [
    "--dataset_dir", str(SAMPLE_DIR),
    "--train_tokenizer_vocab_size", "4000",
    "--config_overrides", (
        "d_model=192,encoder_layers=2,latent_size=16,max_position_embeddings=128,dropout=0.1,"
        "attention_dropout=0.0,activation_dropout=0.0,denoiser_hidden_size=256,memory_dropout=0.3"
    ),
    "--max_source_length", "64",
    "--max_target_length", "32",
    "--per_device_train_batch_size", "32",
    "--per_device_eval_batch_size", "64",
    "--learning_rate", "1e-3",
    "--weight_decay", "0.01",
    "--lr_scheduler_type", "inverse_sqrt",
    "--num_warmup_steps", "100",
    "--kl_annealing", "linear",
    "--kl_annealing_steps", "300",
    "--num_train_epochs", "3",
    "--max_train_minutes", "4",  # 3 epochs take ~3.5 min on 2 idle cores; a busy machine stops early instead
    "--max_eval_samples", "256",
    "--num_eval_generation_samples", "32",
    "--logging_steps", "20",
    "--output_dir", "outputs/dior-cvae-dailydialog-sample",
    "--overwrite_output_dir",  # the demo may be re-run; files it does not write are kept
]


# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag with its default; the description as written."""


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (`namespace/name`): ./x, ../x, /x, ~/x, a/b/c."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset_name", default=None,
                      help="`daily_dialog` (Hub), `personachat` (--personachat_dir or the Hub), or any Hub dataset id "
                           "(read with --context_column/--response_column/--persona_column; needs `datasets`).")
    data.add_argument("--dataset_hub_id", default=None,
                      help="Hub id to load for --dataset_name (default: daily_dialog / bavard/personachat_truecased).")
    data.add_argument("--dataset_revision", default=None,
                      help="Hub revision for --dataset_name (e.g. refs/convert/parquet for script-based datasets, "
                           "which datasets>=4 no longer runs).")
    data.add_argument("--dataset_dir", default=None, help="Folder with DailyDialog {train,validation,test} files.")
    data.add_argument("--clean_split", default=None, metavar="DAILYDIALOG_PP_DIR",
                      help="With --dataset_dir: train without every training dialogue that contains or "
                           "near-duplicates a DailyDialog validation/test dialogue or the source dialogue of a "
                           "DailyDialog++ dev/test context (this folder's {dev,test}.json[.gz]); see "
                           "dior_cvae/training/clean_split.py. Cached in $DIOR_CVAE_CACHE (default ~/.cache/dior_cvae).")
    data.add_argument("--personachat_dir", default=None,
                      help="Folder with ParlAI PersonaChat files {train,valid,test}_<variant>.txt[.gz].")
    data.add_argument("--personachat_variant", default="self_original", help="ParlAI file variant (self_original, ...).")
    data.add_argument("--train_file", default=None,
                      help="Training file: .jsonl[.gz] (read line by line, errors name file:line) or .json/.csv[.gz] "
                           "(read with `datasets`).")
    data.add_argument("--validation_file", default=None,
                      help="Validation file (same formats as --train_file); with --dataset_dir, JSON Lines that "
                           "replace the folder's validation split (e.g. DailyDialog++ dev for checkpoint selection).")
    data.add_argument("--test_file", default=None, help="Test file (same formats as --train_file).")
    data.add_argument("--context_column", default="context",
                      help="Column with the context: a list of turns (oldest first) or a string, whose turns are "
                           "separated by `__eou__` (no `__eou__`: one turn).")
    data.add_argument("--response_column", default="response", help="Column with the response (a string).")
    data.add_argument("--persona_column", default="persona",
                      help="Optional column with persona sentences (a string or a list), put before the context.")
    data.add_argument("--num_proc", type=int, default=None, help="Processes for `datasets` map (reading, tokenizing).")
    data.add_argument("--skip_bad_lines", action="store_true", help="Skip (and count) malformed JSON Lines lines.")
    data.add_argument("--max_source_length", type=int, default=256, help="Context tokens (truncated from the left).")
    data.add_argument("--max_target_length", type=int, default=64, help="Response tokens (truncated from the right).")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None, help="Cap on validation and test examples.")
    data.add_argument("--turn_separator", default=None, help="String between context turns (default: tokenizer eos).")

    model = p.add_argument_group("model and tokenizer")
    model.add_argument("--model_name_or_path", default=None,
                       help="A pretrained BART (hub id or folder; loaded with `from_bart`) or a Dior-CVAE folder.")
    model.add_argument("--config_name", default=None, help="A Dior-CVAE config (folder or file) for training from scratch.")
    model.add_argument("--config_overrides", default=None,
                       help='Comma-separated config fields, e.g. "d_model=256,encoder_layers=4,latent_size=16". From '
                            "scratch: one of encoder/decoder_layers sets both; d_model sets heads = d_model // 64 and "
                            "ffn = 4 * d_model unless given.")
    model.add_argument("--tokenizer_name", default=None,
                       help="Tokenizer folder or hub id; a folder with only vocab.json + merges.txt is read as BART's.")
    model.add_argument("--train_tokenizer_vocab_size", type=int, default=None,
                       help="Train a byte-level BPE of this size on the training split (models from scratch).")

    train = p.add_argument_group("training")
    train.add_argument("--per_device_train_batch_size", type=int, default=8)
    train.add_argument("--per_device_eval_batch_size", type=int, default=8)
    train.add_argument("--learning_rate", type=float, default=5e-5)
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    train.add_argument("--num_train_epochs", type=int, default=3)
    train.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    train.add_argument("--max_train_minutes", type=float, default=None,
                       help="Also stop after this much training time (checked every --logging_steps updates).")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--lr_scheduler_type", choices=LR_SCHEDULES, default="linear",
                       help="transformers' schedules; inverse_sqrt = the paper's Noam schedule (needs "
                            "--num_warmup_steps); reduce_lr_on_plateau / greedy step with each validation loss.")
    train.add_argument("--lr_scheduler_kwargs", type=json.loads, default=None,
                       help='JSON of schedule-specific arguments, e.g. \'{"min_lr_rate": 0.1}\' for cosine_with_min_lr.')
    train.add_argument("--num_warmup_steps", type=int, default=0)
    train.add_argument("--kl_annealing", choices=KL_ANNEALING_SCHEDULES, default="linear",
                       help="linear: β 0→1 over --kl_annealing_steps (paper); cyclical: the authors' per-epoch cycle.")
    train.add_argument("--kl_annealing_steps", type=int, default=None,
                       help="linear: steps to reach β = 1 (default 20000, the paper). cyclical: length of each "
                            "half-cycle (default: one epoch, the authors' schedule).")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Default: the accelerate config / launcher flag.")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                       help="Batch training examples of similar length (shuffled, seeded; default on): less padding.")
    train.add_argument("--pad_to_multiple_of", type=int, default=16,
                       help="Pad batches to a multiple of this many tokens: a few bucket shapes (0: no rounding).")
    train.add_argument("--dataloader_num_workers", type=int, default=None,
                       help="Worker processes that collate training batches off the training loop (default: 2 on "
                            "CUDA, with pinned memory and non-blocking copies; 0, in the loop, on CPU).")
    train.add_argument("--torch_compile", action="store_true",
                       help="torch.compile the training forward and backward (evaluation, generation and saving stay "
                            "eager). Every training batch's contexts are padded to a power-of-two length bucket "
                            "(64 tokens up to --max_source_length), its responses to --max_target_length, and the "
                            "last partial batch of each epoch is dropped, so the step compiles once per bucket (a "
                            "minute or two each) for static shapes; see docs/performance.md for when it pays.")
    train.add_argument("--torch_compile_mode", default="reduce-overhead",
                       help='torch.compile mode: "reduce-overhead" (CUDA graphs: no per-kernel launch cost on the '
                            'host; needs --gradient_accumulation_steps 1), "default", "max-autotune", ...')
    train.add_argument("--torch_compile_backend", default="inductor", help="torch.compile backend.")
    train.add_argument("--cpu", action="store_true", help="Train on CPU even if an accelerator is available.")
    train.add_argument("--ddp_find_unused_parameters", action="store_true",
                       help="Only for model variants where some parameter gets no gradient in a step (slower DDP).")

    run = p.add_argument_group("checkpoints, evaluation, logging")
    run.add_argument("--output_dir", default="outputs/dior-cvae")
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="Write into a non-empty --output_dir (replacing this script's outputs; nothing is deleted).")
    run.add_argument("--checkpointing_steps", default=None, help='"N" (every N updates) or "epoch".')
    run.add_argument("--checkpoints_total_limit", type=int, default=None,
                     help="Keep only the newest N checkpoints of this run (older ones are deleted).")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help='A step_N/epoch_N folder, or "latest" (the newest intact checkpoint of the run in --output_dir).')
    run.add_argument("--eval_steps", type=int, default=None,
                     help="Validate every N updates (the final model is always validated).")
    run.add_argument("--num_eval_generation_samples", type=int, default=100,
                     help="Validation contexts to sample responses for (BLEU / distinct / entropy); 0 disables.")
    run.add_argument("--eval_samples_per_context", type=int, default=1, help="Sampled responses per context.")
    run.add_argument("--metric_for_best_model", default="loss", choices=sorted(BEST_MODEL_METRICS),
                     help="The validation metric that picks best/: the loss (lowest) or a metric of the sampled "
                          "responses of --num_eval_generation_samples contexts (highest). As the metric of "
                          "transformers' TrainingArguments.")
    run.add_argument("--num_sample_contexts", type=int, default=3, help="Contexts printed with samples at the end.")
    run.add_argument("--num_samples_per_context", type=int, default=4, help="Samples (prior draws) per printed context.")
    run.add_argument("--logging_steps", type=int, default=50)
    run.add_argument("--with_tracking", action="store_true", help="Log to TensorBoard (output_dir/runs).")
    run.add_argument("--report_to", default="tensorboard", help="accelerate tracker(s) for --with_tracking.")

    hub = p.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", default=None, help="Repository id (default: the output folder's name).")
    hub.add_argument("--hub_token", default=None)
    hub.add_argument("--hub_private_repo", action="store_true")
    hub.add_argument("--license", default=None,
                     help="Model card license (default: cc-by-nc-sa-4.0 for DailyDialog data, else apache-2.0).")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="Let a --tokenizer_name / --model_name_or_path folder or repo run its own Python code.")
    p.add_argument("--debug_dump_rank_weights", default=None, help=argparse.SUPPRESS)  # tests: per-rank checksums
    # tests: "update:N" SIGKILLs the process after update N; "checkpoint:step_N" in the middle of writing step_N
    p.add_argument("--debug_sigkill", default=None, help=argparse.SUPPRESS)

    for action in p._actions:  # flags without a help text show their default too
        if action.help is None:
            action.help = "(default: %(default)s)"
    args = p.parse_args(argv)
    sources = [args.dataset_name is not None, args.dataset_dir is not None, args.train_file is not None]
    if sum(sources) != 1:
        p.error("give exactly one data source: --dataset_name, --dataset_dir or --train_file")
    if args.clean_split and not args.dataset_dir:
        p.error("--clean_split needs --dataset_dir (the ijcnlp DailyDialog folder)")
    if args.personachat_dir and args.dataset_name != "personachat":
        p.error("--personachat_dir needs --dataset_name personachat")
    if args.model_name_or_path is None and args.tokenizer_name is None and args.train_tokenizer_vocab_size is None:
        p.error("a model from scratch needs --tokenizer_name or --train_tokenizer_vocab_size")
    if args.checkpointing_steps not in (None, "epoch") and not (
            str(args.checkpointing_steps).isdigit() and int(args.checkpointing_steps) >= 1):
        p.error(f'--checkpointing_steps must be an integer >= 1 or "epoch", got {args.checkpointing_steps!r}')
    at_least = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
                "logging_steps": 1, "num_train_epochs": 1, "max_source_length": 1, "max_target_length": 2,
                "num_warmup_steps": 0, "num_eval_generation_samples": 0, "eval_samples_per_context": 1,
                "num_sample_contexts": 0, "num_samples_per_context": 1, "max_train_steps": 1, "eval_steps": 1,
                "checkpoints_total_limit": 1, "kl_annealing_steps": 0, "max_train_samples": 1, "max_eval_samples": 1,
                "train_tokenizer_vocab_size": 1, "dataloader_num_workers": 0}
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low and not (name == "num_train_epochs" and args.max_train_steps):
            p.error(f"--{name} must be >= {low}, got {value}")
    for name in ("learning_rate", "max_train_minutes"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            p.error(f"--{name} must be a finite number > 0, got {value}")
    for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
        if not 0 <= getattr(args, name) < math.inf:
            p.error(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.metric_for_best_model != "loss" and not args.num_eval_generation_samples:
        p.error(f"--metric_for_best_model {args.metric_for_best_model} is a metric of sampled responses: it needs "
                "--num_eval_generation_samples > 0")
    if args.lr_scheduler_kwargs is not None and not isinstance(args.lr_scheduler_kwargs, dict):
        p.error("--lr_scheduler_kwargs must be a JSON object")
    problem = compiled_training_problem() if args.torch_compile else None
    if problem:
        p.error(f"--torch_compile: {problem}")
    if (args.torch_compile and uses_cuda_graphs(args.torch_compile_mode, args.torch_compile_backend)
            and args.gradient_accumulation_steps > 1):
        p.error(f"--torch_compile_mode {args.torch_compile_mode} replays CUDA graphs, whose outputs (the gradients "
                "included) the next micro-batch overwrites: it needs --gradient_accumulation_steps 1, got "
                f"{args.gradient_accumulation_steps} (use --torch_compile_mode default)")
    for flag in ("model_name_or_path", "tokenizer_name", "config_name", "dataset_dir", "personachat_dir", "clean_split"):
        value = getattr(args, flag)
        if value and _looks_local(value) and not Path(value).expanduser().exists():
            p.error(f"--{flag}: no such folder: {value}")
    for flag in ("train_file", "validation_file", "test_file"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            p.error(f"--{flag}: no such file: {value}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def load_raw_splits(args) -> tuple[dict[str, list[dict]], str, dict]:
    """{split: examples}, a description of the data, and metadata for the model card."""
    splits: dict = {}  # split -> list of examples, or a datasets.Dataset
    meta = {"hub_dataset": None, "skipped_lines": 0}
    columns = dict(context_column=args.context_column, response_column=args.response_column,
                   persona_column=args.persona_column)
    files = {split: path for split, path in (("train", args.train_file), ("validation", args.validation_file),
                                             ("test", args.test_file)) if path}
    hub_kwargs = {"revision": args.dataset_revision} if args.dataset_revision else {}
    if args.dataset_dir:
        exclude = None
        if args.clean_split:
            from dior_cvae.training.clean_split import build_clean_split

            clean = build_clean_split(args.dataset_dir, args.clean_split)
            exclude = {"train": clean.removed_train_dialogue_ids}
            report = clean.report
            logger.info(f"--clean_split: removed {report['removed_dialogues']} of {report['train_dialogues']} training "
                        f"dialogues ({report['removed_pairs']} of {report['train_pairs']} pairs): "
                        f"{report['removed_by_primary_reason']}", main_process_only=True)
            meta["clean_split"] = {k: report[k] for k in ("threshold", "removed_dialogues", "removed_pairs",
                                                          "kept_dialogues", "kept_pairs")}
        for split in ("train", "validation", "test"):
            try:
                splits.update(load_dailydialog_dir(args.dataset_dir, [split], exclude_dialogues=exclude))
            except FileNotFoundError:
                if split == "train":
                    raise
        sample = Path(args.dataset_dir).resolve() == SAMPLE_DIR.resolve()
        description = ("The shipped DailyDialog sample (the first 1,000 / 100 / 100 dialogues of each split)" if sample
                       else f"DailyDialog (ijcnlp files, {args.dataset_dir})")
        if args.clean_split:
            description += (f", training split without the {meta['clean_split']['removed_dialogues']} dialogues "
                            "that overlap DailyDialog validation/test or DailyDialog++ dev/test (--clean_split)")
        meta.update(hub_dataset="li2017dailydialog/daily_dialog", dataset_name="DailyDialog" + (" (sample)" if sample else ""))
        parse = functools.partial(parse_record, **columns)
        for split, path in files.items():  # --validation_file / --test_file (JSON Lines) replace the folder's split
            splits[split], skipped = load_jsonl(path, skip_bad_lines=args.skip_bad_lines, parse=parse)
            if not splits[split]:
                raise ValueError(f"--{split}_file {path}: no examples in the file")
            meta["skipped_lines"] += skipped
            description += f"; {split}: {path}"
    elif args.dataset_name == "daily_dialog":
        splits = load_dailydialog_hub(args.dataset_hub_id or "daily_dialog", num_proc=args.num_proc, **hub_kwargs)
        description = f"DailyDialog from the Hub ({args.dataset_hub_id or 'daily_dialog'})"
        meta.update(hub_dataset="li2017dailydialog/daily_dialog", dataset_name="DailyDialog")
    elif args.dataset_name == "personachat" and args.personachat_dir:
        folder = Path(args.personachat_dir)
        for split, stem in (("train", "train"), ("validation", "valid"), ("test", "test")):
            candidates = [folder / f"{stem}_{args.personachat_variant}.txt{gz}" for gz in ("", ".gz")]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None and split == "train":
                raise FileNotFoundError(f"PersonaChat training file not found: {candidates[0]}[.gz]")
            if found is not None:
                splits[split] = load_personachat_parlai(found)
        description = f"PersonaChat (ParlAI {args.personachat_variant} files, {args.personachat_dir})"
        meta.update(hub_dataset="bavard/personachat_truecased", dataset_name="PersonaChat")
    elif args.dataset_name == "personachat":
        hub_id = args.dataset_hub_id or "bavard/personachat_truecased"
        splits = load_personachat_hub(hub_id, num_proc=args.num_proc, **hub_kwargs)
        description = f"PersonaChat from the Hub ({hub_id})"
        meta.update(hub_dataset=hub_id, dataset_name="PersonaChat")
    elif args.dataset_name:
        splits = load_dialog_dataset(args.dataset_name, num_proc=args.num_proc, **columns, **hub_kwargs)
        description = f"{args.dataset_name} from the Hub"
        meta.update(hub_dataset=args.dataset_name, dataset_name=args.dataset_name)
    elif not all(str(p).removesuffix(".gz").endswith(".jsonl") for p in files.values()):
        splits = load_dialog_dataset(data_files=files, num_proc=args.num_proc, **columns)
        description = "Data files: " + ", ".join(map(str, files.values()))
        meta.update(dataset_name=Path(args.train_file).name.split(".")[0])
    else:
        parse = functools.partial(parse_record, **columns)
        for split, path in files.items():
            if path:
                splits[split], skipped = load_jsonl(path, skip_bad_lines=args.skip_bad_lines, parse=parse)
                if not splits[split]:
                    raise ValueError(f"--{split}_file {path}: no examples in the file")
                if skipped:
                    logger.warning(f"{path}: skipped {skipped} bad line(s) (--skip_bad_lines)", main_process_only=True)
                meta["skipped_lines"] += skipped
        description = "JSON Lines files: " + ", ".join(p for p in (args.train_file, args.validation_file, args.test_file) if p)
        meta.update(dataset_name=Path(args.train_file).stem)
    if args.max_train_samples is not None:
        splits["train"] = head(splits["train"], args.max_train_samples)
    if args.max_eval_samples is not None:
        for split in ("validation", "test"):
            if split in splits:
                splits[split] = head(splits[split], args.max_eval_samples)
    if not splits.get("train"):
        raise ValueError("the training split is empty")
    return {k: v for k, v in splits.items() if v and k in ("train", "validation", "test")}, description, meta


def head(examples, n: int):
    """The first n examples of a list or a datasets.Dataset."""
    return examples.select(range(min(n, len(examples)))) if hasattr(examples, "select") else examples[:n]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer folder / hub id, or a folder holding only BART's vocab.json + merges.txt. Code that ships with
    the tokenizer runs only with `trust_remote_code` (--trust_remote_code)."""
    folder = Path(name_or_path)
    has_hf_files = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    if folder.is_dir() and not has_hf_files and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return load_bart_tokenizer_files(folder)
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def get_tokenizer(args, accelerator, train_examples, resume_dir: Path | None):
    if resume_dir is not None and (resume_dir / "pretrained" / "tokenizer_config.json").is_file():
        # the exact tokenizer the checkpoint was trained with
        return load_tokenizer(str(resume_dir / "pretrained"), args.trust_remote_code)
    if args.tokenizer_name or (args.model_name_or_path and not args.train_tokenizer_vocab_size):
        return load_tokenizer(args.tokenizer_name or args.model_name_or_path, args.trust_remote_code)
    # Train one on the training split: the main process trains and saves it, the others load that copy.
    tokenizer_dir = Path(args.output_dir) / "tokenizer"
    if accelerator.is_main_process:
        texts = list(dict.fromkeys(t for ex in train_examples for t in (*ex.get("persona", []), *ex["context"], ex["response"])))
        tokenizer = train_tokenizer(texts, args.train_tokenizer_vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
        logger.info(f"Trained a {len(tokenizer)}-token byte-level BPE on {len(texts)} training turns")
    accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(str(tokenizer_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # saved with the model; this copy only served the other processes
        shutil.rmtree(tokenizer_dir)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def build_model(args, tokenizer):
    if args.model_name_or_path:
        config_dict, _ = PreTrainedConfig.get_config_dict(args.model_name_or_path)
        overrides = parse_config_overrides(args.config_overrides, DiorCVAEConfig, config_dict)
        if config_dict.get("model_type") == DiorCVAEConfig.model_type:
            config = DiorCVAEConfig.from_dict({**config_dict, **overrides})
            loader = lambda: DiorCVAEForConditionalGeneration.from_pretrained(args.model_name_or_path, config=config)  # noqa: E731
        else:
            loader = lambda: DiorCVAEForConditionalGeneration.from_bart(args.model_name_or_path, **overrides)  # noqa: E731
        try:
            model = loader()
        except Exception as exc:  # e.g. a truncated safetensors file: name the folder
            raise ValueError(f"--model_name_or_path {args.model_name_or_path}: cannot load the weights "
                             f"({type(exc).__name__}: {exc})") from exc
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config_dict = PreTrainedConfig.get_config_dict(args.config_name)[0] if args.config_name else {}
        overrides = parse_config_overrides(args.config_overrides, DiorCVAEConfig, config_dict)
        overrides, derived = complete_from_scratch_overrides(overrides)
        if derived:
            logger.info("Derived config fields: " + ", ".join(derived))
        specials = dict(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id,
        )
        config = DiorCVAEConfig.from_dict({**config_dict, **overrides, **specials})
        model = DiorCVAEForConditionalGeneration(config)
    for flag in ("max_source_length", "max_target_length"):
        if getattr(args, flag) > model.config.max_position_embeddings:
            raise ValueError(f"--{flag} {getattr(args, flag)} > the model's max_position_embeddings "
                             f"{model.config.max_position_embeddings}")
    # Dialog defaults for `generate()`: one prior draw per returned sequence, nucleus sampling (the model card's recipe).
    model.generation_config.update(do_sample=True, top_k=50, top_p=0.9, max_new_tokens=args.max_target_length)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Evaluation and samples
# ---------------------------------------------------------------------------------------------------------------


def sample_responses(model, tokenizer, examples, encoded, args, num_return_sequences, seed) -> list[dict]:
    """Sample `num_return_sequences` responses (one prior draw each, top-k 50 / top-p 0.9) per example."""
    collator = DataCollatorForSeq2Seq(tokenizer)
    device = next(model.parameters()).device
    rows = []
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(examples), args.per_device_eval_batch_size):
        batch = collator([{"input_ids": e["input_ids"]} for e in encoded[start : start + args.per_device_eval_batch_size]])
        outputs = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            do_sample=True, top_k=50, top_p=0.9, num_return_sequences=num_return_sequences,
            max_new_tokens=args.max_target_length, latent_generator=generator,
            # a few hundred contexts per evaluation: compiling the captured step and the prior's graph (about a
            # minute per shape, on the CPU the training step needs) would cost more than it saves
            disable_compile=True,
        )
        texts = [t.strip() for t in tokenizer.batch_decode(outputs, skip_special_tokens=True)]
        for i, example in enumerate(examples[start : start + args.per_device_eval_batch_size]):
            rows.append({"context": example["context"], "reference": example["response"],
                         "samples": texts[i * num_return_sequences : (i + 1) * num_return_sequences]})
    return rows


DIAGNOSTIC_EXAMPLES = 512  # validation examples of the latent diagnostics at every evaluation


def latent_diagnostics(model, batches, accelerator) -> dict:
    """`dior_cvae.diagnostics` on validation `batches` (the first `DIAGNOSTIC_EXAMPLES` examples of this process's
    shard), as scalars: active units, mutual information, prior/posterior norm ratio, KL to N(0, I) of every layer."""
    with accelerator.autocast():
        stats = latent_statistics(model, batches, pca=False)
    values = {k: stats[k] for k in ("active_units_fraction", "mutual_information", "prior_posterior_norm_ratio",
                                    "posterior_std_mean")}
    values.update({f"kl_layer{l}": v for l, v in enumerate(stats["kl_to_standard_per_layer"])})
    return values


def evaluate(model, dataloader, accelerator, args, tokenizer, examples, encoded) -> dict:
    """Mean loss components (β = 1, eval mode: no dropout, no memory dropout) and generation metrics.

    Runs under a forked RNG with a fixed seed: the numbers are reproducible and training randomness is untouched.
    """
    model.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(args.seed)
        totals, count = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=accelerator.device), 0
        diagnostic_batches, local_count = [], 0
        for batch in dataloader:
            if local_count < DIAGNOSTIC_EXAMPLES:  # kept for the latent diagnostics: no second pass over the data
                diagnostic_batches.append(batch)
                local_count += batch["input_ids"].shape[0]
            with accelerator.autocast():
                out = model(**batch, kl_weight=1.0)
            values = torch.stack([getattr(out, k).float() if getattr(out, k) is not None else out.loss.new_zeros(())
                                  for k in LOSS_KEYS])
            rows = accelerator.gather_for_metrics(values.expand(batch["input_ids"].shape[0], -1).contiguous())
            totals += rows.double().sum(0)
            count += rows.shape[0]
        results = {k: (totals[i] / max(count, 1)).item() for i, k in enumerate(LOSS_KEYS)}
        unwrapped = accelerator.unwrap_model(model)
        if unwrapped.config.prior_type != "diffusion":
            results.pop("neg_entropy"), results.pop("prior_loss")
        if unwrapped.config.has_latent and accelerator.is_main_process:
            results.update(latent_diagnostics(unwrapped, diagnostic_batches, accelerator))
        n = min(args.num_eval_generation_samples, len(examples))
        if n > 0 and accelerator.is_main_process:
            with accelerator.autocast():
                rows = sample_responses(accelerator.unwrap_model(model), tokenizer, [examples[i] for i in range(n)],
                                    [encoded[i] for i in range(n)], args,
                                        args.eval_samples_per_context, args.seed)
            scores = score_generations(rows, semantic=False)
            results.update({k: scores[k] for k in GENERATION_METRICS})
    accelerator.wait_for_everyone()
    model.train()
    return results


def format_samples(rows: list[dict], markdown: bool = False) -> str:
    lines = []
    for i, row in enumerate(rows, 1):
        if markdown:
            lines.append(f"**Context {i}**\n")
            lines += [f"> {'A' if (len(row['context']) - j) % 2 else 'B'}: {turn}  " for j, turn in enumerate(row["context"])]
            lines.append(f"\n*Reference:* {row['reference']}\n")
            lines += [f"{k}. {s}" for k, s in enumerate(row["samples"], 1)]
            lines.append("")
        else:
            lines.append(f"[{i}] context:")
            lines += [f"      {'A' if (len(row['context']) - j) % 2 else 'B'}: {turn}" for j, turn in enumerate(row["context"])]
            lines.append(f"    reference: {row['reference']}")
            lines += [f"    sample {k}: {s}" for k, s in enumerate(row["samples"], 1)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and `os.replace`: a kill leaves the old or the new file, not half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def assert_finite_weights(model, where: str) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise SystemExit(f"train.py: error: non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                         f"when saving {where}: not saved")


@contextlib.contextmanager
def atomic_folder(accelerator, folder: Path, merge: bool = False):
    """Yield a hidden temporary folder to fill (by every process); then the main process renames it to `folder`
    (`merge=True`: moves its files into an existing `folder`, one `os.replace` each). A kill at any point leaves
    the previous `folder` or the new one, plus temporary folders that the next save removes."""
    folder = folder.resolve()  # "." has no name
    tmp = folder / ".model.tmp" if merge else folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    yield tmp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if merge:
            folder.mkdir(parents=True, exist_ok=True)
            for item in sorted(tmp.rglob("*"), key=lambda q: len(q.parts)):  # folders before their files
                target = folder / item.relative_to(tmp)
                if item.is_dir():
                    target.mkdir(exist_ok=True)
                else:
                    os.replace(item, target)
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def save_model_folder(accelerator, model, tokenizer, folder: Path, merge: bool = False) -> None:
    """save_pretrained (safetensors + remote code) and the tokenizer, written atomically by the main process."""
    assert_finite_weights(accelerator.unwrap_model(model), str(folder))
    with atomic_folder(accelerator, folder, merge) as tmp:
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(accelerator, model, tokenizer, folder: Path, trainer_state: dict, debug_sigkill=None) -> None:
    """accelerate state (exact resume: weights, optimizer, RNG) + a loadable `pretrained/` folder, then
    trainer_state.json (written last; the lr schedule, the run id, and each file's size and sha256)."""
    assert_finite_weights(accelerator.unwrap_model(model), str(folder))
    with atomic_folder(accelerator, folder) as tmp:
        accelerator.save_state(str(tmp))
        if debug_sigkill == f"checkpoint:{folder.name}":
            os.kill(os.getpid(), signal.SIGKILL)
        if accelerator.is_main_process:
            accelerator.unwrap_model(model).save_pretrained(tmp / "pretrained")
            tokenizer.save_pretrained(tmp / "pretrained")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {q.relative_to(tmp).as_posix(): {"size": q.stat().st_size, "sha256": _sha256(q)}
                     for q in sorted(tmp.rglob("*")) if q.is_file()}
            (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "files": files}, indent=2))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from (naming the file), or None when it is intact."""
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return f"{state_file} is missing (not a checkpoint of this script, or an interrupted save)"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{state_file} is not valid JSON ({exc})"
    missing = [k for k in ("completed_steps", "epoch", "batches_in_epoch", "lr_scheduler", "files") if k not in state]
    if missing:
        return f"{state_file} lacks {', '.join(missing)} (written by an older train.py? it is not loaded)"
    for name, expected in state["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} is truncated or changed ({path.stat().st_size} bytes, {expected['size']} expected)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in {state_file} (changed or mixed with another save)"
    return None


def _checkpoint_states(output_dir: Path, run_id: str | None) -> list[tuple[float, Path, dict | None]]:
    """(completed_steps, folder, trainer state) of the step_N / epoch_N folders in `output_dir`, newest first: the
    run `run_id`'s (every run's for None) and those whose state is unreadable (their step and run are unknown:
    listed first, as inf)."""
    found = []
    for folder in output_dir.glob("*_*"):
        if not (folder.is_dir() and re.fullmatch(r"(step|epoch)_\d+", folder.name)):
            continue
        try:
            state = json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            state = None
        if isinstance(state, dict) and run_id is not None and state.get("run_id") != run_id:
            continue  # another run's, kept from before --overwrite_output_dir
        steps = state.get("completed_steps") if isinstance(state, dict) else None
        found.append((steps if isinstance(steps, int) else math.inf, folder, state))
    return sorted(found, key=lambda x: x[0], reverse=True)


def find_checkpoint(args, run_id: str | None) -> Path | None:
    """The checkpoint to resume from: the one given (it must be intact), or with "latest" the newest intact one of
    the run `run_id` (the run that last wrote to --output_dir), warning about each broken one skipped."""
    if args.resume_from_checkpoint != "latest":
        folder = Path(args.resume_from_checkpoint)
        problem = checkpoint_problem(folder)
        if problem:
            raise SystemExit(f"train.py: error: --resume_from_checkpoint {folder}: {problem}")
        return folder
    for _, folder, _ in _checkpoint_states(Path(args.output_dir), run_id):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning(f"--resume_from_checkpoint latest: skipping {folder}: {problem}")
    return None


def prune_checkpoints(output_dir: Path, run_id: str, limit: int | None) -> None:
    """--checkpoints_total_limit: delete this run's oldest checkpoints beyond `limit` (never another run's)."""
    if limit is None:
        return
    ours = [folder for steps, folder, state in _checkpoint_states(output_dir, run_id) if steps < math.inf]
    for folder in ours[limit:]:
        logger.info(f"--checkpoints_total_limit {limit}: deleting {folder}")
        shutil.rmtree(folder)


def write_model_card(args, output_dir: Path, info: dict) -> None:
    """README.md: the Dior model card (`dior_cvae.modelcard_dior.model_card`) with this run's data, training
    procedure, results and samples."""
    results, split, config = info["results"], info["results_split"], info["config"]
    repo_id = args.hub_model_id or output_dir.name
    license_ = args.license or ("cc-by-nc-sa-4.0" if "DailyDialog" in info["meta"]["dataset_name"] else "apache-2.0")
    hub_dataset = info["meta"]["hub_dataset"]
    config_rows = [(k, getattr(config, k)) for k in (
        "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "vocab_size",
        "latent_size", "prior_type", "log_snr_min", "log_snr_max", "num_inference_steps", "sampler", "prediction_type",
        "memory_dropout", "cfg_dropout", "prior_guidance_scale", "label_smoothing")
        if hasattr(config, k)]
    hyper_rows = [
        ("initialisation", args.model_name_or_path or "from scratch"),
        ("parameters", f"{info['num_parameters'] / 1e6:.1f}M"),
        ("optimizer", f"AdamW (lr {args.learning_rate}, betas ({args.adam_beta1}, {args.adam_beta2}), "
                      f"eps {args.adam_epsilon}, weight decay {args.weight_decay})"),
        ("lr schedule", f"{args.lr_scheduler_type}, {args.num_warmup_steps} warmup steps"),
        ("KL annealing", f"{args.kl_annealing}" + (f" over {args.kl_annealing_steps} steps" if args.kl_annealing_steps else "")),
        ("batch size", f"{args.per_device_train_batch_size} × {info['num_processes']} process(es) × "
                       f"{args.gradient_accumulation_steps} accumulation = {info['total_batch_size']}"),
        ("updates / epochs", f"{info['completed_steps']} / {info['epochs']:.2f}"),
        ("max source / target length", f"{args.max_source_length} / {args.max_target_length} tokens"),
        ("turn separator", repr(info["turn_separator"])),
        ("mixed precision", info["mixed_precision"]),
        ("seed", args.seed),
        ("training time", f"{format_duration(info['training_time_s'])} on {info['device']}"),
    ]
    metric_rows = [(METRIC_NAMES[k][1] if k in METRIC_NAMES else k, results[k]) for k in (
        "loss", "rc_loss", "kl_loss", "neg_entropy", "prior_loss", "bleu1", "bleu2", "distinct1", "distinct2",
        "entropy1", "entropy2", "entropy3") if k in results]
    license_note = ("the DailyDialog data is CC BY-NC-SA 4.0 (non-commercial, share-alike), and so is this model"
                    if license_ == "cc-by-nc-sa-4.0" else f"the model is released under {license_}; check your data's license")
    sections = f"""## Training data

{info["data_description"]}. One example per response turn, with the earlier turns of the dialog as context.

{markdown_table(["split", "examples"], list(info["counts"].items()))}

License: {license_note}.

## Training procedure

Trained with `examples/train.py` of the `dior_cvae` package. Loss: label-smoothed reconstruction cross-entropy (summed
over the response tokens) + β · KL, where the KL term is the posterior's negative entropy plus the diffusion prior's
denoising loss, and β follows the KL annealing schedule.

{markdown_table(["setting", "value"], hyper_rows)}

Model configuration:

{markdown_table(["field", "value"], config_rows)}

## Evaluation

On the {split} split. Losses are per example (β = 1, no dropout). BLEU-1/2 follow the paper's protocol (nltk sentence
BLEU, smoothing method 7, × 100) and compare each sampled response (top-k 50, top-p 0.9) with the reference;
Distinct-n and Entropy-n measure the diversity of all samples. Whitespace tokenisation, as in the paper.

{markdown_table(["metric", "value"], metric_rows) if metric_rows else "(no evaluation split)"}

## Sample generations

Sampled responses (top-k 50, top-p 0.9; each from its own prior draw) for contexts of the {info["samples_split"]} split:

{format_samples(info["samples"], markdown=True) if info["samples"] else "(none)"}
"""
    card = model_card(
        config, repo_id, license=license_, datasets=[hub_dataset] if hub_dataset else [],
        base_model=args.model_name_or_path if args.model_name_or_path and not Path(args.model_name_or_path).exists()
        else None,
        results=eval_results(results, hub_dataset or info["meta"]["dataset_name"], info["meta"]["dataset_name"], split),
        turn_separator=info["turn_separator"], max_source_length=args.max_source_length, sections=sections)
    write_text_atomic(output_dir / "README.md", str(card))


def create_hub_repo(args, output_dir: Path) -> str:
    """--push_to_hub: create the repository (and so check the token and the network) before any training."""
    name = args.hub_model_id or output_dir.resolve().name
    try:
        return HfApi(token=args.hub_token).create_repo(name, exist_ok=True, private=args.hub_private_repo).repo_id
    except Exception as exc:  # offline mode, no or bad token, no network, a bad name
        raise SystemExit(f"train.py: error: --push_to_hub: cannot create the Hub repository {name!r} "
                         f"({type(exc).__name__}: {exc}); check --hub_token / `hf auth login`, the network, and "
                         "that HF_HUB_OFFLINE is not set. Nothing was trained.") from None


def push_to_hub(args, output_dir: Path, repo_id: str) -> None:
    HfApi(token=args.hub_token).upload_folder(
        repo_id=repo_id, folder_path=str(output_dir), commit_message="Upload Dior-CVAE (examples/train.py)",
        ignore_patterns=["step_*", "step_*/**", "epoch_*", "epoch_*/**", "best/**", "tokenizer/**", ".*", ".*/**",
                         "*.tmp", "run.json"],
    )


def write_training_curves(log_file: Path, output_dir: Path) -> None:
    """training_curves.png: loss, KL, β and the validation metrics against the update step (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no training_curves.png (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    panels = [("training loss", ["loss", "rc_loss"]), ("KL", ["kl_loss"]), ("β (KL weight)", ["beta"]),
              ("validation", ["eval_loss", "eval_rc_loss", "eval_kl_loss"]),
              ("latent (validation)", ["eval_active_units_fraction", "eval_mutual_information",
                                       "eval_prior_posterior_norm_ratio"]),
              ("validation generation", ["eval_bleu1", "eval_bleu2", "eval_distinct1", "eval_distinct2"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("update step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = output_dir / ".training_curves.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, output_dir / "training_curves.png")


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def read_run_id(output_dir: Path) -> str | None:
    try:
        return json.loads((output_dir / "run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_output_dir(args, accelerator) -> tuple[str, Path | None]:
    """Refuse a non-empty --output_dir unless resuming or --overwrite_output_dir (nothing is ever deleted); find the
    checkpoint to resume from; return this run's id (a resumed run keeps its checkpoint's), kept in run.json."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"train.py: error: --output_dir {output_dir} is a file, not a folder")
    if output_dir.is_dir() and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        entries = sorted(q.name for q in output_dir.iterdir() if q.name != "run.json")  # a run that failed early
        if entries:
            raise SystemExit(
                f"train.py: error: --output_dir {output_dir} is not empty ({len(entries)} entries: "
                f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}): pass --resume_from_checkpoint to "
                "continue a run, --overwrite_output_dir to write into it anyway (replacing this script's outputs, "
                "deleting nothing), or choose another folder")
    resume_dir = find_checkpoint(args, read_run_id(output_dir)) if args.resume_from_checkpoint else None
    if args.resume_from_checkpoint == "latest" and resume_dir is None:
        logger.warning(f"--resume_from_checkpoint latest: no intact checkpoint in {output_dir}, starting from scratch")
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        run_id = json.loads((resume_dir / "trainer_state.json").read_text()).get("run_id") if resume_dir else None
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "run.json", json.dumps({"run_id": run_id or uuid.uuid4().hex}))
    accelerator.wait_for_everyone()
    return read_run_id(output_dir), resume_dir


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("No arguments: running the built-in demo (tiny Dior-CVAE on the shipped DailyDialog sample).", flush=True)
        argv = DEFAULT_ARGS
    args = parse_args(argv)
    start_time = time.time()

    # On a machine without GPUs, `torchrun`/`accelerate launch --multi_gpu` start N processes that accelerate treats
    # as independent single-process runs unless told to use the CPU backend (gloo): do that.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = args.cpu or (world_size > 1 and not torch.cuda.is_available())
    ddp_kwargs = [DistributedDataParallelKwargs(find_unused_parameters=True)] if args.ddp_find_unused_parameters else []
    on_cuda = not use_cpu and torch.cuda.is_available()
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 2 if on_cuda else 0
    accelerator = Accelerator(
        cpu=use_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        kwargs_handlers=ddp_kwargs,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=on_cuda),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(f"launched with WORLD_SIZE={world_size} but accelerate runs {accelerator.num_processes} "
                           "process(es): the ranks would train independently")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # per-file checkpoint chatter
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "Removed shared tensor" (tied embeddings)
    transformers.utils.logging.disable_progress_bar()
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    output_dir = Path(args.output_dir)
    run_id, resume_dir = prepare_output_dir(args, accelerator)
    hub_repo_id = create_hub_repo(args, output_dir) if args.push_to_hub and accelerator.is_main_process else None

    # ---- data -----------------------------------------------------------------------------------------------------
    try:
        raw, data_description, data_meta = load_raw_splits(args)
    except DataFormatError as exc:
        hint = "" if "gzip" in exc.reason else " (use --skip_bad_lines to skip such lines)"
        raise SystemExit(f"train.py: error: bad data line: {exc}{hint}") from None
    except (ValueError, FileNotFoundError, ImportError) as exc:  # a missing column, a bad row, no `datasets`
        raise SystemExit(f"train.py: error: {exc}") from None
    tokenizer = get_tokenizer(args, accelerator, raw["train"], resume_dir)
    turn_separator = args.turn_separator if args.turn_separator is not None else tokenizer.eos_token
    logger.info("***** Data *****")
    encoded = {}
    for split, examples in raw.items():
        logger.info(f"  {split}: Num examples = {len(examples)}")
        if hasattr(examples, "map"):  # a datasets.Dataset: batched, cached map
            with accelerator.main_process_first():
                encoded[split] = tokenize_dataset(examples, tokenizer, args.max_source_length, args.max_target_length,
                                                  turn_separator, num_proc=args.num_proc, desc=f"Tokenizing {split}")
        else:
            encoded[split] = encode_examples(tokenizer, examples, args.max_source_length, args.max_target_length,
                                             turn_separator, desc=f"Tokenizing {split}",
                                             show_progress=accelerator.is_local_main_process)
    if data_meta["skipped_lines"]:
        logger.info(f"  Skipped bad lines = {data_meta['skipped_lines']}")

    # ---- model, optimizer, schedules ------------------------------------------------------------------------------
    try:
        model = build_model(args, tokenizer)
    except ValueError as exc:
        raise SystemExit(f"train.py: error: {exc}") from None
    # Saved with the tokenizer: `tokenizer(context, truncation=True)` keeps the latest turns and fits the model.
    tokenizer.truncation_side = tokenizer.init_kwargs["truncation_side"] = "left"
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = min(
        tokenizer.model_max_length, model.config.max_position_embeddings)
    multiple = args.pad_to_multiple_of or None  # rounded lengths must still fit the position embeddings
    if multiple and -(-max(args.max_source_length, args.max_target_length) // multiple) * multiple > \
            model.config.max_position_embeddings:
        multiple = None
    # labels padded with -100; the model shifts them itself
    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=multiple)
    sampler = None
    if args.group_by_length:  # by (source bucket, target) length
        lengths = [(-(-len(e["input_ids"]) // (multiple or 1)), len(e["labels"])) for e in encoded["train"]]
        sampler = LengthGroupedSampler(lengths, args.per_device_train_batch_size, seed=args.seed)
    # The generator also keeps the loader's worker seed off the global RNG (exact resume). Collation (≈ 9 ms per
    # batch of 128 on one CPU core) runs in workers on CUDA; batches are deterministic functions of the sampler's
    # indices, which the main process draws, so exact resume does not depend on the workers.
    workers = args.dataloader_num_workers
    train_collator = collator
    if args.torch_compile:
        # a few batch shapes: the step compiles once per shape, for static sizes, and replays their CUDA graphs. The
        # contexts are padded to power-of-two buckets from COMPILED_MIN_SOURCE_BUCKET up (DailyDialog's contexts,
        # 83 tokens on average, padded to 256 made the encoder do 3x the work); the responses to
        # --max_target_length, since batches grouped by context length mix response lengths
        train_collator = StaticShapeCollator(collator, min(args.max_source_length, model.config.max_position_embeddings),
                                             args.max_target_length, tokenizer.pad_token_id,
                                             min_source_bucket=COMPILED_MIN_SOURCE_BUCKET)
    train_dataloader = DataLoader(encoded["train"], shuffle=sampler is None, sampler=sampler, collate_fn=train_collator,
                                  batch_size=args.per_device_train_batch_size, drop_last=args.torch_compile,
                                  generator=torch.Generator().manual_seed(args.seed), num_workers=workers,
                                  persistent_workers=workers > 0, pin_memory=on_cuda)
    eval_split = "validation" if "validation" in encoded else None
    eval_dataloaders = {split: DataLoader(encoded[split], collate_fn=collator, batch_size=args.per_device_eval_batch_size)
                        for split in ("validation", "test") if split in encoded}

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(  # fused on CUDA: one kernel per step instead of several per weight group
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=on_cuda,
    )
    model, optimizer, train_dataloader, *prepared_eval = accelerator.prepare(
        model, optimizer, train_dataloader, *eval_dataloaders.values())
    eval_dataloaders = dict(zip(eval_dataloaders, prepared_eval))

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    # Stepped by hand once per update (not through accelerate, which would step it once per process).
    try:
        lr_scheduler = create_lr_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps,
                                           args.max_train_steps, args.lr_scheduler_kwargs)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"train.py: error: --lr_scheduler_type {args.lr_scheduler_type} "
                         f"(--lr_scheduler_kwargs {args.lr_scheduler_kwargs}): {exc}") from None
    # Stepped with each validation loss instead of once per update; its state goes into trainer_state.json (JSON,
    # not accelerate's custom_checkpoint_0.pkl, which accelerate unpickles without the weights-only restriction).
    metric_scheduler = scheduler_needs_metric(lr_scheduler)
    set_seed(args.seed, device_specific=True)  # per-rank noise (dropout, latents); the weights were broadcast by DDP

    public_args = {k: v for k, v in vars(args).items() if k != "hub_token"}  # training_args.json is uploaded
    if args.with_tracking:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in public_args.items()}
        accelerator.init_trackers("runs", config=hparams)
    if accelerator.is_main_process:
        write_text_atomic(output_dir / "training_args.json",
                          json.dumps({**public_args, "run_id": run_id, "turn_separator": turn_separator}, indent=2))

    # ---- resume ---------------------------------------------------------------------------------------------------
    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    # best_metric: the --metric_for_best_model value of best/ (best_eval_loss: its validation loss)
    state = {"best_eval_loss": None, "best_metric": None, "best_step": None, "training_time_s": 0.0}
    if resume_dir is not None:
        logger.info(f"Resuming from {resume_dir}")
        saved = json.loads((resume_dir / "trainer_state.json").read_text())
        try:
            accelerator.load_state(str(resume_dir))  # safetensors + torch.load(weights_only=True)
            lr_scheduler.load_state_dict(saved.pop("lr_scheduler"))
        except Exception as exc:
            raise SystemExit(f"train.py: error: cannot resume from {resume_dir}: {type(exc).__name__}: {exc}") from None
        state.update({k: v for k, v in saved.items() if k in state})
        completed_steps, starting_epoch, resume_batches = saved["completed_steps"], saved["epoch"], saved["batches_in_epoch"]
        if resume_batches >= len(train_dataloader):
            starting_epoch, resume_batches = starting_epoch + 1, 0

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(encoded['train'])}")
    logger.info(f"  Num epochs = {num_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    logger.info(f"  Parameters = {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    log_file = output_dir / "log_history.jsonl"
    if accelerator.is_main_process:  # a fresh run starts a fresh history; a resumed one drops the rows it replays
        kept = []
        for line in (log_file.read_text().splitlines() if resume_dir is not None and log_file.is_file() else []):
            with contextlib.suppress(ValueError):  # a line cut by a kill
                if json.loads(line)["step"] <= completed_steps:
                    kept.append(line + "\n")
        write_text_atomic(log_file, "".join(kept))

    def log(values: dict, step: int) -> None:
        if args.with_tracking:
            accelerator.log(values, step=step)
        if accelerator.is_main_process:
            with log_file.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    last_eval: dict[int, dict] = {}

    # the non-finite flag of each update, read back one update late on CUDA (DeferredReadback)
    nonfinite_readback = DeferredReadback(accelerator.device)

    def stop_if_nonfinite(readback) -> None:
        """Stop at a non-finite update, before anything from it on is saved (`readback`: a DeferredReadback value)."""
        if readback is None:
            return
        (step, in_epoch, batch_index), (flag, loss) = readback[0], readback[1].tolist()
        if flag > 0:
            raise SystemExit(
                f"train.py: error: non-finite loss or gradient (loss {loss}) at update step {step} (epoch {in_epoch}, "
                f"batch {batch_index}): stopping; no checkpoint or model from this update on is saved. Try a lower "
                "--learning_rate, --max_grad_norm, or --mixed_precision no.")

    def run_evaluation(step: int) -> dict:
        stop_if_nonfinite(nonfinite_readback.flush())  # it may save best/
        results = evaluate(model, eval_dataloaders[eval_split], accelerator, args, tokenizer,
                           raw[eval_split], encoded[eval_split])
        logger.info(f"step {step}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        log({f"eval_{k}": v for k, v in results.items()}, step)
        metric = args.metric_for_best_model
        sign = BEST_MODEL_METRICS[metric]  # +1: higher is better
        best = state["best_metric"] if state["best_metric"] is not None else (
            state["best_eval_loss"] if metric == "loss" else None)  # a checkpoint from before best_metric existed
        if not math.isfinite(results["loss"]) or not math.isfinite(results[metric]):
            logger.warning(f"step {step}: validation loss {results['loss']} / {metric} {results[metric]} is not "
                           "finite: not a candidate for best/")
        elif best is None or sign * results[metric] > sign * best:
            state["best_eval_loss"], state["best_metric"], state["best_step"] = results["loss"], results[metric], step
            save_model_folder(accelerator, model, tokenizer, output_dir / "best")
        if metric_scheduler and math.isfinite(results["loss"]):
            lr_scheduler.step(results["loss"])
        if accelerator.is_main_process:
            write_text_atomic(output_dir / "eval_results.json", json.dumps(
                {"step": step, "epoch": step / steps_per_epoch, **{f"eval_{k}": v for k, v in results.items()},
                 "metric_for_best_model": metric, "best_step": state["best_step"], "best_metric": state["best_metric"]},
                indent=2))
        last_eval.clear()
        last_eval[step] = results
        return results

    def trainer_state(epoch: int, batches_in_epoch: int) -> dict:
        return {**state, "completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                "training_time_s": state["training_time_s"] + time.time() - train_start, "run_id": run_id,
                "lr_scheduler": lr_scheduler.state_dict()}

    def checkpoint(name: str, epoch: int, batches_in_epoch: int) -> None:
        stop_if_nonfinite(nonfinite_readback.flush())
        save_checkpoint(accelerator, model, tokenizer, output_dir / name, trainer_state(epoch, batches_in_epoch),
                        args.debug_sigkill)
        if accelerator.is_main_process:
            prune_checkpoints(output_dir, run_id, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    # ---- train ----------------------------------------------------------------------------------------------------
    progress = tqdm(range(args.max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    train_start = time.time()
    train_forward = model
    if args.torch_compile:
        logger.info(f"torch.compile of the training step (mode {args.torch_compile_mode}, backend "
                    f"{args.torch_compile_backend}): the first updates compile")
        # static sizes (StaticShapeCollator): on the H200 (torch 2.11) inductor's dynamic-size compile of this
        # step needed its coalescing analysis off, and the recipe's run then died (SIGSEGV) in its first updates
        train_forward = CompiledTrainingForward(model, args.torch_compile_mode, args.torch_compile_backend,
                                                dynamic=False)
    beta_tensor = torch.zeros((), device=accelerator.device)  # β as a device tensor: no recompile, no host copy
    running = torch.zeros(len(LOSS_KEYS), device=accelerator.device)
    running_count = 0
    nonfinite = torch.zeros((), device=accelerator.device)  # NaN / inf losses in the current update (any rank)
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        if completed_steps >= args.max_train_steps:
            break
        train_dataloader.set_epoch(epoch)
        skip = resume_batches if epoch == starting_epoch else 0
        active_dataloader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch_index, batch in enumerate(active_dataloader, start=skip):
            beta = kl_weight(completed_steps, args.kl_annealing, args.kl_annealing_steps, steps_per_epoch)
            with accelerator.accumulate(model):
                outputs = train_forward(**batch, kl_weight=beta_tensor.fill_(beta))
                accelerator.backward(outputs.loss)
                nonfinite += (~torch.isfinite(outputs.loss.detach())).float()
                if accelerator.sync_gradients:
                    grad_norm = (accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                                 if accelerator.mixed_precision != "fp16" else torch.zeros(()))  # fp16: the scaler skips
                    nonfinite += (~torch.isfinite(grad_norm.to(nonfinite.device))).float()
                    # every rank reads the same flag, so all stop at the same update; on CUDA it is read one update
                    # late (DeferredReadback), on the CPU before this update's optimizer step
                    stop_if_nonfinite(nonfinite_readback.push(
                        torch.stack([accelerator.reduce(nonfinite, "max"), outputs.loss.detach().float()]),
                        (completed_steps + 1, epoch, batch_index)))
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped and not metric_scheduler:
                    lr_scheduler.step()
                optimizer.zero_grad()
            running += torch.stack([getattr(outputs, k).detach().float() if getattr(outputs, k) is not None
                                    else running.new_zeros(()) for k in LOSS_KEYS])
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            nonfinite.zero_()

            completed_steps += 1
            progress.update(1)
            if args.debug_sigkill == f"update:{completed_steps}":
                os.kill(os.getpid(), signal.SIGKILL)
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                means = (accelerator.reduce(running, "mean") / running_count).tolist()
                values = {k: v for k, v in zip(LOSS_KEYS, means) if k in ("loss", "rc_loss", "kl_loss")
                          or accelerator.unwrap_model(model).config.prior_type == "diffusion"}
                values.update(beta=beta, lr=lr_scheduler.get_last_lr()[0], epoch=completed_steps / steps_per_epoch,
                              train_time_s=state["training_time_s"] + time.time() - train_start)
                progress.set_postfix(loss=f"{values['loss']:.3f}", rc=f"{values['rc_loss']:.2f}",
                                     kl=f"{values['kl_loss']:.2f}", beta=f"{beta:.2f}")
                log(values, completed_steps)
                running.zero_()
                running_count = 0
                if args.max_train_minutes is not None:  # every rank must stop at the same update
                    elapsed = state["training_time_s"] + time.time() - train_start
                    out_of_time = torch.tensor(float(elapsed > 60 * args.max_train_minutes), device=accelerator.device)
                    if accelerator.reduce(out_of_time, "max").item() > 0:
                        logger.info(f"--max_train_minutes {args.max_train_minutes} reached after {completed_steps} updates")
                        args.max_train_steps = completed_steps
            if args.eval_steps and eval_split and completed_steps % args.eval_steps == 0:
                run_evaluation(completed_steps)
            if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                checkpoint(f"step_{completed_steps}", epoch, batch_index + 1)
            if completed_steps >= args.max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            checkpoint(f"epoch_{epoch}", epoch, len(train_dataloader))
    stop_if_nonfinite(nonfinite_readback.flush())  # the last update, before the final evaluation and save
    progress.close()
    training_time = state["training_time_s"] + time.time() - train_start

    # ---- final evaluation, model, samples, card, hub --------------------------------------------------------------
    final_results, results_split = {}, eval_split
    if eval_split:
        final_results = last_eval.get(completed_steps) or run_evaluation(completed_steps)
    if "test" in eval_dataloaders:
        test_results = evaluate(model, eval_dataloaders["test"], accelerator, args, tokenizer, raw["test"], encoded["test"])
        logger.info("test: " + ", ".join(f"{k} {v:.4g}" for k, v in test_results.items()))
        log({f"test_{k}": v for k, v in test_results.items()}, completed_steps)
        final_results, results_split = test_results, "test"
        if accelerator.is_main_process:
            previous = json.loads((output_dir / "eval_results.json").read_text()) if eval_split else {}
            write_text_atomic(output_dir / "eval_results.json", json.dumps(
                {**previous, **{f"test_{k}": v for k, v in test_results.items()}}, indent=2))
    save_model_folder(accelerator, model, tokenizer, output_dir, merge=True)

    samples = []
    if accelerator.is_main_process and args.num_sample_contexts > 0:
        split = eval_split or "train"
        picks = [round(i * (len(raw[split]) - 1) / max(1, args.num_sample_contexts - 1))
                 for i in range(min(args.num_sample_contexts, len(raw[split])))]
        unwrapped = accelerator.unwrap_model(model).eval()
        with torch.random.fork_rng(devices=[]), accelerator.autocast():
            torch.manual_seed(args.seed)
            samples = sample_responses(unwrapped, tokenizer, [raw[split][i] for i in picks],
                                       [encoded[split][i] for i in picks], args, args.num_samples_per_context, args.seed)
        print(f"\n***** {len(samples)} {split} contexts, {args.num_samples_per_context} sampled responses each "
              "(one prior draw per sample; top-k 50, top-p 0.9) *****", flush=True)
        print(format_samples(samples), flush=True)

    if args.debug_dump_rank_weights:
        dump = Path(args.debug_dump_rank_weights)
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"rank{accelerator.process_index}.json").write_text(json.dumps({
            "rank": accelerator.process_index, "num_processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type), "completed_steps": completed_steps,
            "checksum": weights_checksum(accelerator.unwrap_model(model)),
        }))

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        counts = {split: len(examples) for split, examples in raw.items()}
        if data_meta["skipped_lines"]:
            counts["skipped bad lines"] = data_meta["skipped_lines"]
        write_model_card(args, output_dir, {
            "results": final_results, "results_split": results_split or "-", "config": unwrapped.config,
            "meta": data_meta, "data_description": data_description, "counts": counts, "samples": samples,
            "samples_split": eval_split or "train",
            "num_parameters": sum(p.numel() for p in unwrapped.parameters()), "num_processes": accelerator.num_processes,
            "total_batch_size": total_batch_size, "completed_steps": completed_steps,
            "epochs": completed_steps / steps_per_epoch, "turn_separator": turn_separator,
            "mixed_precision": accelerator.mixed_precision, "training_time_s": training_time,
            "device": f"{accelerator.num_processes} × {accelerator.device.type}",
        })
        write_training_curves(log_file, output_dir)
        if args.push_to_hub:
            push_to_hub(args, output_dir, hub_repo_id)
            logger.info(f"Pushed {output_dir} to https://huggingface.co/{hub_repo_id}")
        logger.info(f"Saved the model to {output_dir} (training {format_duration(training_time)}, "
                    f"total {format_duration(time.time() - start_time)})")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
