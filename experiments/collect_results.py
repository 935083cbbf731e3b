"""Turn a `dailydialog_experiments.py` work folder into `results/dailydialog.json`, a markdown table and PNG plots.

Reads WORK/generations/{run}__{split}__{decoding}.jsonl (decoding: sampling, beam5, 5samples; plus
diffusion__validation1000__{solver}{steps}.jsonl, solver dpmsolverpp/ddim/ddpm), WORK/diagnostics/{run}__diagnostics.json
(+ diffusion__diagnostics__{solver}{steps}.json), the temperature sweep {run}__{split}__{sampling|5samples}_{tau|T}{value}.jsonl
(prior temperature τ of a latent run, token temperature T of the plain seq2seq; "temperature_sweep" in the results), WORK/models/{run}/log_history.jsonl, WORK/commands.jsonl and
WORK/timings.jsonl. Every generations file is scored in-process with `examples/score.py`'s functions (the MiniLM model is
loaded once) and the scores are cached in WORK/scores/{job}.json (recomputed when the generations file changes).
Trivial responders (copy_last; random_train with --dataset_dir) are scored on the validation and test contexts.
--multiref_file (DailyDialog++ test) adds multiref_bleu1/2 to the test-split rows (the full test split matches 97/6,740
rows, the 1,000-context 5samples subset 11; a --smoke work dir matches none: pass --multiref_min_fraction 0). CPU only:

    python experiments/collect_results.py --work_dir WORK --gpu "GPU NAME" --dataset_dir ../shared/data/dailydialog/ijcnlp \\
        --multiref_file ../shared/data/dailydialog_plusplus/test.json.gz --results results/dailydialog.json --plots_dir docs
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # score.py
from dailydialog_experiments import split_seed  # noqa: E402
from score import load_train_responses, score_rows, trivial_rows  # noqa: E402

from dior_cvae import DiorCVAEConfig  # noqa: E402
from dior_cvae.training.metrics import read_generations  # noqa: E402

# DailyDialog++ test rows (k samples, 5 references) add dior_cvae.training.multiref.score_multiref's fields
MULTISAMPLE = ("bleu1_precision", "bleu1_recall", "bleu1_f1", "bleu2_precision", "bleu2_recall", "bleu2_f1",
               "bleu1_multiref", "bleu2_multiref", "self_bleu", "distinct1_within", "distinct2_within",
               "relevance_best_ref", "sample_cosine")
METRICS = ("bleu1", "bleu2", "distinct1", "distinct2", "entropy1", "entropy2", "entropy3", "relevance", "self_bleu5",
           "sample_cosine5", "multiref_bleu1", "multiref_bleu2", "multiref_matched", *MULTISAMPLE)
SOLVER_RE = re.compile(r"^(dpmsolverpp|ddim|ddpm)(\d+)$")
# prior (tau) / token (T) temperature of `sampling`, `5samples` (older work folders) or `{k}samples` generations
TEMPERATURE_RE = re.compile(r"^(sampling|\d+samples)_(tau|T)(\d+(?:\.\d+)?)$")
KNOBS = {"tau": "prior_temperature", "T": "token_temperature"}
DDPP_SPLIT = "ddpptest"  # {run}__ddpptest__{k}samples*.jsonl: the held-out DailyDialog++ test contexts
CACHE_VERSION = 3
DEFAULTS = DiorCVAEConfig()  # what a run without an override of a field trained with


CASE_STUDY_RUNS = ("diffusion", "gaussian", "standard", "none")  # the case study: the default, the Gaussian priors, the control


def parse_overrides(command: str) -> dict:
    """The config fields a recorded train.py command set: its `--FIELD VALUE` flags of DiorCVAEConfig's fields, or
    the `--config_overrides a=b,...` of the records of earlier train.py versions."""
    if "--config_overrides " in command:
        overrides = command.split("--config_overrides ", 1)[1].split(" ", 1)[0].strip("'")
        return dict(item.split("=", 1) for item in overrides.split(",") if "=" in item)
    words, fields = shlex.split(command), set(DEFAULTS.to_dict())
    return {word[2:]: value for word, value in zip(words, words[1:]) if word.startswith("--") and word[2:] in fields}


def base_name(name: str) -> str:
    """The run a seed replica `NAME-sN` repeats: `memdrop0.5-s2` → `memdrop0.5` (dailydialog_experiments.split_seed)."""
    return split_seed(name)[0]


def train_seed(command: str) -> int | None:
    """The training seed of a recorded train.py command: its last `--seed` (None when it has none)."""
    seeds = re.findall(r"--seed (\d+)", command)
    return int(seeds[-1]) if seeds else None


def prior_and_dropout(name: str, config: dict) -> tuple[str, float]:
    """Prior type and memory dropout of a run (config overrides first, else the run-name convention)."""
    name = base_name(name)
    if name == "none":
        return "none", 0.0
    if name.startswith("memdrop"):
        return config.get("prior_type", "diffusion"), float(config.get("memory_dropout", name[len("memdrop"):]))
    return config.get("prior_type", name if name in ("diffusion", "gaussian", "standard") else "diffusion"), float(
        config.get("memory_dropout", DEFAULTS.memory_dropout))


def free_bits(prior: str, config: dict) -> float | None:
    """The run's `kl_free_bits` (its config override, else the config default); None for the plain seq2seq."""
    return None if prior == "none" else float(config.get("kl_free_bits", DEFAULTS.kl_free_bits))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file ([] if there is none). A last line cut short (a run killed while writing it:
    no newline at the end) is skipped with a message; any other line that does not parse is an error naming
    file:line."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as error:
            if number == len(lines):  # the last line, without its newline
                print(f"{path}:{number}: skipping the truncated last line ({error})", file=sys.stderr)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({error}): {line[:80]!r}") from None
    return rows


