#!/usr/bin/env python
"""Train Dior-CVAE on dialog data with 🤗 Accelerate: arguments, setup, training loop, finish, in the shape of
transformers' `run_summarization_no_trainer.py`; the parts live in `dior_cvae.training`.

    accelerate launch examples/train.py            # no arguments: a CPU demo of a few minutes on the shipped
    python examples/train.py                       #   DailyDialog sample (from scratch, trained tokenizer)

    accelerate launch examples/train.py \\
        --model_name_or_path facebook/bart-base --dataset_dir path/to/ijcnlp_dailydialog \\
        --learning_rate 5e-4 --lr_scheduler_type inverse_sqrt --num_warmup_steps 20000 \\
        --kl_annealing linear --kl_annealing_steps 20000 --per_device_train_batch_size 32 \\
        --checkpointing_steps 5000 --eval_steps 5000 --with_tracking --output_dir outputs/dior-dd

Needs the training extras: `pip install -e ".[train]"`. Data: one of --dataset_name, --dataset_dir or --train_file.
Model: --model_name_or_path (BART → `from_bart`, or a Dior-CVAE folder), or from scratch from --config_name and/or
the config's fields as flags (`--d_model 256 --latent_size 16 --prior_type gaussian`).

Outputs in --output_dir: the model + tokenizer (loadable with `trust_remote_code=True`), README.md (model card),
eval_results.json, log_history.jsonl, training_args.json, training_curves.png, run.json (the run's id), best/ (by
--metric_for_best_model), step_N/ or epoch_N/ checkpoints (accelerate state for exact resume, a pretrained/ model
folder, and a manifest of sha256s: --resume_from_checkpoint latest takes the newest intact one of this run), runs/
(TensorBoard).

Safety (dior_cvae/training/outputs.py): --output_dir is locked for the run's lifetime (a second run on it is refused
with the first one's pid). A non-empty folder is refused unless --resume_from_checkpoint finds an intact checkpoint
of its run, or --overwrite_output_dir is given, which replaces only what earlier runs of this script wrote there and
left unchanged (recorded in .dior-outputs.json): a file in the way that no run wrote, or that was edited since, is
refused by name, and nothing else is deleted. A resumed run must match the checkpoint's record of its data, model
config, batches and schedules (refused, naming each difference, unless --ignore_resume_mismatch). Files and folders
are written atomically; the final model is staged and moved in with a journal, so a kill leaves the old model or
(once the next run on the folder completes the moves) the new one. A non-finite loss or gradient stops the run
before anything of it is saved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dior_cvae.training.checkpointing import (NonFiniteGuard, TrainingError, check_resume_record, load_checkpoint,
                                              prepare_output_dir, prune_checkpoints, run_record, save_checkpoint,
                                              save_model_folder, seal_output_dir, trim_log_history)
from dior_cvae.training.outputs import write_atomic
from dior_cvae.training.arguments import RULES, VALUE_CHECKS
from dior_cvae.training.compiled import CompiledTrainingForward
from dior_cvae.training.evaluation import BEST_MODEL_METRICS, BestModel, evaluate, print_samples
from dior_cvae.training.model_config import add_config_arguments, build_model
from dior_cvae.training.optimization import (KL_ANNEALING_SCHEDULES, LR_SCHEDULES, create_lr_scheduler,
                                             create_optimizer, kl_weight, scheduler_needs_metric)
from dior_cvae.training.reporting import (LossMeter, RunLog, configure_logging, create_hub_repo, format_duration,
                                          push_output_dir, write_eval_results, write_model_card, write_training_curves)
from dior_cvae.training.sources import (SAMPLE_DIR, add_data_arguments, encode_splits, fit_tokenizer_and_collator,
                                        get_tokenizer, read_data, train_dataloader)

logger = get_logger(__name__)

# --torch_compile: the shortest context bucket (64, 128, 256, ... up to --max_source_length: one compile each)
COMPILED_MIN_SOURCE_BUCKET = 64

# `python examples/train.py` with no arguments: a smoke test of the pipeline, a small from-scratch model (3.8M
# parameters, diffusion prior) on the shipped DailyDialog sample for 3 epochs or 4 minutes, whichever ends first, then
# 3 validation contexts with 4 sampled responses each (4 prior draws). Its model card says it is a smoke test.
DEFAULT_ARGS = [
    "--dataset_dir", str(SAMPLE_DIR), "--train_tokenizer_vocab_size", "4000",
    "--d_model", "192", "--encoder_layers", "2", "--latent_size", "16", "--max_position_embeddings", "128",
    "--dropout", "0.1", "--attention_dropout", "0.0", "--activation_dropout", "0.0", "--denoiser_hidden_size", "256",
    "--memory_dropout", "0.3", "--max_source_length", "64", "--max_target_length", "32",
    "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "64", "--learning_rate", "1e-3",
    "--weight_decay", "0.01", "--lr_scheduler_type", "inverse_sqrt", "--num_warmup_steps", "100",
    "--kl_annealing", "linear", "--kl_annealing_steps", "300", "--num_train_epochs", "3", "--max_train_minutes", "4",
    "--max_eval_samples", "256", "--num_eval_generation_samples", "32", "--logging_steps", "20", "--smoke_test",
    "--output_dir", "outputs/dior-cvae-dailydialog-sample",
    "--overwrite_output_dir",  # the demo may be re-run; files it does not write are kept
]

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag with its default; the description as written."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    add_data_arguments(p)

    model = p.add_argument_group("model and tokenizer")
    model.add_argument("--model_name_or_path", default=None,
                       help="A pretrained BART (hub id or folder; loaded with `from_bart`) or a Dior-CVAE folder.")
    model.add_argument("--config_name", default=None,
                       help="A Dior-CVAE config (config.json, or its folder) for training from scratch.")
    model.add_argument("--tokenizer_name", default=None,
                       help="Tokenizer folder or hub id; a folder with only vocab.json + merges.txt is read as BART's.")
    model.add_argument("--train_tokenizer_vocab_size", type=int, default=None,
                       help="Train a byte-level BPE of this size on the training split (models from scratch).")
    model.add_argument("--trust_remote_code", action="store_true",
                       help="Let a --tokenizer_name / --model_name_or_path folder or repo run its own Python code.")
    add_config_arguments(p)

    train = p.add_argument_group("training")
    for name, default in (("per_device_train_batch_size", 8), ("per_device_eval_batch_size", 8), ("learning_rate", 5e-5),
                          ("weight_decay", 0.0), ("adam_beta1", 0.9), ("adam_beta2", 0.999), ("adam_epsilon", 1e-8)):
        train.add_argument(f"--{name}", type=type(default), default=default)
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
                            f"({COMPILED_MIN_SOURCE_BUCKET} tokens up to --max_source_length), its responses to "
                            "--max_target_length, and the last partial batch of each epoch is dropped, so the step "
                            "compiles once per bucket for static shapes; see docs/performance.md for when it pays.")
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
                     help="Write into a non-empty --output_dir, replacing only what earlier runs of this script wrote "
                          "there (recorded in .dior-outputs.json) and left unchanged; any other file in the way is "
                          "refused. Nothing else is overwritten or deleted.")
    run.add_argument("--checkpointing_steps", default=None, help='"N" (every N updates) or "epoch".')
    run.add_argument("--checkpoints_total_limit", type=int, default=None,
                     help="Keep only the newest N checkpoints of this run (older ones are deleted).")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help='A step_N/epoch_N folder, or "latest" (the newest intact checkpoint of the run in --output_dir; '
                          "with none, a fresh run, which a non-empty folder refuses without --overwrite_output_dir).")
    run.add_argument("--ignore_resume_mismatch", action="store_true",
                     help="Resume even where the data, model config, batch or schedule differ from the checkpoint's "
                          "record (refused by default, naming each difference).")
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
    hub.add_argument("--smoke_test", action="store_true",
                     help="The model card says the model is a smoke test of the pipeline: its metrics are listed as "
                          "a check that evaluation runs, not put in the model-index as results (set by the "
                          "no-argument demo).")

    for action in p._actions:  # flags without a help text show their default too
        if action.help is None:
            action.help = "(default: %(default)s)"
    args = p.parse_args(argv)
    for names, test, requirement in VALUE_CHECKS:
        for name in names:
            if getattr(args, name) is not None and not test(getattr(args, name)):
                p.error(f"--{name} {requirement}, got {getattr(args, name)}")
    for rule in RULES:
        if problem := rule(args):
            p.error(problem)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("No arguments: running the built-in demo (tiny Dior-CVAE on the shipped DailyDialog sample).", flush=True)
        argv = DEFAULT_ARGS
    args = parse_args(argv)
    start_time = time.time()

    # ---- setup ------------------------------------------------------------------------------------------------------
    # On a machine without GPUs, `torchrun`/`accelerate launch --multi_gpu` start N processes that accelerate treats
    # as independent single-process runs unless told to use the CPU backend (gloo): do that.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cpu = args.cpu or (world_size > 1 and not torch.cuda.is_available())
    on_cuda = not use_cpu and torch.cuda.is_available()
    if args.dataloader_num_workers is None:
        args.dataloader_num_workers = 2 if on_cuda else 0
    accelerator = Accelerator(
        cpu=use_cpu, gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision, log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if args.ddp_find_unused_parameters
        else [],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=on_cuda),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(f"launched with WORLD_SIZE={world_size} but accelerate runs {accelerator.num_processes} "
                           "process(es): the ranks would train independently")
    configure_logging(accelerator)
    set_seed(args.seed)

    output_dir = Path(args.output_dir)
    run_id, resume_dir = prepare_output_dir(accelerator, output_dir, args.resume_from_checkpoint,
                                            args.overwrite_output_dir)
    hub_repo_id = create_hub_repo(args.hub_model_id or output_dir.resolve().name, args.hub_token,  # before training
                                  args.hub_private_repo) if args.push_to_hub and accelerator.is_main_process else None

    raw, data_description, data_meta = read_data(args)
    tokenizer = get_tokenizer(args, accelerator, raw["train"], resume_dir)
    turn_separator = args.turn_separator if args.turn_separator is not None else tokenizer.eos_token
    logger.info("***** Data *****")
    encoded = encode_splits(raw, tokenizer, accelerator, args.max_source_length, args.max_target_length,
                            turn_separator, args.num_proc)
    if data_meta["skipped_lines"]:
        logger.info(f"  Skipped bad lines = {data_meta['skipped_lines']}")

    try:
        model = build_model(args, tokenizer)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    collator, multiple = fit_tokenizer_and_collator(tokenizer, model, args.max_source_length, args.max_target_length,
                                                    args.pad_to_multiple_of)
    # --torch_compile: a few batch shapes (contexts in power-of-two buckets, responses at --max_target_length, since
    # batches grouped by context length mix response lengths): one static compile each, replayed as CUDA graphs
    static_shapes = dict(source_length=min(args.max_source_length, model.config.max_position_embeddings),
                         target_length=args.max_target_length, pad_token_id=tokenizer.pad_token_id,
                         min_source_bucket=COMPILED_MIN_SOURCE_BUCKET) if args.torch_compile else None
    train_batches = train_dataloader(encoded["train"], collator, args.per_device_train_batch_size,
                                     group_by_length=args.group_by_length, pad_multiple=multiple, seed=args.seed,
                                     num_workers=args.dataloader_num_workers, pin_memory=on_cuda,
                                     static_shapes=static_shapes)
    eval_split = "validation" if "validation" in encoded else None
    eval_batches = {split: DataLoader(encoded[split], collate_fn=collator, batch_size=args.per_device_eval_batch_size)
                    for split in ("validation", "test") if split in encoded}
    optimizer = create_optimizer(model, args.learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2),
                                 args.adam_epsilon, fused=on_cuda)
    model, optimizer, train_batches, *prepared_eval = accelerator.prepare(
        model, optimizer, train_batches, *eval_batches.values())
    eval_batches = dict(zip(eval_batches, prepared_eval))

    steps_per_epoch = math.ceil(len(train_batches) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    try:  # stepped here once per update (not through accelerate, which would step it once per process)
        lr_scheduler = create_lr_scheduler(args.lr_scheduler_type, optimizer, args.num_warmup_steps,
                                           args.max_train_steps, args.lr_scheduler_kwargs)
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"--lr_scheduler_type {args.lr_scheduler_type} (--lr_scheduler_kwargs "
                            f"{args.lr_scheduler_kwargs}): {exc}") from None
    # reduce_lr_on_plateau / greedy step with each validation loss; the schedule's state goes into the checkpoint's
    # trainer_state.json (JSON, not a pickle in accelerate's state)
    metric_scheduler = scheduler_needs_metric(lr_scheduler)
    record = run_record(args, accelerator.num_processes, encoded["train"], accelerator.unwrap_model(model).config)
    set_seed(args.seed, device_specific=True)  # per-rank noise (dropout, latents); the weights were broadcast by DDP

    public_args = {k: v for k, v in vars(args).items() if k != "hub_token"}  # training_args.json is uploaded
    if args.with_tracking:
        accelerator.init_trackers("runs", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                  for k, v in public_args.items()})
    if accelerator.is_main_process:
        write_atomic(output_dir / "training_args.json",
                          json.dumps({**public_args, "run_id": run_id, "turn_separator": turn_separator}, indent=2))

    completed_steps, starting_epoch, resume_batches, training_time_s = 0, 0, 0, 0.0
    best = BestModel(args.metric_for_best_model)
    if resume_dir is not None:
        logger.info(f"Resuming from {resume_dir}")
        saved = load_checkpoint(accelerator, lr_scheduler, resume_dir)
        check_resume_record(resume_dir, saved.get("record"), record, args.ignore_resume_mismatch)
        best.restore(saved)
        completed_steps, starting_epoch, resume_batches = saved["completed_steps"], saved["epoch"], saved["batches_in_epoch"]
        training_time_s = saved.get("training_time_s", 0.0)
        if resume_batches >= len(train_batches):
            starting_epoch, resume_batches = starting_epoch + 1, 0

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running training *****\n  Num examples = {len(encoded['train'])}\n  Num epochs = {num_epochs}\n"
                f"  Instantaneous batch size per device = {args.per_device_train_batch_size}\n  Total train batch size "
                f"(w. parallel, distributed & accumulation) = {total_batch_size}\n  Gradient accumulation steps = "
                f"{args.gradient_accumulation_steps}\n  Total optimization steps = {args.max_train_steps}\n"
                f"  Parameters = {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M\n")
    log = RunLog(accelerator, output_dir / "log_history.jsonl", args.with_tracking)
    if accelerator.is_main_process:  # a fresh run starts a fresh history; a resumed one drops the rows it replays
        trim_log_history(log.log_file, completed_steps if resume_dir is not None else None)
    guard = NonFiniteGuard(accelerator.device)
    eval_kwargs = dict(num_generation_samples=args.num_eval_generation_samples,
                       samples_per_context=args.eval_samples_per_context, batch_size=args.per_device_eval_batch_size,
                       max_new_tokens=args.max_target_length, seed=args.seed)

    def validate(step: int) -> dict:
        """Evaluate on the validation split; save best/ when it improves; step a metric-driven lr schedule."""
        guard.flush()  # it may save best/
        results = evaluate(model, eval_batches[eval_split], accelerator, tokenizer, raw[eval_split],
                           encoded[eval_split], **eval_kwargs)
        logger.info(f"step {step}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        log({f"eval_{k}": v for k, v in results.items()}, step)
        if best.improves(results, step):
            save_model_folder(accelerator, model, tokenizer, output_dir / "best")
        elif not (math.isfinite(results["loss"]) and math.isfinite(results[best.metric])):
            logger.warning(f"step {step}: validation loss {results['loss']} / {best.metric} {results[best.metric]} "
                           "is not finite: not a candidate for best/")
        if metric_scheduler and math.isfinite(results["loss"]):
            lr_scheduler.step(results["loss"])
        if accelerator.is_main_process:
            write_eval_results(output_dir, {"step": step, "epoch": step / steps_per_epoch, **{
                f"eval_{k}": v for k, v in results.items()}, "metric_for_best_model": best.metric, **best.state()})
        return results

    def checkpoint(name: str, epoch: int, batches_in_epoch: int) -> None:
        guard.flush()
        save_checkpoint(accelerator, model, tokenizer, output_dir / name, {
            **best.state(), "completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
            "training_time_s": training_time_s + time.time() - train_start, "run_id": run_id, "record": record,
            "lr_scheduler": lr_scheduler.state_dict()})
        if accelerator.is_main_process:
            prune_checkpoints(output_dir, run_id, args.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    # ---- training loop ----------------------------------------------------------------------------------------------
    progress = tqdm(range(args.max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    train_start = time.time()
    train_forward = model
    if args.torch_compile:
        logger.info(f"torch.compile of the training step (mode {args.torch_compile_mode}, backend "
                    f"{args.torch_compile_backend}): the first updates compile")
        train_forward = CompiledTrainingForward(model, args.torch_compile_mode, args.torch_compile_backend,
                                                dynamic=False)
    beta_tensor = torch.zeros((), device=accelerator.device)  # β as a device tensor: no recompile, no host copy
    losses, last_eval_step = LossMeter(accelerator), None
    nonfinite = torch.zeros((), device=accelerator.device)  # NaN / inf losses in the current update (any rank)
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        if completed_steps >= args.max_train_steps:
            break
        train_batches.set_epoch(epoch)
        skip = resume_batches if epoch == starting_epoch else 0
        batches = accelerator.skip_first_batches(train_batches, skip) if skip else train_batches
        for batch_index, batch in enumerate(batches, start=skip):
            beta = kl_weight(completed_steps, args.kl_annealing, args.kl_annealing_steps, steps_per_epoch)
            with accelerator.accumulate(model):
                outputs = train_forward(**batch, kl_weight=beta_tensor.fill_(beta))
                accelerator.backward(outputs.loss)
                nonfinite += (~torch.isfinite(outputs.loss.detach())).float()
                if accelerator.sync_gradients:
                    grad_norm = (accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                                 if accelerator.mixed_precision != "fp16" else torch.zeros(()))  # fp16: the scaler skips
                    nonfinite += (~torch.isfinite(grad_norm.to(nonfinite.device))).float()
                    # on the CPU read before this update's optimizer step; on CUDA one update late
                    guard.push(accelerator.reduce(nonfinite, "max"), outputs.loss, completed_steps + 1, epoch,
                               batch_index)
                optimizer.step()
                if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped and not metric_scheduler:
                    lr_scheduler.step()
                optimizer.zero_grad()
            losses.add(outputs)
            if not accelerator.sync_gradients:
                continue
            nonfinite.zero_()
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                values = losses.means(diffusion=accelerator.unwrap_model(model).config.prior_type == "diffusion")
                elapsed = training_time_s + time.time() - train_start
                values.update(beta=beta, lr=lr_scheduler.get_last_lr()[0], epoch=completed_steps / steps_per_epoch,
                              train_time_s=elapsed)
                progress.set_postfix(loss=f"{values['loss']:.3f}", rc=f"{values['rc_loss']:.2f}",
                                     kl=f"{values['kl_loss']:.2f}", beta=f"{beta:.2f}")
                log(values, completed_steps)
                if args.max_train_minutes is not None:  # every rank must stop at the same update
                    out_of_time = torch.tensor(float(elapsed > 60 * args.max_train_minutes), device=accelerator.device)
                    if accelerator.reduce(out_of_time, "max").item() > 0:
                        logger.info(f"--max_train_minutes {args.max_train_minutes} reached after {completed_steps} updates")
                        args.max_train_steps = completed_steps
            if args.eval_steps and eval_split and completed_steps % args.eval_steps == 0:
                last_eval_step, last_results = completed_steps, validate(completed_steps)
            if args.checkpointing_steps not in (None, "epoch") and completed_steps % int(args.checkpointing_steps) == 0:
                checkpoint(f"step_{completed_steps}", epoch, batch_index + 1)
            if completed_steps >= args.max_train_steps:
                break
        if args.checkpointing_steps == "epoch":
            checkpoint(f"epoch_{epoch}", epoch, len(train_batches))
    guard.flush()  # the last update, before the final evaluation and save
    progress.close()
    training_time_s += time.time() - train_start

    # ---- finish: final evaluation, model, samples, card, curves, Hub --------------------------------------------------
    final_results, results_split = {}, eval_split
    if eval_split:
        final_results = last_results if last_eval_step == completed_steps else validate(completed_steps)
    if "test" in eval_batches:
        final_results = evaluate(model, eval_batches["test"], accelerator, tokenizer, raw["test"], encoded["test"],
                                 **eval_kwargs)
        results_split = "test"
        logger.info("test: " + ", ".join(f"{k} {v:.4g}" for k, v in final_results.items()))
        log({f"test_{k}": v for k, v in final_results.items()}, completed_steps)
        if accelerator.is_main_process:
            write_eval_results(output_dir, {f"test_{k}": v for k, v in final_results.items()}, keep=bool(eval_split))
    save_model_folder(accelerator, model, tokenizer, output_dir, merge=True)

    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model).eval()
        split = eval_split or "train"
        samples = print_samples(unwrapped, tokenizer, raw[split], encoded[split], split, args.num_sample_contexts,
                                args.num_samples_per_context, accelerator, batch_size=args.per_device_eval_batch_size,
                                max_new_tokens=args.max_target_length, seed=args.seed)
        write_model_card(args, output_dir, unwrapped, accelerator, {
            "results": final_results, "results_split": results_split or "-", "meta": data_meta, "splits": raw,
            "data_description": data_description, "samples": samples, "samples_split": split,
            "total_batch_size": total_batch_size, "completed_steps": completed_steps,
            "epochs": completed_steps / steps_per_epoch, "turn_separator": turn_separator,
            "training_time_s": training_time_s})
        write_training_curves(log.log_file, output_dir)
        seal_output_dir(output_dir)  # a file changed by hand after this is the user's
        if args.push_to_hub:
            push_output_dir(output_dir, hub_repo_id, args.hub_token, args.hub_private_repo)
            logger.info(f"Pushed {output_dir} to https://huggingface.co/{hub_repo_id}")
        logger.info(f"Saved the model to {output_dir} (training {format_duration(training_time_s)}, "
                    f"total {format_duration(time.time() - start_time)})")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
