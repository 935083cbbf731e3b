"""Responders that need no model, to put beside a model's rows in the same table.

* ``tfidf_full`` / ``tfidf_clean``: TF-IDF retrieval. The query is the context's last 2 turns, the documents the
  last 2 context turns of every training pair (``tfidf_full``: the whole DailyDialog training split;
  ``tfidf_clean``: the clean split of :func:`dior_cvae.training.clean_split.build_clean_split`), features word
  1-2-grams after :func:`~dior_cvae.training.clean_split.normalize_text`, idf on the pool
  (:mod:`dior_cvae.training.tfidf`); the k samples are the responses of the k most similar documents.
* ``dd_continuation``: the turn that follows a DailyDialog++ context in its DailyDialog source dialogue (the row's
  ``continuation``; DailyDialog++ sets only), repeated k times.
* ``copy_last``: the last context turn, repeated k times.
* ``random_train``: k responses drawn at random (seeded, with replacement) from the whole training split.
"""

from __future__ import annotations

import os
import random
from typing import Any

from .clean_split import CleanSplit, normalize_text, read_dailydialog_dialogues
from .tfidf import TfidfIndex

RESPONDERS = ("tfidf_full", "tfidf_clean", "dd_continuation", "copy_last", "random_train")


def _pairs(dialogues: list[tuple[int, list[str]]]) -> list[tuple[list[str], str]]:
    return [(turns[:i], turns[i]) for _, turns in dialogues for i in range(1, len(turns))]


def _query(context: list[str]) -> str:
    return " ".join(normalize_text(turn) for turn in context[-2:])


class Responder:
    """``respond(rows, k)``: k responses per row (a row holds ``context``, and ``continuation`` for
    ``dd_continuation``), as lists of strings in row order."""

    def __init__(self, name: str, dailydialog_dir: str | os.PathLike | None = None,
                 clean_split: CleanSplit | None = None, seed: int = 1234):
        if name not in RESPONDERS:
            raise ValueError(f"unknown responder {name!r}; choose from {RESPONDERS}")
        self.name, self.seed = name, seed
        needs_train = name in ("tfidf_full", "random_train")
        if needs_train and dailydialog_dir is None:
            raise ValueError(f"responder {name!r} needs the DailyDialog folder (its training split)")
        if name == "tfidf_clean" and clean_split is None:
            raise ValueError("responder 'tfidf_clean' needs the clean split (build_clean_split)")
        if name in ("tfidf_full", "tfidf_clean"):
            dialogues = (read_dailydialog_dialogues(dailydialog_dir, "train") if name == "tfidf_full"
                         else clean_split.train_dialogues)
            pairs = _pairs(dialogues)
            self.responses = [response for _, response in pairs]
            self.index = TfidfIndex([_query(context) for context, _ in pairs])
        elif name == "random_train":
            self.responses = [response for _, response in _pairs(read_dailydialog_dialogues(dailydialog_dir, "train"))]

    def respond(self, rows: list[dict[str, Any]], k: int = 1) -> list[list[str]]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        contexts = [row["context"] if isinstance(row["context"], list) else [row["context"]] for row in rows]
        if self.name in ("tfidf_full", "tfidf_clean"):
            hits = self.index.top_k([_query(c) for c in contexts], k)
            return [[self.responses[i] for i, _ in row] for row in hits]
        if self.name == "dd_continuation":
            missing = [i for i, row in enumerate(rows) if not row.get("continuation")]
            if missing:
                raise ValueError(f"responder 'dd_continuation' needs each row's 'continuation' (DailyDialog++ sets); "
                                 f"rows {missing[:5]} have none")
            return [[row["continuation"]] * k for row in rows]
        if self.name == "copy_last":
            return [[context[-1]] * k for context in contexts]
        rng = random.Random(self.seed)
        return [[rng.choice(self.responses) for _ in range(k)] for _ in rows]


def score_responder(responder: Responder, eval_set: str, rows: list[dict[str, Any]], num_samples: int = 10,
                    embedding_model: Any = None, semantic: bool = True, semantic_rows: int | None = None) -> dict:
    """Scores of ``responder`` on evaluation set ``eval_set``'s ``rows`` (:func:`~.eval_sets.load_eval_set`).

    DailyDialog++ sets: ``num_samples`` responses per context, :func:`~.multiref.score_multiref` against the 5
    references. DailyDialog validation/test: the paper's protocol (one response per pair,
    :func:`dior_cvae.training.metrics.score_generations` against the pair's reference) under ``all``, ``clean`` and
    ``overlapping`` (the pairs whose dialogue overlaps a training dialogue; ``{"num_contexts": 0}`` for a subset
    with no pair). ``semantic``: also the MiniLM metrics,
    on the first ``semantic_rows`` rows (of each subset; None: all).
    """
    from dior_cvae.training.metrics import score_generations

    from .eval_sets import EVAL_SETS, MULTIREF_SETS
    from .multiref import score_multiref

    if eval_set not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {eval_set!r}; choose from {EVAL_SETS}")
    if eval_set in MULTIREF_SETS:
        samples = responder.respond(rows, num_samples)
        scores = score_multiref(samples, [row["references"] for row in rows], embedding_model=embedding_model,
                                semantic=semantic, semantic_contexts=semantic_rows)
        return {"num_samples_per_context": num_samples, **scores}
    if responder.name == "dd_continuation":
        raise ValueError("responder 'dd_continuation' applies to the DailyDialog++ sets only (on DailyDialog "
                         "validation/test the continuation is the reference)")
    samples = responder.respond(rows, 1)
    generations = [{"context": row["context"], "reference": row["references"][0], "samples": s, "overlap": row["overlap"]}
                   for row, s in zip(rows, samples)]
    result = {}
    for subset, keep in (("all", lambda g: True), ("clean", lambda g: not g["overlap"]),
                         ("overlapping", lambda g: g["overlap"])):
        chosen = [g for g in generations if keep(g)]
        result[subset] = score_generations(chosen, embedding_model=embedding_model, semantic=semantic,
                                           semantic_rows=semantic_rows) if chosen else {"num_contexts": 0}
    return result