class Scorer:
    """Scores generations files with a per-file cache; the embedding model is loaded on first need, once."""

    def __init__(self, work: Path, semantic: bool, multiref_file: str | None, multiref_min_fraction: float,
                 semantic_rows: int | None = None):
        self.cache_dir = work / "scores"
        self.semantic_rows = semantic_rows
        self.semantic, self.multiref_file, self.min_fraction = semantic, multiref_file, multiref_min_fraction
        self._model = None

    @property
    def model(self):
        if self._model is None and self.semantic:
            from dior_cvae.training.metrics import load_embedding_model

            self._model = load_embedding_model()
        return self._model

    def score(self, job: str, rows_fn, stamp: dict, multiref: bool, multisample: bool = False) -> dict:
        """score.py's metrics of the rows; `multisample` (rows with k samples and a list of references): also
        `score_multiref`'s multi-sample, multi-reference metrics (their names win where both have one)."""
        cache = self.cache_dir / f"{job}.json"
        key = {**stamp, "semantic": self.semantic, "semantic_rows": self.semantic_rows, "multiref_file": self.multiref_file if multiref else None,
               "multisample": multisample, "version": CACHE_VERSION}
        if cache.is_file():
            cached = json.loads(cache.read_text())
            if cached.get("_cache_key") == key:
                return cached
        scores = score_rows(rows_fn(), embedding_model=self.model, semantic=self.semantic,
                            multiref_file=self.multiref_file if multiref else None,
                            multiref_min_fraction=self.min_fraction, source=job, show_progress=False,
                            semantic_rows=self.semantic_rows)
        if multisample:
            from dior_cvae.training.multiref import score_multiref

            rows = rows_fn()
            scores.update(score_multiref([r["samples"] for r in rows], [r["reference"] for r in rows],
                                         embedding_model=self.model, semantic=self.semantic,
                                         semantic_contexts=self.semantic_rows))
        scores["_cache_key"] = key
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(scores, indent=2) + "\n")
        return scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--gpu", default=None, help="GPU the runs were trained on (recorded in every row)")
    p.add_argument("--results", default="results/dailydialog.json")
    p.add_argument("--plots_dir", default="docs")
    p.add_argument("--no_semantic", action="store_true", help="skip relevance / sample_cosine5 (no MiniLM)")
    p.add_argument("--semantic_rows", type=int, default=1000,
                   help="relevance / sample_cosine5 on the first N contexts of each file (MiniLM on a CPU is slow)")
    p.add_argument("--dataset_dir", help="DailyDialog folder: training responses for the random_train responder")
    p.add_argument("--multiref_file", help="DailyDialog++ test (.json.gz): multiref BLEU of the test-split rows")
    p.add_argument("--multiref_min_fraction", type=float, default=0.01)
    p.add_argument("--ddpp_dir", help="DailyDialog++ folder: with --dataset_dir, DailyDialog validation/test rows are "
                   "also scored on their clean and overlapping pairs (dior_cvae.training.clean_split)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--splits", default=None,
                   help="comma-separated splits to score (e.g. ddpptest, validation, test; default: every file's)")
    p.add_argument("--no_trivial", action="store_true", help="skip the trivial responders (copy_last, random_train)")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    scorer = Scorer(work, not args.no_semantic, args.multiref_file, args.multiref_min_fraction, args.semantic_rows)
    overlap = {}
    if args.ddpp_dir and args.dataset_dir:
        from dior_cvae.training.clean_split import build_clean_split

        overlap = build_clean_split(args.dataset_dir, args.ddpp_dir).pair_overlap  # {split: [bool per pair]}

    commands = {row["name"]: row["command"] for row in read_jsonl(work / "commands.jsonl")}
    minutes = {row["name"]: round(row["seconds"] / 60, 1) for row in read_jsonl(work / "timings.jsonl")}

    def diagnostics(name: str) -> dict:
        path = work / "diagnostics" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    runs, solvers, sweep, references = [], [], [], {}
    for gen_file in sorted((work / "generations").glob("*.jsonl")):
        job = gen_file.stem
        parts = job.split("__")
        if len(parts) != 3:
            print(f"skipping {gen_file.name}: not {{run}}__{{split}}__{{decoding}}.jsonl", file=sys.stderr)
            continue
        name, split, decoding = parts
        if args.splits and split not in args.splits.split(","):
            continue
        base_split = ("ddpp_test" if split == DDPP_SPLIT else "validation" if split.startswith("validation")
                      else "test" if split.startswith("test") else split)
        stat = gen_file.stat()
        stamp = {"size": stat.st_size, "mtime": stat.st_mtime}
        scores = scorer.score(job, lambda f=gen_file: read_generations(f), stamp,
                              multiref=base_split == "test" and args.multiref_file is not None,
                              multisample=split == DDPP_SPLIT)
        subsets = []  # (subset name, scores) of the clean and the overlapping pairs of a DailyDialog split
        if split in overlap and decoding == "sampling":
            for subset, flag in ((f"{split}_clean", False), (f"{split}_overlap", True)):
                def subset_rows(f=gen_file, flag=flag, flags=overlap[split]):
                    rows = read_generations(f)
                    if len(rows) > len(flags):
                        raise SystemExit(f"{f}: {len(rows)} rows, more than the {len(flags)} pairs of the split")
                    return [row for row, overlapping in zip(rows, flags) if overlapping == flag]
                if subset_rows():
                    subsets.append((subset, scorer.score(f"{job}__{subset}", subset_rows, stamp, multiref=False)))
        if split in ("validation", "test") and split not in references and decoding in ("sampling", "beam5"):
            references[split] = gen_file
        if split == DDPP_SPLIT and split not in references and TEMPERATURE_RE.match(decoding) is None:
            references[split] = gen_file
        solver = SOLVER_RE.match(decoding)
        if solver:
            diag = diagnostics(f"{name}__diagnostics__{decoding}")
            solvers.append({"name": name, "split": split, "solver": solver.group(1), "steps": int(solver.group(2)),
                            **{m: scores.get(m) for m in ("bleu1", "bleu2", "distinct2")},
                            "prior_posterior_norm_ratio": diag.get("prior_posterior_norm_ratio"),
                            "active_units": diag.get("active_units")})
            continue
        temperature = TEMPERATURE_RE.match(decoding)
        if temperature:
            sweep.append({"name": name, "split": split, "decoding": temperature.group(1),
                          "knob": KNOBS[temperature.group(2)], "value": float(temperature.group(3)),
                          **{m: scores.get(m) for m in METRICS}, "num_contexts": scores.get("num_contexts")})
            continue
        train_command = commands.get(f"train:{name}", "")
        overrides = parse_overrides(train_command)
        prior, memory_dropout = prior_and_dropout(name, overrides)
        diag = diagnostics(f"{name}__diagnostics")
        history = read_jsonl(work / "models" / name / "log_history.jsonl")
        epochs = max((r["epoch"] for r in history if "epoch" in r), default=None)
        for subset, subset_scores in [(split, scores), *subsets]:
            runs.append({"name": name, "prior": prior, "memory_dropout": memory_dropout,
                         "seed": train_seed(train_command), "kl_free_bits": free_bits(prior, overrides),
                         "split": base_split, "subset": subset, "decoding": decoding,
                         **{m: subset_scores.get(m) for m in METRICS}, "num_contexts": subset_scores.get("num_contexts"),
                         "active_units": diag.get("active_units"),
                         "prior_posterior_norm_ratio": diag.get("prior_posterior_norm_ratio"),
                         "train_minutes": minutes.get(name), "epochs": round(epochs, 2) if epochs is not None else None,
                         "clean_split": "--clean_split" in train_command, "gpu": args.gpu,
                         "command": train_command or None})

    train = load_train_responses(args.dataset_dir) if args.dataset_dir else None
    for split, gen_file in sorted(references.items()) if not args.no_trivial else ():
        for kind in ("copy_last", "random_train") if train else ("copy_last",):
            stat = gen_file.stat()
            scores = scorer.score(f"trivial__{split}__{kind}",
                                  lambda f=gen_file, k=kind: trivial_rows(read_generations(f)[:], k, train, args.seed),
                                  {"source": gen_file.name, "size": stat.st_size, "mtime": stat.st_mtime,
                                   "seed": args.seed}, multiref=split == "test" and args.multiref_file is not None,
                                  multisample=split == DDPP_SPLIT)
            runs.append({"name": kind, "prior": "trivial", "memory_dropout": None, "seed": None, "kl_free_bits": None,
                         "split": "ddpp_test" if split == DDPP_SPLIT else split, "subset": split, "decoding": kind,
                         **{m: scores.get(m) for m in METRICS},
                         "num_contexts": scores.get("num_contexts"), "active_units": None,
                         "prior_posterior_norm_ratio": None, "train_minutes": None, "epochs": None, "gpu": None,
                         "command": None})

    knob_of = {r["name"]: r["knob"] for r in sweep}  # one knob per run
    for run in runs:  # the main rows are the sweeps' temperature-1 points
        if run["name"] in knob_of and run["subset"] in ("validation", "test", DDPP_SPLIT) and (
                run["decoding"] == "sampling" or run["decoding"].endswith("samples")):
            sweep.append({"name": run["name"], "split": run["subset"], "decoding": run["decoding"],
                          "knob": knob_of[run["name"]], "value": 1.0, **{m: run.get(m) for m in METRICS},
                          "num_contexts": run["num_contexts"]})
    sweep.sort(key=lambda r: (r["name"], r["split"], r["decoding"], r["value"]))
    solvers.sort(key=lambda r: (r["solver"], r["steps"]))
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    likelihood = []  # examples/likelihood.py's estimates, one per run
    for path in sorted((work / "likelihood").glob("*__likelihood.json")):
        name = path.name.split("__")[0]
        likelihood.append({"name": name, "prior": prior_and_dropout(name, parse_overrides(commands.get(f"train:{name}", "")))[0],
                           **json.loads(path.read_text()), "command": commands.get(f"likelihood.py:{path.stem}")})
    Path(args.results).write_text(json.dumps({"runs": runs, "solvers": solvers, "temperature_sweep": sweep,
                                              "likelihood": likelihood}, indent=2) + "\n")
    print(markdown_table(runs, solvers, sweep, likelihood))
    written = plot(runs, solvers, work, Path(args.plots_dir), sweep)
    study = case_study(work, CASE_STUDY_RUNS)
    if study:
        (Path(args.plots_dir) / "case_study.md").write_text(study)
        written.append(Path(args.plots_dir) / "case_study.md")
    print(f"wrote {args.results}" + "".join(f", {p}" for p in written), file=sys.stderr)


