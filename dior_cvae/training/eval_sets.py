"""The evaluation sets of the clean protocol, as rows ``{"context": [turns], "references": [str], ...}``.

* ``dailydialog_pp_test`` (the primary set) and ``dailydialog_pp_dev`` (checkpoint selection): the DailyDialog++
  contexts with their 5 human references, each row also with ``continuation`` (the turn that follows the context
  in its DailyDialog source dialogue, :class:`dior_cvae.training.clean_split.CleanSplit`). A model trained on the
  clean split has seen none of their source dialogues.
* ``dailydialog_validation`` / ``dailydialog_test``: the paper's pairs (:func:`dior_cvae.training.data.load_dailydialog_dir`),
  one reference each, each row with ``overlap`` (True: its dialogue is, or near-duplicates, a training dialogue),
  so every metric can be reported on all, clean and overlapping pairs.
"""

from __future__ import annotations

import os
from typing import Any

from .data import load_dailydialog_dir

from .clean_split import CleanSplit, build_clean_split, load_dailydialog_pp

EVAL_SETS = ("dailydialog_pp_test", "dailydialog_pp_dev", "dailydialog_validation", "dailydialog_test")
MULTIREF_SETS = ("dailydialog_pp_test", "dailydialog_pp_dev")


def load_eval_set(name: str, dailydialog_dir: str | os.PathLike, dailydialog_pp_dir: str | os.PathLike,
                  clean_split: CleanSplit | None = None, cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The rows of evaluation set ``name`` (one of :data:`EVAL_SETS`; module docstring). ``clean_split``: an
    already built :func:`build_clean_split` of the same folders (built, or read from ``cache_dir``, if None)."""
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; choose from {EVAL_SETS}")
    split = clean_split or build_clean_split(dailydialog_dir, dailydialog_pp_dir, cache_dir=cache_dir)
    if name in MULTIREF_SETS:
        dpp_split = name.rsplit("_", 1)[1]
        records = load_dailydialog_pp(dailydialog_pp_dir, dpp_split)
        return [{"id": r["id"], "context": r["context"], "references": r["references"],
                 "continuation": match["continuation"]}
                for r, match in zip(records, split.dpp_matches[dpp_split], strict=True)]
    dd_split = name.rsplit("_", 1)[1]
    pairs = load_dailydialog_dir(dailydialog_dir, [dd_split])[dd_split]
    return [{"context": p["context"], "references": [p["response"]], "overlap": overlap}
            for p, overlap in zip(pairs, split.pair_overlap[dd_split], strict=True)]
