"""examples/train.py's argument checks, as tables: `VALUE_CHECKS` (flags, test of a given value, what it must be)
and `RULES` (checks across flags, each returning what is wrong or None). `parse_args` applies both before anything
is loaded, so a bad flag fails in a second with its name, not after the tokenizer is trained."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from ..configuration_dior import DiorCVAEConfig
from ..utils_dior import compiled_training_problem
from .compiled import uses_cuda_graphs
from .model_config import config_problem
from .sources import data_argument_rules

MAX_SAMPLES_PER_CONTEXT = 1000  # sampled responses per validation / printed context

# ---- argument checks: (flags, test of a given value, what it must be) --------------------------------------------
VALUE_CHECKS = [
    (("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
      "max_source_length", "eval_samples_per_context", "num_samples_per_context", "max_train_steps", "eval_steps",
      "checkpoints_total_limit", "max_train_samples", "max_eval_samples", "train_tokenizer_vocab_size"),
     lambda v: v >= 1, "must be >= 1"),
    (("max_target_length",), lambda v: v >= 2, "must be >= 2"),
    (("num_warmup_steps", "num_eval_generation_samples", "num_sample_contexts", "kl_annealing_steps",
      "dataloader_num_workers"), lambda v: v >= 0, "must be >= 0"),
    (("learning_rate", "max_train_minutes"), lambda v: 0 < v < math.inf, "must be a finite number > 0"),
    (("weight_decay", "max_grad_norm", "adam_epsilon"), lambda v: 0 <= v < math.inf, "must be a finite number >= 0"),
    (("adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "must be in [0, 1)"),
    (("seed", "pad_to_multiple_of"), lambda v: v >= 0, "must be >= 0"),
    (("num_proc",), lambda v: v >= 1, "must be >= 1"),
    (("eval_samples_per_context", "num_samples_per_context"), lambda v: v <= MAX_SAMPLES_PER_CONTEXT,
     f"must be <= {MAX_SAMPLES_PER_CONTEXT}"),
]



def _max_positions(args) -> int | None:
    """The model's max_position_embeddings as far as it is known before loading anything: --max_position_embeddings,
    a local --config_name / --model_name_or_path config.json, or the from-scratch default (None for a Hub model)."""
    if getattr(args, "max_position_embeddings", None) is not None:
        return int(args.max_position_embeddings)
    for source in (args.config_name, args.model_name_or_path):
        if source:
            config_file = Path(source).expanduser()
            config_file = config_file / "config.json" if config_file.is_dir() else config_file
            try:
                return int(json.loads(config_file.read_text())["max_position_embeddings"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
    return DiorCVAEConfig.max_position_embeddings


def _length_problem(args) -> str | None:
    positions = _max_positions(args)
    for name in ("max_source_length", "max_target_length"):
        if positions is not None and getattr(args, name) > positions:
            return f"--{name} {getattr(args, name)} is longer than the model's max_position_embeddings ({positions})"
    return None


def _tracker_problem(args) -> str | None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    known = sorted(LOGGER_TYPE_TO_CLASS) + ["all"]
    unknown = [r for r in args.report_to.split(",") if r.strip() not in known]
    return unknown and f"--report_to {args.report_to}: unknown tracker {', '.join(unknown)} (one of {', '.join(known)})"


def _compile_backend_problem(args) -> str | None:
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    return (args.torch_compile_backend not in backends and f"--torch_compile_backend {args.torch_compile_backend}: "
            f"not a torch.compile backend (one of {', '.join(backends)})")


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id (`namespace/name`): ./x, ../x, /x, ~/x, a/b/c."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


EXTRAS = 'pip install -e ".[train]"'  # the training extras
# ---- checks across flags: each returns what is wrong, or None ----------------------------------------------------
RULES = [
    *data_argument_rules(EXTRAS),
    lambda a: not (a.model_name_or_path or a.tokenizer_name or a.train_tokenizer_vocab_size) and
    "a model from scratch needs --tokenizer_name or --train_tokenizer_vocab_size",
    lambda a: a.num_train_epochs < 1 and not a.max_train_steps and f"--num_train_epochs must be >= 1, got {a.num_train_epochs}",
    lambda a: a.checkpointing_steps not in (None, "epoch") and not (
        str(a.checkpointing_steps).isdigit() and int(a.checkpointing_steps) >= 1) and
    f'--checkpointing_steps must be an integer >= 1 or "epoch", got {a.checkpointing_steps!r}',
    lambda a: a.metric_for_best_model != "loss" and not a.num_eval_generation_samples and
    f"--metric_for_best_model {a.metric_for_best_model} is a metric of sampled responses: it needs "
    "--num_eval_generation_samples > 0",
    lambda a: a.lr_scheduler_kwargs is not None and not isinstance(a.lr_scheduler_kwargs, dict) and
    "--lr_scheduler_kwargs must be a JSON object",
    lambda a: a.torch_compile and (problem := compiled_training_problem()) and f"--torch_compile: {problem}",
    lambda a: a.torch_compile and uses_cuda_graphs(a.torch_compile_mode, a.torch_compile_backend) and
    a.gradient_accumulation_steps > 1 and
    f"--torch_compile_mode {a.torch_compile_mode} replays CUDA graphs, whose outputs (the gradients included) the "
    f"next micro-batch overwrites: it needs --gradient_accumulation_steps 1, got {a.gradient_accumulation_steps} "
    "(use --torch_compile_mode default)",
    *(lambda a, flag=flag: (value := getattr(a, flag)) and _looks_local(value) and not Path(value).expanduser().exists()
      and f"--{flag}: no such folder: {value}"
      for flag in ("model_name_or_path", "tokenizer_name", "config_name")),
    lambda a: _missing("matplotlib") and f"training_curves.png needs matplotlib: {EXTRAS}",
    lambda a: a.with_tracking and a.report_to in ("tensorboard", "all") and _missing("tensorboard") and
    f"--with_tracking --report_to {a.report_to} needs tensorboard: {EXTRAS}",
    lambda a: (problem := config_problem(a)) and f"the model configuration: {problem}",
    lambda a: a.turn_separator == "" and "--turn_separator must not be empty: the context's turns would run together "
    "(default: the tokenizer's eos token)",
    lambda a: (out := Path(a.output_dir).expanduser().resolve()) == out.parent and
    f"--output_dir {a.output_dir} is a filesystem root: give a folder for this run's outputs",
    lambda a: a.resume_from_checkpoint not in (None, "latest") and not Path(a.resume_from_checkpoint).is_dir() and
    f'--resume_from_checkpoint: no such folder: {a.resume_from_checkpoint} (a step_N / epoch_N folder or "latest")',
    lambda a: a.with_tracking and _tracker_problem(a),
    lambda a: a.torch_compile and _compile_backend_problem(a),
    _length_problem,
]