def case_study(work: Path, names, contexts: int = 5, samples: int = 5) -> str:
    """Markdown: the first `contexts` DailyDialog++ test contexts of each run's k-sample file (prior / token
    temperature 1) with their references and the first `samples` samples, as they came out (the files' order,
    nothing picked). Runs without such a file are left out; "" when none has one."""
    parts = []
    for name in names:
        paths = sorted((work / "generations").glob(f"{name}__{DDPP_SPLIT}__*samples.jsonl"))
        if not paths:
            continue
        parts.append(f"**{name}**\n")
        for i, row in enumerate(read_jsonl(paths[0])[:contexts], start=1):
            references = row["reference"] if isinstance(row["reference"], list) else [row["reference"]]
            lines = [f"{i}. context: {' __eou__ '.join(row['context'])}  "]
            lines += [f"   reference: {reference}  " for reference in references]
            lines += [f"   - {sample}" for sample in row["samples"][:samples]]
            parts.append("\n".join(lines))
        parts.append("")
    return "\n".join(parts)


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) and abs(value) < 1 else (
        f"{value:.2f}" if isinstance(value, float) else str(value))


def markdown_table(runs: list[dict], solvers: list[dict], sweep: list[dict] = (), likelihood: list[dict] = ()) -> str:
    lines = []
    ddpp = [r for r in runs if r["split"] == "ddpp_test"]
    if ddpp:  # the clean protocol's table first: k samples per held-out DailyDialog++ test context, 5 references
        dcols = ("name", "prior", "decoding", "bleu1_precision", "bleu1_recall", "bleu1_f1", "bleu2_precision",
                 "bleu2_recall", "bleu2_f1", "bleu1_multiref", "bleu2_multiref", "relevance_best_ref", "sample_cosine",
                 "self_bleu", "distinct2_within", "distinct1", "distinct2", "epochs")
        lines += ["| " + " | ".join(dcols) + " |", "|" + "---|" * len(dcols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in dcols) + " |" for r in ddpp]
        lines.append("")
    if likelihood:
        lcols = ("name", "prior", "nll_per_response", "neg_elbo_per_response", "nll_per_token", "num_samples",
                 "responses", "estimator")
        lines += ["| " + " | ".join(lcols) + " |", "|" + "---|" * len(lcols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in lcols) + " |" for r in likelihood]
        lines.append("")
    runs = [r for r in runs if r["split"] != "ddpp_test"]
    cols = ("name", "prior", "memory_dropout", "kl_free_bits", "subset", "decoding", "bleu1", "bleu2", "distinct1",
            "distinct2", "entropy3", "relevance", "self_bleu5", "sample_cosine5", "multiref_bleu1", "multiref_bleu2",
            "multiref_matched", "active_units", "prior_posterior_norm_ratio", "train_minutes", "epochs")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in runs]
    if solvers:
        scols = ("solver", "steps", "bleu1", "bleu2", "distinct2", "prior_posterior_norm_ratio", "active_units")
        lines += ["", "| " + " | ".join(scols) + " |", "|" + "---|" * len(scols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in scols) + " |" for r in solvers]
    if sweep:
        tcols = ("name", "split", "decoding", "knob", "value", "bleu1", "bleu2", "distinct1", "distinct2", "relevance",
                 "self_bleu5", "sample_cosine5", "bleu2_precision", "bleu2_recall", "relevance_best_ref")
        lines += ["", "| " + " | ".join(tcols) + " |", "|" + "---|" * len(tcols)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in tcols) + " |" for r in sweep]
    return "\n".join(lines)


