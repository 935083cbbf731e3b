"""What a training run reports: its log (log_history.jsonl and the trackers), the model card written from its
settings and results, the training curves, and the upload of its output folder to the Hub."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..hub_dior import METRIC_NAMES, eval_results, model_card, upload_model_folder
from .checkpointing import TrainingError
from .evaluation import LOSS_KEYS, format_samples
from .outputs import write_atomic

logger = logging.getLogger(__name__)

#: Files of a training run's output folder that are not part of the published model.
NOT_PUBLISHED = ["step_*", "step_*/**", "epoch_*", "epoch_*/**", "best/**", "tokenizer/**", ".*", ".*/**", "*.tmp",
                 "run.json"]
#: The panels of training_curves.png: (title, log keys).
CURVE_PANELS = [("training loss", ["loss", "rc_loss"]), ("KL", ["kl_loss"]), ("β (KL weight)", ["beta"]),
                ("validation", ["eval_loss", "eval_rc_loss", "eval_kl_loss"]),
                ("latent (validation)", ["eval_active_units_fraction", "eval_mutual_information",
                                         "eval_prior_posterior_norm_ratio"]),
                ("validation generation", ["eval_bleu1", "eval_bleu2", "eval_distinct1", "eval_distinct2"])]


def configure_logging(accelerator) -> None:
    """INFO logs with times; warnings only from accelerate (not its per-file checkpoint chatter, nor "Removed shared
    tensor" for tied embeddings) and transformers (errors only on the other processes); no download bars."""
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    logger.info(accelerator.state)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()


class LossMeter:
    """The loss terms of the updates since the last logged step, summed on the device (no host read per update)."""

    def __init__(self, accelerator):
        self.accelerator, self.count = accelerator, 0
        self.sums = torch.zeros(len(LOSS_KEYS), device=accelerator.device)

    def add(self, outputs) -> None:
        self.sums += torch.stack([getattr(outputs, k).detach().float() if getattr(outputs, k) is not None
                                  else self.sums.new_zeros(()) for k in LOSS_KEYS])
        self.count += 1

    def means(self, diffusion: bool) -> dict:
        """The mean of each term over the updates and the ranks (the prior's terms only for a diffusion prior); then
        start afresh."""
        means = (self.accelerator.reduce(self.sums, "mean") / self.count).tolist()
        self.sums.zero_()
        self.count = 0
        return {k: v for k, v in zip(LOSS_KEYS, means) if k in ("loss", "rc_loss", "kl_loss") or diffusion}


class RunLog:
    """log_history.jsonl (one JSON object per logged step, written by the main process) and, with `tracking`, the
    accelerate trackers."""

    def __init__(self, accelerator, log_file: Path, tracking: bool):
        self.accelerator, self.log_file, self.tracking = accelerator, Path(log_file), tracking

    def __call__(self, values: dict, step: int) -> None:
        if self.tracking:
            self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with self.log_file.open("a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def write_eval_results(output_dir: Path, values: dict, keep: bool = False) -> None:
    """eval_results.json: `values`, added to those already there with `keep`."""
    path = Path(output_dir) / "eval_results.json"
    previous = json.loads(path.read_text()) if keep and path.is_file() else {}
    write_atomic(path, json.dumps({**previous, **values}, indent=2))


def write_model_card(args, output_dir: Path, model, accelerator, info: dict) -> None:
    """README.md: the Dior model card (`hub_dior.model_card`) with the data, training procedure, results and
    samples of the run of `args` (train.py's arguments) that trained `model`; `info` holds what the run measured."""
    results, split, config = info["results"], info["results_split"], model.config
    counts = {name: len(examples) for name, examples in info["splits"].items()}
    if info["meta"]["skipped_lines"]:
        counts["skipped bad lines"] = info["meta"]["skipped_lines"]
    device = f"{accelerator.num_processes} × {accelerator.device.type}"
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
        ("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"),
        ("optimizer", f"AdamW (lr {args.learning_rate}, betas ({args.adam_beta1}, {args.adam_beta2}), "
                      f"eps {args.adam_epsilon}, weight decay {args.weight_decay})"),
        ("lr schedule", f"{args.lr_scheduler_type}, {args.num_warmup_steps} warmup steps"),
        ("KL annealing", f"{args.kl_annealing}" + (f" over {args.kl_annealing_steps} steps" if args.kl_annealing_steps else "")),
        ("batch size", f"{args.per_device_train_batch_size} × {accelerator.num_processes} process(es) × "
                       f"{args.gradient_accumulation_steps} accumulation = {info['total_batch_size']}"),
        ("updates / epochs", f"{info['completed_steps']} / {info['epochs']:.2f}"),
        ("max source / target length", f"{args.max_source_length} / {args.max_target_length} tokens"),
        ("turn separator", repr(info["turn_separator"])),
        ("mixed precision", accelerator.mixed_precision),
        ("seed", args.seed),
        ("training time", f"{format_duration(info['training_time_s'])} on {device}"),
    ]
    metric_rows = [(METRIC_NAMES[k][1] if k in METRIC_NAMES else k, results[k]) for k in (
        "loss", "rc_loss", "kl_loss", "neg_entropy", "prior_loss", "bleu1", "bleu2", "distinct1", "distinct2",
        "entropy1", "entropy2", "entropy3") if k in results]
    license_note = ("the DailyDialog data is CC BY-NC-SA 4.0 (non-commercial, share-alike), and so is this model"
                    if license_ == "cc-by-nc-sa-4.0" else f"the model's license is {license_}; check your data's license")
    smoke = ""
    if getattr(args, "smoke_test", False):
        smoke = f"""> **Smoke test, not a usable model.** This model was trained by the no-argument demo of `examples/train.py`
> ({info['completed_steps']} updates, {info['epochs']:.2f} epochs, {format_duration(info['training_time_s'])} on
> {device}) to check that training, evaluation, saving and loading run. Its responses are not meaningful and the
> numbers under Evaluation only show that evaluation runs: they are not results.

"""
    sections = smoke + f"""## Training data

{info["data_description"]}. One example per response turn, with the earlier turns of the dialog as context.

{markdown_table(["split", "examples"], list(counts.items()))}

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
        results=() if getattr(args, "smoke_test", False) else eval_results(
            results, hub_dataset or info["meta"]["dataset_name"], info["meta"]["dataset_name"], split),
        turn_separator=info["turn_separator"], max_source_length=args.max_source_length, sections=sections)
    write_atomic(output_dir / "README.md", str(card))


def create_hub_repo(repo_id: str, token: str | None, private: bool) -> str:
    """--push_to_hub: create the repository (and so check the token and the network) before any training."""
    from huggingface_hub import HfApi

    try:
        return HfApi(token=token).create_repo(repo_id, exist_ok=True, private=private).repo_id
    except Exception as exc:  # offline mode, no or bad token, no network, a bad name
        raise TrainingError(f"--push_to_hub: cannot create the Hub repository {repo_id!r} ({type(exc).__name__}: "
                            f"{exc}); check --hub_token / `hf auth login`, the network, and that HF_HUB_OFFLINE is not "
                            "set. Nothing was trained.") from None


def push_output_dir(output_dir: Path, repo_id: str, token: str | None, private: bool) -> None:
    """Upload the run's model, card, results and logs (not its checkpoints: `NOT_PUBLISHED`)."""
    upload_model_folder(output_dir, repo_id, token=token, private=private, ignore_patterns=NOT_PUBLISHED,
                        commit_message="Upload Dior-CVAE (examples/train.py)")


def write_training_curves(log_file: Path, output_dir: Path) -> None:
    """training_curves.png: loss, KL, β and the validation metrics against the update step (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.is_file() else []
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4 * len(CURVE_PANELS), 3.2))
    for ax, (title, keys) in zip(axes, CURVE_PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_xlabel("update step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomic(output_dir / "training_curves.png", image.getvalue())
