"""Evaluation during training: the mean loss terms (β = 1), the latent diagnostics, the metrics of sampled responses,
and the choice of `best/` by one of them (`--metric_for_best_model`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from transformers import DataCollatorForSeq2Seq

from .diagnostics import latent_statistics
from .metrics import score_generations

#: The loss terms of the model's output that are logged and evaluated.
LOSS_KEYS = ("loss", "rc_loss", "kl_loss", "neg_entropy", "prior_loss")
#: The metrics of `evaluate()`'s sampled responses.
GENERATION_METRICS = ("bleu1", "bleu2", "distinct1", "distinct2", "entropy1", "entropy2", "entropy3")
#: The choices of --metric_for_best_model: +1 where higher is better (the sampled responses' metrics), -1 for the loss.
BEST_MODEL_METRICS = {"loss": -1, **dict.fromkeys(GENERATION_METRICS, 1)}
#: Validation examples of the latent diagnostics at every evaluation.
DIAGNOSTIC_EXAMPLES = 512
#: Token sampling of the sampled responses (the model card's recipe).
SAMPLING = {"do_sample": True, "top_k": 50, "top_p": 0.9}


def sample_responses(model, tokenizer, examples, encoded, num_return_sequences: int, *, batch_size: int,
                     max_new_tokens: int, seed: int) -> list[dict]:
    """Sample `num_return_sequences` responses (one prior draw each, top-k 50 / top-p 0.9) per example:
    [{"context", "reference", "samples"}]."""
    collator = DataCollatorForSeq2Seq(tokenizer)
    device = next(model.parameters()).device
    rows = []
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(examples), batch_size):
        batch = collator([{"input_ids": e["input_ids"]} for e in encoded[start : start + batch_size]])
        outputs = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), **SAMPLING,
            num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens, latent_generator=generator,
            # a few hundred contexts per evaluation: compiling the captured step and the prior's graph (about a
            # minute per shape, on the CPU the training step needs) would cost more than it saves
            disable_compile=True,
        )
        texts = [t.strip() for t in tokenizer.batch_decode(outputs, skip_special_tokens=True)]
        for i, example in enumerate(examples[start : start + batch_size]):
            rows.append({"context": example["context"], "reference": example["response"],
                         "samples": texts[i * num_return_sequences : (i + 1) * num_return_sequences]})
    return rows


def latent_diagnostics(model, batches, accelerator) -> dict:
    """`latent_statistics` on validation `batches` as scalars: active units, mutual information, prior/posterior norm
    ratio, posterior std and the KL to N(0, I) of every layer."""
    with accelerator.autocast():
        stats = latent_statistics(model, batches, pca=False)
    values = {k: stats[k] for k in ("active_units_fraction", "mutual_information", "prior_posterior_norm_ratio",
                                    "posterior_std_mean")}
    values.update({f"kl_layer{l}": v for l, v in enumerate(stats["kl_to_standard_per_layer"])})
    return values


def batch_mean_stderr(batches: torch.Tensor) -> float:
    """The standard error of a mean over examples from (mean, size) rows of its batches (N_b, 2): the batches as
    independent clusters, √(N_b / (N_b − 1) · Σ n_b² (m_b − m)²) / Σ n_b (NaN for one batch)."""
    means, sizes = batches.unbind(1)
    total = sizes.sum()
    mean = (sizes * means).sum() / total
    if len(means) < 2:
        return float("nan")
    return float(((sizes * (means - mean)).pow(2).sum() * len(means) / (len(means) - 1)).sqrt() / total)


def evaluate(model, dataloader, accelerator, tokenizer, examples, encoded, *, num_generation_samples: int,
             samples_per_context: int, batch_size: int, max_new_tokens: int, seed: int) -> dict:
    """Mean loss terms (β = 1, eval mode: no dropout, no memory dropout), the standard error of the mean KL
    (`kl_loss_stderr`, from the spread of the batch means: the diffusion prior's KL is a Monte Carlo estimate, and a
    mean within two standard errors of 0 says no more than "small"), the latent diagnostics of the first
    `DIAGNOSTIC_EXAMPLES` examples of this process's shard, and the metrics of responses sampled for the first
    `num_generation_samples` examples (main process).

    Runs under a forked RNG seeded with `seed`: the numbers are reproducible and training randomness is untouched.
    """
    model.eval()
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        totals, count = torch.zeros(len(LOSS_KEYS), dtype=torch.float64, device=accelerator.device), 0
        diagnostic_batches, local_count, kl_batches = [], 0, []
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
            size = values.new_tensor(float(batch["input_ids"].shape[0]))
            kl_batches.append(accelerator.gather(torch.stack([values[LOSS_KEYS.index("kl_loss")], size])[None]))
        results = {k: (totals[i] / max(count, 1)).item() for i, k in enumerate(LOSS_KEYS)}
        results["kl_loss_stderr"] = batch_mean_stderr(torch.cat(kl_batches).double())
        unwrapped = accelerator.unwrap_model(model)
        if unwrapped.config.prior_type != "diffusion":
            results.pop("neg_entropy"), results.pop("prior_loss")
        if unwrapped.config.has_latent and accelerator.is_main_process:
            results.update(latent_diagnostics(unwrapped, diagnostic_batches, accelerator))
        n = min(num_generation_samples, len(examples))
        if n > 0 and accelerator.is_main_process:
            with accelerator.autocast():
                rows = sample_responses(unwrapped, tokenizer, [examples[i] for i in range(n)],
                                        [encoded[i] for i in range(n)], samples_per_context, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, seed=seed)
            scores = score_generations(rows, semantic=False)
            results.update({k: scores[k] for k in GENERATION_METRICS})
    accelerator.wait_for_everyone()
    model.train()
    return results


@dataclass
class BestModel:
    """Which evaluation `best/` holds: the best finite value of `metric` (a key of `BEST_MODEL_METRICS`) so far,
    its step and its validation loss. Saved in each checkpoint's trainer state."""

    metric: str = "loss"
    best_metric: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None

    def improves(self, results: dict, step: int) -> bool:
        """Record `results` of `step` if they beat the best so far (a non-finite loss or metric never does)."""
        value = results[self.metric]
        if not (math.isfinite(results["loss"]) and math.isfinite(value)):
            return False
        sign = BEST_MODEL_METRICS[self.metric]
        if self.best_metric is not None and sign * value <= sign * self.best_metric:
            return False
        self.best_metric, self.best_eval_loss, self.best_step = value, results["loss"], step
        return True

    def restore(self, saved: dict) -> None:
        """From a checkpoint's trainer state (one written before `best_metric` existed has only the loss)."""
        self.best_eval_loss, self.best_step = saved.get("best_eval_loss"), saved.get("best_step")
        self.best_metric = saved.get("best_metric")
        if self.best_metric is None and self.metric == "loss":
            self.best_metric = self.best_eval_loss

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "metric"}