def plot(runs: list[dict], solvers: list[dict], work: Path, plots_dir: Path, sweep: list[dict] = ()) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    histories = {d.name: read_jsonl(d / "log_history.jsonl") for d in sorted((work / "models").glob("*")) if d.is_dir()}
    histories = {k: v for k, v in histories.items() if v}
    if histories:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for name, rows in histories.items():
            for ax, key in zip(axes, ("rc_loss", "kl_loss", "eval_loss")):
                points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), label=name, marker="o" if key == "eval_loss" else None)
        for ax, title in zip(axes, ("training reconstruction loss", "training KL", "validation loss")):
            ax.set_xlabel("update step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(plots_dir / "learning_curves.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if solvers:
        fig, axes = plt.subplots(1, 4, figsize=(18, 4))
        for solver in sorted({r["solver"] for r in solvers}):
            rows = [r for r in solvers if r["solver"] == solver]
            for ax, key in zip(axes, ("bleu1", "bleu2", "distinct2", "prior_posterior_norm_ratio")):
                points = [(r["steps"], r[key]) for r in rows if r[key] is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=solver)
        for ax, title in zip(axes, ("BLEU-1", "BLEU-2", "Distinct-2", "prior/posterior norm ratio")):
            ax.set_xlabel("prior sampling steps")
            ax.set_xscale("log")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.suptitle("diffusion prior, DailyDialog validation (first 1,000 contexts), sampling")
        fig.tight_layout()
        written.append(plots_dir / "metrics_vs_steps.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    five = [r for r in sweep if r["decoding"].endswith("samples") and r["split"] in ("test", DDPP_SPLIT)
            and r["relevance"] is not None]
    if five:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for name in sorted({r["name"] for r in five}):
            rows = sorted((r for r in five if r["name"] == name), key=lambda r: r["value"])
            tag = "τ" if rows[0]["knob"] == "prior_temperature" else "T"
            for ax, key in zip(axes, ("sample_cosine5", "self_bleu5", "distinct2")):
                points = [(r[key], r["relevance"]) for r in rows if r[key] is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{name} ({tag})")
                    for r, point in zip(rows, points):
                        ax.annotate(f"{r['value']:g}", point, fontsize=7, xytext=(3, 3), textcoords="offset points")
        titles = ("MiniLM cosine between a context's samples (lower = more diverse)",
                  "self-BLEU of a context's samples (lower = more diverse)", "Distinct-2 (higher = more diverse)")
        for ax, title in zip(axes, titles):
            ax.set_xlabel(title, fontsize=8)
            ax.set_ylabel("relevance (MiniLM cosine to the reference)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"relevance against diversity, {'DailyDialog++ test, k samples' if five[0]['split'] == DDPP_SPLIT else 'DailyDialog test'}: "
                     "prior temperature τ (latent runs), token temperature T (plain seq2seq)")
        fig.tight_layout()
        written.append(plots_dir / "relevance_vs_diversity.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    memdrop = [r for r in runs if (base_name(r["name"]) == "diffusion" or base_name(r["name"]).startswith("memdrop"))
               and r["split"] == "test" and r["decoding"] == "sampling"]  # runs that differ in memory dropout only
    if len({r["memory_dropout"] for r in memdrop}) >= 2:
        ps = sorted({r["memory_dropout"] for r in memdrop})
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))

        def curve(ax, metric, **kwargs):  # the mean over the seeds of each p; the bars span their min and max
            values = [[r[metric] for r in memdrop if r["memory_dropout"] == p and r[metric] is not None] for p in ps]
            means = [sum(v) / len(v) if v else float("nan") for v in values]
            spans = [[m - min(v) if v else 0 for m, v in zip(means, values)],
                     [max(v) - m if v else 0 for m, v in zip(means, values)]]
            ax.errorbar(ps, means, yerr=spans, marker="o", capsize=3, **kwargs)

        curve(axes[0], "distinct2")
        curve(axes[1], "bleu1", label="BLEU-1")
        curve(axes[1], "bleu2", label="BLEU-2")
        curve(axes[2], "relevance")
        for ax, title in zip(axes, ("Distinct-2", "BLEU", "relevance (MiniLM cosine to the reference)")):
            ax.set_xlabel("memory dropout p")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[1].legend()
        seeds = max(sum(r["memory_dropout"] == p for r in memdrop) for p in ps)
        fig.suptitle("diffusion prior, DailyDialog test, sampling" + (f" (mean of up to {seeds} seeds; bars: min to max)"
                                                                      if seeds > 1 else ""))
        fig.tight_layout()
        written.append(plots_dir / "memory_dropout.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


if __name__ == "__main__":
    main()
