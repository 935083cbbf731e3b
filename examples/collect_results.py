"""Turn a `dailydialog_experiments.py` work folder into `results/dailydialog.json`, `docs/results.md` tables and PNG
plots. Runs on CPU (the semantic similarity of the 5-sample files is computed here with the offline MiniLM).

    python examples/collect_results.py --work_dir WORK --gpu "NVIDIA H100 80GB HBM3" --results results/dailydialog.json \\
        --plots_dir docs
"""

import argparse
import json
from pathlib import Path

from dior_cvae.metrics import read_generations, sample_similarity

METRICS = ("bleu1", "bleu2", "distinct1", "distinct2", "entropy1", "entropy2", "entropy3")


def parse_overrides(command: str) -> dict:
    overrides = command.split("--config_overrides ", 1)[1].split(" ", 1)[0].strip("'")
    return dict(item.split("=", 1) for item in overrides.split(","))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--gpu", required=True)
    p.add_argument("--results", default="results/dailydialog.json")
    p.add_argument("--plots_dir", default="docs")
    p.add_argument("--no_semantic", action="store_true")
    args = p.parse_args()
    work = Path(args.work_dir)

    commands = {}
    for line in (work / "commands.jsonl").read_text().splitlines():
        row = json.loads(line)
        commands[row["name"]] = row["command"]
    minutes = {}
    for line in (work / "timings.jsonl").read_text().splitlines():
        row = json.loads(line)
        minutes[row["name"]] = (round(row["seconds"] / 60, 1), row["concurrent"])

    embedding_model = None
    runs = []
    for score_file in sorted((work / "scores").glob("*.json")):
        job = score_file.stem
        name, split, decoding = job.split("__")
        train_command = commands[f"train:{name}"]
        config = parse_overrides(train_command)
        scores = json.loads(score_file.read_text())
        row = {
            "name": name,
            "prior": config.get("prior_type", "diffusion"),
            "memory_dropout": float(config.get("memory_dropout", 0.7)),
            "prediction_type": config.get("prediction_type", "epsilon"),
            "split": "validation" if split.startswith("validation") else "test",
            "subset": split,
            "decoding": decoding,
            **{m: scores[m] for m in METRICS},
            "num_contexts": scores["num_contexts"],
            "sample_cosine": None,
            "train_minutes": minutes.get(name, (None, None))[0],
            "runs_sharing_the_gpu": minutes.get(name, (None, None))[1],
            "gpu": args.gpu,
            "command": train_command,
            "eval_command": commands[f"generate:{job}"],
        }
        if decoding == "5samples" and not args.no_semantic:
            if embedding_model is None:
                from dior_cvae.metrics import load_embedding_model

                embedding_model = load_embedding_model()
            rows = read_generations(work / "generations" / f"{job}.jsonl")
            row["sample_cosine"] = sample_similarity([r["samples"] for r in rows], model=embedding_model)
        runs.append(row)
        print(f"{job:45s} " + " ".join(f"{m}={row[m]:.2f}" for m in METRICS[:4])
              + (f" cos={row['sample_cosine']:.3f}" if row["sample_cosine"] is not None else ""))

    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    plot(runs, Path(args.plots_dir))


def plot(runs, plots_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    steps_rows = [r for r in runs if r["subset"] == "validation2000" and r["decoding"][:4] in ("ddpm", "ddim")]
    if steps_rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name in sorted({r["name"] for r in steps_rows}):
            for sampler in ("ddpm", "ddim"):
                rows = sorted(
                    (r for r in steps_rows if r["name"] == name and r["decoding"].startswith(sampler)),
                    key=lambda r: int(r["decoding"][4:]),
                )
                if not rows:
                    continue
                steps = [int(r["decoding"][4:]) for r in rows]
                axes[0].plot(steps, [r["bleu1"] for r in rows], marker="o", label=f"{name} {sampler}")
                axes[1].plot(steps, [r["distinct2"] for r in rows], marker="o", label=f"{name} {sampler}")
        for ax, metric in zip(axes, ("BLEU-1", "Distinct-2")):
            ax.set_xlabel("prior sampling steps")
            ax.set_ylabel(metric)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle("DailyDialog validation (first 2,000 contexts), sampling top-k 50 / top-p 0.9")
        fig.tight_layout()
        fig.savefig(plots_dir / "metrics_vs_steps.png", dpi=120)
        plt.close(fig)
    cosine_rows = sorted(
        (r for r in runs if r["sample_cosine"] is not None and r["prior"] == "diffusion"
         and r["prediction_type"] == "epsilon"),
        key=lambda r: r["memory_dropout"],
    )
    if cosine_rows:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot([r["memory_dropout"] for r in cosine_rows], [r["sample_cosine"] for r in cosine_rows], marker="o")
        ax.set_xlabel("memory dropout p")
        ax.set_ylabel("mean pairwise cosine of 5 samples")
        ax.set_title("DailyDialog test (1,000 contexts)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plots_dir / "memory_dropout_vs_similarity.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