def format_samples(rows: list[dict], markdown: bool = False) -> str:
    """`sample_responses` rows as text (the end of a run) or markdown (the model card)."""
    lines = []
    for i, row in enumerate(rows, 1):
        speakers = ["A" if (len(row["context"]) - j) % 2 else "B" for j in range(len(row["context"]))]
        if markdown:
            lines.append(f"**Context {i}**\n")
            lines += [f"> {who}: {turn}  " for who, turn in zip(speakers, row["context"])]
            lines.append(f"\n*Reference:* {row['reference']}\n")
            lines += [f"{k}. {s}" for k, s in enumerate(row["samples"], 1)]
            lines.append("")
        else:
            lines.append(f"[{i}] context:")
            lines += [f"      {who}: {turn}" for who, turn in zip(speakers, row["context"])]
            lines.append(f"    reference: {row['reference']}")
            lines += [f"    sample {k}: {s}" for k, s in enumerate(row["samples"], 1)]
    return "\n".join(lines)


def print_samples(model, tokenizer, examples, encoded, split: str, num_contexts: int, samples_per_context: int,
                  accelerator, *, batch_size: int, max_new_tokens: int, seed: int) -> list[dict]:
    """Sample responses for `num_contexts` contexts spread over `examples` (the first to the last), print them and
    return them (`sample_responses` rows), under a forked RNG seeded with `seed`."""
    if num_contexts <= 0:
        return []
    picks = [round(i * (len(examples) - 1) / max(1, num_contexts - 1)) for i in range(min(num_contexts, len(examples)))]
    with torch.random.fork_rng(devices=[]), accelerator.autocast():
        torch.manual_seed(seed)
        rows = sample_responses(model, tokenizer, [examples[i] for i in picks], [encoded[i] for i in picks],
                                samples_per_context, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed)
    print(f"\n***** {len(rows)} {split} contexts, {samples_per_context} sampled responses each (one prior draw per "
          f"sample; top-k {SAMPLING['top_k']}, top-p {SAMPLING['top_p']}) *****", flush=True)
    print(format_samples(rows), flush=True)
    return rows
