"""Score a JSON Lines file of generations with the Dior-CVAE metrics.

Each input line is ``{"context": str | list[str], "reference": str | list[str],
"samples": list[str]}`` (as written by ``examples/generate.py``). Prints one JSON
object of metrics (see ``dior_cvae.training.metrics.score_generations``): bleu1, bleu2,
distinct1, distinct2, entropy1, entropy2, entropy3, relevance, self_bleu5 and
sample_cosine5 (rows with >= 2 samples), and with ``--multiref_file``
multiref_bleu1, multiref_bleu2, multiref_matched, multiref_fraction.
``--no_semantic`` skips the MiniLM ones (relevance, sample_cosine5).

Usage:
    python examples/score.py --input generations.jsonl [--output scores.json]
        [--no_semantic] [--embedding_model PATH]
        [--multiref_file ../shared/data/dailydialog_plusplus/test.json.gz [--multiref_min_fraction 0.01]]
        [--trivial {copy_last,random_train} [--dataset_dir ../shared/data/dailydialog/ijcnlp] [--seed 1234]]
        [--latent_model MODEL_DIR --dataset_dir DIR [--latent_split validation] [--latent_plot latents.png]]

``--multiref_file`` attaches the 5 DailyDialog++ references to every row whose
context matches a DailyDialog++ context (``dior_cvae.training.metrics.MultirefIndex``:
case, whitespace and ’/' ignored; the DailyDialog++ context must equal the row's
whole context or its last turns). The row's own reference is kept for bleu1/2;
multiref_bleu1/2 score the matched rows only, against the 5 references. On the
DailyDialog test split (6,740 pairs) 97 rows match (1.44 %): most DailyDialog++
test contexts come from DailyDialog *train* dialogues (1,105 of its 1,142
contexts match train pairs). Below ``--multiref_min_fraction`` matched rows
(default 0.01) the script exits with an error naming the file and the fraction.

``--trivial`` scores a trivial responder on the file's contexts and references
instead of its samples (each row keeps its number of samples): ``copy_last``
repeats the last context turn; ``random_train`` draws training responses at
random (seeded) from ``--dataset_dir``'s DailyDialog train split.

``--responder NAME --eval_set SET`` (no ``--input``) scores a responder that needs no model on an evaluation set of
the clean protocol (``dior_cvae/training/responders.py``, ``eval_sets.py``): TF-IDF retrieval from the whole
(``tfidf_full``) or the clean (``tfidf_clean``) training split, the original DailyDialog continuation of a
DailyDialog++ context (``dd_continuation``), ``copy_last``, ``random_train``; on ``dailydialog_pp_test`` /
``dailydialog_pp_dev`` with ``--num_samples`` responses per context and the multi-reference metrics
(``dior_cvae/training/multiref.py``), on ``dailydialog_validation`` / ``dailydialog_test`` with the paper's protocol
on all, clean and overlapping pairs. Both flags take several names, or ``all``. Needs ``--dataset_dir`` (ijcnlp
DailyDialog) and ``--dailydialog_pp_dir``; the output JSON records the command, the clean split's report and every
score::

    python examples/score.py --responder all --eval_set dailydialog_pp_test \
        --dataset_dir ../shared/data/dailydialog/ijcnlp --dailydialog_pp_dir ../shared/data/dailydialog_plusplus \
        --semantic_rows 200 --jobs 5 --output results/responders_clean_protocol.json

``--latent_model`` adds the model's latent diagnostics under ``"latent"`` (``examples/diagnose.py``: active units,
KL per layer and to N(0, I), mutual information — at most log of its batch, ``mutual_information_max`` —, the
prior/posterior latent norm ratio) on ``--latent_split`` of ``--dataset_dir``; ``--latent_plot`` draws prior against
posterior latents of the same contexts (PCA of the posterior samples).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys

from dior_cvae.training.metrics import (
    MultirefIndex,
    load_embedding_model,
    load_multiref_references,
    read_generations,
    score_generations,
)
from dior_cvae.training.outputs import check_output_file, write_atomic

TRIVIAL = ("copy_last", "random_train")


def attach_multiref(rows: list[dict], multiref_path: str) -> int:
    """Set ``row["multiref"]`` to the DailyDialog++ references of each matching row (else []); return the count."""
    index = MultirefIndex(load_multiref_references(multiref_path))
    matched = 0
    for row in rows:
        refs = index.match(row.get("context", ""))
        row["multiref"] = list(refs) if refs else []
        matched += bool(refs)
    return matched


def check_multiref_fraction(matched: int, total: int, path: str, min_fraction: float) -> float:
    """The matched fraction; SystemExit naming ``path`` if it is below ``min_fraction``."""
    fraction = matched / total if total else 0.0
    if fraction < min_fraction:
        raise SystemExit(
            f"score.py: error: --multiref_file {path}: only {matched}/{total} rows ({fraction:.2%}) match a "
            f"DailyDialog++ context, below --multiref_min_fraction {min_fraction:.2%} (wrong split or file?)"
        )
    return fraction


def load_train_responses(dataset_dir: str) -> list[str]:
    """The responses of DailyDialog's train split in ``dataset_dir``."""
    from dior_cvae.training.data import load_dailydialog_dir

    return [ex["response"] for ex in load_dailydialog_dir(dataset_dir, splits=["train"])["train"]]


