"""The 🤗 Trainer route: `DiorTrainer` (a `Seq2SeqTrainer`) with KL annealing (`KLAnnealingCallback`)."""

from __future__ import annotations

import torch
from transformers import Seq2SeqTrainer, TrainerCallback

from .optimization import kl_weight


class KLAnnealingCallback(TrainerCallback):
    """Sets `beta` = `kl_weight(global_step, schedule, annealing_steps, steps_per_epoch)` at the start of every
    optimizer step (`steps_per_epoch` defaults to the Trainer's: max_steps / num_train_epochs). `DiorTrainer`
    passes `beta` to the model's forward as `kl_weight=` and logs it as `beta`."""

    def __init__(self, schedule: str = "linear", annealing_steps: int | None = None,
                 steps_per_epoch: int | None = None):
        kl_weight(0, schedule, annealing_steps, steps_per_epoch or 1)  # rejects an unknown schedule now
        self.schedule, self.annealing_steps, self.steps_per_epoch = schedule, annealing_steps, steps_per_epoch
        self.beta = kl_weight(0, schedule, annealing_steps, steps_per_epoch or 1)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.steps_per_epoch is None and state.num_train_epochs:
            self.steps_per_epoch = max(1, -(-state.max_steps // state.num_train_epochs))

    def on_step_begin(self, args, state, control, **kwargs):
        self.beta = kl_weight(state.global_step, self.schedule, self.annealing_steps, self.steps_per_epoch)


class DiorTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` for Dior-CVAE: training losses use β from `kl_annealing` (a `KLAnnealingCallback`, added to
    the callbacks), evaluation losses use β = 1 (the ELBO), and the logs get `beta`.

    β reaches the model as the `kl_weight=` argument of its forward, so nothing is stored on the model. The model's
    loss is already a per-example mean, so the Trainer's own `num_items_in_batch` normalisation is switched off
    (it would otherwise skip dividing by the gradient-accumulation steps)."""

    def __init__(self, *args, kl_annealing: KLAnnealingCallback | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_annealing = kl_annealing or KLAnnealingCallback()
        self.add_callback(self.kl_annealing)
        self.model_accepts_loss_kwargs = False
        self._beta: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        beta = self.kl_annealing.beta if model.training else 1.0
        device = inputs["input_ids"].device
        if self._beta is None or self._beta.device != device:
            self._beta = torch.zeros((), device=device)
        # β as a 0-d device tensor, refilled in place: under `torch_compile=True` a float would be a constant of the
        # graph (a recompile at every new β of the annealing), and a new tensor from the host a copy each step
        outputs = model(**inputs, kl_weight=self._beta.fill_(beta))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log: the β of the latest update
            logs["beta"] = self.kl_annealing.beta
        super().log(logs, *args, **kwargs)
