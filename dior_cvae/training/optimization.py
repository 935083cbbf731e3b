"""Optimisation of a training run: β of the KL term (KL annealing), the optimizer and the learning-rate schedule."""

from __future__ import annotations

import inspect

import torch
from transformers import SchedulerType, get_scheduler

KL_ANNEALING_SCHEDULES = ("linear", "cyclical", "none")
#: β of the "off" phase of the authors' cyclical schedule (their `--cycle_annealing`).
CYCLICAL_MIN_BETA = 1e-5
#: The paper's linear schedule: β from 0 to 1 over 20k steps.
PAPER_KL_ANNEALING_STEPS = 20_000


def kl_weight(step: int, schedule: str, annealing_steps: int | None = None, steps_per_epoch: int | None = None) -> float:
    """β for the optimizer step `step` (0-based: the number of updates already done).

    - `"linear"` (the paper): β = min(1, step / annealing_steps), 20k steps when `annealing_steps` is None.
    - `"cyclical"` (the authors' code): cycles of two half-cycles of `annealing_steps` updates each (one epoch when
      None, which is the authors' per-epoch cycle): β = 1e-5 for the first half-cycle; in the second it rises
      linearly from 1e-5 and reaches 1 at its middle, then stays at 1.
    - `"none"`: β = 1.
    """
    if schedule == "none":
        return 1.0
    if schedule == "linear":
        total = PAPER_KL_ANNEALING_STEPS if annealing_steps is None else annealing_steps
        return 1.0 if total <= 0 else min(1.0, step / total)
    if schedule == "cyclical":
        half = annealing_steps if annealing_steps is not None else steps_per_epoch
        if not half or half <= 0:
            raise ValueError("cyclical KL annealing needs `annealing_steps` or `steps_per_epoch` >= 1")
        phase, position = divmod(step, half)
        if phase % 2 == 0:
            return CYCLICAL_MIN_BETA
        rise = max(1.0, half / 2)
        return min(1.0, CYCLICAL_MIN_BETA + (1.0 - CYCLICAL_MIN_BETA) * position / rise)
    raise ValueError(f"unknown KL annealing schedule {schedule!r}; choose from {KL_ANNEALING_SCHEDULES}")


#: transformers' `SchedulerType` values (`inverse_sqrt` first: the paper's schedule).
LR_SCHEDULES = ("inverse_sqrt", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                "constant_with_warmup", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                "warmup_stable_decay", "greedy")


def create_lr_scheduler(name: str, optimizer, num_warmup_steps: int, num_training_steps: int, kwargs=None):
    """`transformers.get_scheduler(name, ...)`, stepped once per optimizer update (or, for the metric-driven ones,
    `reduce_lr_on_plateau` and `greedy`, once per validation with its loss: see `scheduler_needs_metric`).

    - `"inverse_sqrt"`: the paper's Noam schedule, normalised so the peak is the optimizer's lr: linear warmup to
      lr over `num_warmup_steps`, then lr·sqrt(warmup / step) (transformers' `inverse_sqrt` with timescale = warmup).
    - `"constant"` with warmup steps is `"constant_with_warmup"`.
    `kwargs` are transformers' `scheduler_specific_kwargs` (e.g. `{"min_lr_rate": 0.1}` for `cosine_with_min_lr`).
    """
    if name not in LR_SCHEDULES or name not in {s.value for s in SchedulerType}:
        raise ValueError(f"unknown lr schedule {name!r}; choose from {LR_SCHEDULES}")
    if name == "constant" and num_warmup_steps > 0:
        name = "constant_with_warmup"
    if name == "inverse_sqrt" and num_warmup_steps <= 0:
        raise ValueError("`inverse_sqrt` (Noam) needs --num_warmup_steps >= 1: its decay is sqrt(warmup / step)")
    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps,
                         scheduler_specific_kwargs=kwargs or None)


def scheduler_needs_metric(scheduler) -> bool:
    """True for schedulers stepped with a validation metric (`step(metrics)`), not once per update."""
    return "metrics" in inspect.signature(scheduler.step).parameters


def create_optimizer(model, learning_rate: float, weight_decay: float, betas: tuple[float, float], eps: float,
                     fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on biases and norms); `fused` (CUDA): one kernel per step
    instead of several per weight group."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=learning_rate, betas=betas, eps=eps, fused=fused)