def trivial_rows(rows: list[dict], kind: str, train_responses: list[str] | None = None, seed: int = 1234) -> list[dict]:
    """Copies of ``rows`` whose samples come from a trivial responder (same number of samples per row)."""
    if kind not in TRIVIAL:
        raise ValueError(f"unknown trivial responder {kind!r}; choose from {TRIVIAL}")
    if kind == "random_train" and not train_responses:
        raise ValueError("random_train needs training responses (--dataset_dir)")
    rng = random.Random(seed)
    out = []
    for row in rows:
        k = len(row.get("samples") or [None])
        if kind == "copy_last":
            context = row.get("context", "")
            last = context if isinstance(context, str) else (context[-1] if context else "")
            samples = [last] * k
        else:
            samples = [rng.choice(train_responses) for _ in range(k)]
        out.append({**row, "samples": samples})
    return out


def score_rows(rows: list[dict], *, embedding_model=None, semantic: bool = True, multiref_file: str | None = None,
               multiref_min_fraction: float = 0.01, source: str = "", show_progress: bool = False,
               semantic_rows: int | None = None) -> dict:
    """score_generations plus the multiref fields (rows are modified in place when multiref_file is given)."""
    if multiref_file:
        try:
            matched = attach_multiref(rows, multiref_file)
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
            raise SystemExit(f"score.py: error: --multiref_file {multiref_file}: {type(exc).__name__}: {exc}") from None
        print(f"multiref: {source}: matched {matched}/{len(rows)} rows to DailyDialog++ contexts", file=sys.stderr)
        fraction = check_multiref_fraction(matched, len(rows), f"{multiref_file} (input {source})", multiref_min_fraction)
    scores = score_generations(rows, embedding_model=embedding_model, semantic=semantic, show_progress=show_progress,
                               semantic_rows=semantic_rows)
    if multiref_file:
        scores["multiref_fraction"] = fraction
    return scores


def _score_responder_on_sets(args, name: str, sets: tuple[str, ...]) -> dict:
    """One responder's scores on each of ``sets`` (a worker of :func:`score_responders`)."""
    from dior_cvae.training.clean_split import build_clean_split
    from dior_cvae.training.eval_sets import MULTIREF_SETS, load_eval_set
    from dior_cvae.training.responders import Responder, score_responder

    split = build_clean_split(args.dataset_dir, args.dailydialog_pp_dir)
    model = None if args.no_semantic else load_embedding_model(args.embedding_model)
    responder = Responder(name, args.dataset_dir, split, seed=args.seed)
    results = {}
    for eval_set in sets:
        if name == "dd_continuation" and eval_set not in MULTIREF_SETS:
            continue  # on DailyDialog the continuation is the reference
        rows = load_eval_set(eval_set, args.dataset_dir, args.dailydialog_pp_dir, clean_split=split)
        print(f"score.py: {name} on {eval_set} ({len(rows)} rows)", file=sys.stderr)
        results[eval_set] = score_responder(responder, eval_set, rows, num_samples=args.num_samples,
                                            embedding_model=model, semantic=not args.no_semantic,
                                            semantic_rows=args.semantic_rows)
    return results


def score_responders(args) -> dict:
    """``--responder`` / ``--eval_set`` (names or ``all``): the scores with the command and the split's report; with
    ``--jobs N`` the responders are scored in N processes (the results do not depend on N)."""
    from concurrent.futures import ProcessPoolExecutor

    from dior_cvae.training.clean_split import build_clean_split
    from dior_cvae.training.eval_sets import EVAL_SETS
    from dior_cvae.training.responders import RESPONDERS

    split = build_clean_split(args.dataset_dir, args.dailydialog_pp_dir)  # built (and cached) once, before the workers
    names = RESPONDERS if "all" in args.responder else tuple(dict.fromkeys(args.responder))
    sets = EVAL_SETS if "all" in args.eval_set else tuple(dict.fromkeys(args.eval_set))
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            per_responder = list(pool.map(_score_responder_on_sets, [args] * len(names), names, [sets] * len(names)))
    else:
        per_responder = [_score_responder_on_sets(args, name, sets) for name in names]
    results: dict = {}
    for eval_set in sets:
        for name, scores in zip(names, per_responder):
            if eval_set in scores:
                results.setdefault(eval_set, {})[name] = scores[eval_set]
    return {"command": shlex.join(["python", "examples/score.py", *args.argv]),
            "settings": {"num_samples": args.num_samples, "seed": args.seed, "semantic": not args.no_semantic,
                         "semantic_rows": args.semantic_rows},
            "clean_split": split.report, "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="generations JSON Lines file (or --responder)")
    parser.add_argument("--output", help="also write the metrics JSON here (atomically; an existing file needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--no_semantic", action="store_true", help="skip the embedding metrics (relevance, sample_cosine5)")
    parser.add_argument("--embedding_model", help="sentence-transformers path or name (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--multiref_file", help="DailyDialog++ JSON Lines (.gz) for multi-reference BLEU")
    parser.add_argument("--multiref_min_fraction", type=float, default=0.01,
                        help="fail below this fraction of matched rows (default 0.01; the DailyDialog test split "
                             "matches 97/6,740 = 1.44%%, DailyDialog++ test comes mostly from DailyDialog train)")
    parser.add_argument("--trivial", choices=TRIVIAL, help="score a trivial responder instead of the samples")
    parser.add_argument("--dataset_dir", help="DailyDialog folder (train split) for --trivial random_train")
    parser.add_argument("--seed", type=int, default=1234, help="seed of --trivial random_train")
    parser.add_argument("--responder", nargs="+", help="score these responders (or all) instead of --input: "
                        "tfidf_full, tfidf_clean, dd_continuation, copy_last, random_train")
    parser.add_argument("--eval_set", nargs="+", default=[], help="with --responder, one or more of: "
                        "dailydialog_pp_test, dailydialog_pp_dev, dailydialog_validation, dailydialog_test, all")
    parser.add_argument("--dailydialog_pp_dir", help="DailyDialog++ folder ({dev,test}.json[.gz]) for --responder")
    parser.add_argument("--num_samples", type=int, default=10,
                        help="responses per DailyDialog++ context for --responder (default 10)")
    parser.add_argument("--jobs", type=int, default=1, help="--responder: score the responders in this many processes")
    parser.add_argument("--semantic_rows", type=int, default=None,
                        help="MiniLM metrics on the first N rows only (of each set / subset; default all)")
    parser.add_argument("--latent_model", help="also the latent diagnostics of this saved model (examples/diagnose.py: "
                        "active units, KL per layer, mutual information, prior/posterior norm ratio) on --dataset_dir")
    parser.add_argument("--latent_split", default="validation", choices=["train", "validation", "test"])
    parser.add_argument("--latent_samples", type=int, default=2000, help="pairs of --latent_split for the diagnostics")
    parser.add_argument("--latent_plot", help="PNG of prior against posterior latents of the same contexts")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if bool(args.input) == bool(args.responder):
        parser.error("give exactly one of --input and --responder")
    for flag, path in (("--output", args.output), ("--latent_plot", args.latent_plot)):
        if path:
            try:
                check_output_file("score.py", flag, path, args.overwrite, [("--input", args.input)])
            except SystemExit as exc:
                parser.error(str(exc).removeprefix("score.py: error: "))
    if args.responder:
        from dior_cvae.training.eval_sets import EVAL_SETS
        from dior_cvae.training.responders import RESPONDERS

        for name in args.responder:
            if name not in (*RESPONDERS, "all"):
                parser.error(f"--responder {name}: choose from {', '.join(RESPONDERS)} or all")
        if not args.eval_set:
            parser.error("--responder needs --eval_set")
        for name in args.eval_set:
            if name not in (*EVAL_SETS, "all"):
                parser.error(f"--eval_set {name}: choose from {', '.join(EVAL_SETS)} or all")
        if not (args.dataset_dir and args.dailydialog_pp_dir):
            parser.error("--responder needs --dataset_dir (ijcnlp DailyDialog) and --dailydialog_pp_dir")
        if args.num_samples < 1 or args.jobs < 1:
            parser.error(f"--num_samples and --jobs must be >= 1, got {args.num_samples} and {args.jobs}")
        if args.responder == ["dd_continuation"] and not {"dailydialog_pp_test", "dailydialog_pp_dev", "all"} & set(
                args.eval_set):
            parser.error("--responder dd_continuation applies to the DailyDialog++ sets only")
        text = json.dumps(score_responders(args), indent=2)
        print(text)
        if args.output:
            write_atomic(args.output, text + "\n")
        return
    if args.trivial == "random_train" and not args.dataset_dir:
        parser.error("--trivial random_train needs --dataset_dir")
    if (args.latent_model or args.latent_plot) and not (args.latent_model and args.dataset_dir):
        parser.error("--latent_model needs --dataset_dir (and --latent_plot needs --latent_model)")
    if not 0 <= args.multiref_min_fraction <= 1:
        parser.error(f"--multiref_min_fraction must be in [0, 1], got {args.multiref_min_fraction}")
    if args.latent_samples < 1:
        parser.error(f"--latent_samples must be >= 1, got {args.latent_samples}")

    try:
        rows = read_generations(args.input)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:  # a truncated / non-UTF-8 file: name it
        raise SystemExit(f"score.py: error: --input {args.input}: {type(exc).__name__}: {exc}") from None
    if args.trivial:
        train = load_train_responses(args.dataset_dir) if args.trivial == "random_train" else None
        rows = trivial_rows(rows, args.trivial, train, args.seed)
    model = None if args.no_semantic else load_embedding_model(args.embedding_model)
    scores = score_rows(rows, embedding_model=model, semantic=not args.no_semantic, multiref_file=args.multiref_file,
                        multiref_min_fraction=args.multiref_min_fraction, source=args.input, show_progress=True)
    if args.latent_model:
        from diagnose import diagnose  # examples/diagnose.py, beside this script

        scores["latent"] = diagnose(args.latent_model, args.dataset_dir, args.latent_split, args.latent_samples,
                                    plot=args.latent_plot)
    text = json.dumps(scores, indent=2)
    print(text)
    if args.output:
        check_output_file("score.py", "--output", args.output, args.overwrite, [("--input", args.input)])  # again
        write_atomic(args.output, text + "\n")


if __name__ == "__main__":
    main()
