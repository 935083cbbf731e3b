"""A DailyDialog training split with no dialogue of the evaluation sets, and the evaluation sets' overlap flags.

DailyDialog's official split leaks: many validation and test dialogues reappear in train verbatim or with small
edits, and most DailyDialog++ dev/test contexts are taken from DailyDialog *train* dialogues. This module finds,
deterministically and from the shipped files alone:

* the source dialogue(s) of every DailyDialog++ dev and test context: every DailyDialog dialogue (any split) whose
  consecutive turns equal the context after :func:`normalize_text`; a context with no exact source is matched
  where one of its turns equals a dialogue turn exactly and every turn is within a character-similarity ratio of
  ``FUZZY_RATIO`` of the aligned dialogue turn, whitespace ignored (DailyDialog++ corrected a few spellings, e.g.
  ``can not`` -> ``cannot``, ``planed`` -> ``planned``);
* the training dialogues to remove ("clean split"), each with its reason:
  ``dpp_source``: it contains a DailyDialog++ dev or test context (it is that context's source);
  ``exact``: it equals, after :func:`normalize_text`, a DailyDialog validation/test dialogue or a DailyDialog++
  source dialogue, or one of the two contains the other as consecutive turns;
  ``near_duplicate``: its TF-IDF cosine with such a dialogue is >= ``threshold`` (whole-dialogue text, word
  1-2-grams, idf on the training dialogues: :mod:`dior_cvae.training.tfidf`); above 0.6 the pairs are, by eye,
  the same dialogue with edits or truncation;
* for every DailyDialog validation/test pair whether it is *overlapping* (its dialogue is ``exact`` or
  ``near_duplicate`` to some training dialogue, by the same rule) or *clean*.

Dialogue ids are the 1-based line numbers of the ijcnlp ``dialogues_<split>.txt`` files. The result is cached as
JSON in ``cache_dir`` (default ``$DIOR_CVAE_CACHE`` or ``~/.cache/dior_cvae``), keyed by the sha256 of the five
data files, the threshold and :data:`CACHE_VERSION`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import DataFormatError, _decode, _find_split_file, _read_lines, dailydialog_line_to_utterances

from .outputs import write_atomic
from .tfidf import TfidfIndex

CACHE_VERSION = 1
FUZZY_RATIO = 0.9
DD_EVAL_SPLITS = ("validation", "test")
DPP_SPLITS = ("dev", "test")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": "'", "\u201d": "'", '"': "'", "`": "'", "\u00b4": "'"})
_PUNCT = re.compile(r"([^\w\s])")


def normalize_text(text: str) -> str:
    """Matching form of an utterance: lowercased, every quote mark (curly, ``"``, backtick) as ``'``, one space
    around every character that is neither a word character nor whitespace, whitespace collapsed.

    DailyDialog is pre-tokenised (``wrong ?``, ``I ’ m``, ``It's``) and DailyDialog++ is not (``wrong?``, ``I'm``,
    writes ``"`` as ``'``): both become ``wrong ?``, ``i ' m``, ``it ' s``.
    """
    return " ".join(_PUNCT.sub(r" \1 ", text.lower().translate(_QUOTES)).split())


def read_dailydialog_dialogues(dailydialog_dir: str | os.PathLike, split: str) -> list[tuple[int, list[str]]]:
    """``(dialogue id, utterances)`` of one ijcnlp split, utterances as :func:`dior_cvae.training.data.load_dailydialog_dir`
    reads them (empty ones dropped), so the pairs of dialogue after dialogue are that function's pairs in order."""
    file = _find_split_file(Path(dailydialog_dir), split)
    dialogues = []
    for lineno, raw in _read_lines(file):
        try:
            line = _decode(raw, lineno).rstrip("\n")
        except ValueError as exc:
            raise DataFormatError(file, lineno, str(exc)) from None
        if line.strip():
            dialogues.append((lineno, [u for u in dailydialog_line_to_utterances(line) if u]))
    return dialogues


def _dpp_file(dailydialog_pp_dir: str | os.PathLike, split: str) -> Path:
    if split not in DPP_SPLITS:
        raise ValueError(f"DailyDialog++ split must be one of {DPP_SPLITS}, got {split!r}")
    candidates = [Path(dailydialog_pp_dir) / f"{split}.json{gz}" for gz in (".gz", "")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"DailyDialog++ split {split!r} not found: none of {', '.join(map(str, candidates))}")


def load_dailydialog_pp(dailydialog_pp_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """DailyDialog++ ``dev`` or ``test`` (``{split}.json.gz`` or ``{split}.json``, JSON Lines) as
    ``{"id", "context": [turns], "references": [5 positive responses]}`` in file order."""
    import gzip

    file = _dpp_file(dailydialog_pp_dir, split)
    opener = gzip.open if file.suffix == ".gz" else open
    records = []
    with opener(file, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                context, references = record["context"], record["positive_responses"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataFormatError(file, lineno, f"not a DailyDialog++ record ({type(exc).__name__}: {exc})") from None
            if not (isinstance(context, list) and context and isinstance(references, list) and references):
                raise DataFormatError(file, lineno, "'context' and 'positive_responses' must be non-empty lists")
            records.append({"id": record.get("id", len(records)), "context": context, "references": references})
    return records


@dataclass
class CleanSplit:
    """The clean training split and the evaluation sets' provenance (see the module docstring).

    ``removed_train_dialogue_ids``: ids (1-based lines of ``dialogues_train``) of the removed training dialogues;
    ``removal_reasons``: id -> its reasons; ``train_dialogues``: the kept ``(id, utterances)``; ``dpp_matches``:
    per DailyDialog++ split, one dict per context (file order) with ``sources`` (``[split, dialogue id, index of
    the context's first turn]`` of every source dialogue), ``kind`` (``exact`` / ``fuzzy``) and ``continuation``
    (the turn after the context in its first source, train before validation before test); ``pair_overlap``: per
    DailyDialog validation/test, one bool per pair in :func:`dior_cvae.training.data.load_dailydialog_dir` order (True:
    the pair's dialogue overlaps a training dialogue); ``report``: the counts.
    """

    removed_train_dialogue_ids: frozenset[int]
    removal_reasons: dict[int, list[str]]
    train_dialogues: list[tuple[int, list[str]]]
    dpp_matches: dict[str, list[dict[str, Any]]]
    pair_overlap: dict[str, list[bool]]
    report: dict[str, Any] = field(default_factory=dict)


def _default_cache_dir() -> Path:
    return Path(os.environ.get("DIOR_CVAE_CACHE") or Path.home() / ".cache" / "dior_cvae")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _contains(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    """Whether ``inner`` occurs in ``outer`` as consecutive turns."""
    n = len(inner)
    return any(outer[i : i + n] == inner for i in range(len(outer) - n + 1))


def _match_dpp(contexts: list[list[str]], dialogues: dict[str, list[tuple[int, list[str]]]],
               normalized: dict[str, list[tuple[str, ...]]]) -> list[dict[str, Any]]:
    """Source dialogues of DailyDialog++ contexts (exact, else fuzzy; see the module docstring)."""
    turn_index: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for split, dials in normalized.items():
        for d, turns in enumerate(dials):
            for t, turn in enumerate(turns):
                turn_index[turn].append((split, d, t))
    matches = []
    for context in contexts:
        ctx = tuple(normalize_text(t) for t in context)
        sources = [(s, d, t) for s, d, t in turn_index.get(ctx[0], []) if normalized[s][d][t : t + len(ctx)] == ctx]
        kind = "exact"
        if not sources:
            kind = "fuzzy"
            candidates = {(s, d, t - offset) for offset, turn in enumerate(ctx) for s, d, t in turn_index.get(turn, [])
                          if t >= offset}
            squeeze = ["".join(turn.split()) for turn in ctx]
            for s, d, start in sorted(candidates, key=lambda c: (("train", "validation", "test").index(c[0]), c[1:])):
                window = normalized[s][d][start : start + len(ctx)]
                if len(window) == len(ctx) and all(
                    difflib.SequenceMatcher(None, a, "".join(b.split()), autojunk=False).ratio() >= FUZZY_RATIO
                    for a, b in zip(squeeze, window)
                ):
                    sources.append((s, d, start))
        order = ("train", "validation", "test")
        sources.sort(key=lambda src: (order.index(src[0]), src[1], src[2]))
        continuation = None
        for s, d, t in sources:
            turns = dialogues[s][d][1]
            if t + len(ctx) < len(turns):
                continuation = turns[t + len(ctx)]
                break
        matches.append({"sources": [[s, dialogues[s][d][0], t] for s, d, t in sources], "kind": kind,
                        "continuation": continuation})
    return matches


def _compute(dd: dict[str, list[tuple[int, list[str]]]], dpp: dict[str, list[dict]], threshold: float) -> dict:
    """The JSON-serialisable result that :func:`build_clean_split` caches."""
    normalized = {s: [tuple(normalize_text(u) for u in turns) for _, turns in dials] for s, dials in dd.items()}
    dpp_matches = {split: _match_dpp([r["context"] for r in records], dd, normalized) for split, records in dpp.items()}
    unmatched = {split: sum(not m["sources"] for m in ms) for split, ms in dpp_matches.items()}
    if any(unmatched.values()):
        raise ValueError(f"DailyDialog++ contexts with no DailyDialog source dialogue: {unmatched}")
    reasons: dict[int, set[str]] = defaultdict(set)
    # Evaluation dialogues, keyed (split, position), each with its evaluation sets: DailyDialog validation/test
    # and every source dialogue of a DailyDialog++ dev/test context.
    eval_sets: dict[tuple[str, int], set[str]] = defaultdict(set)
    for split in DD_EVAL_SPLITS:
        for d in range(len(normalized[split])):
            eval_sets[(split, d)].add(split)
    pos = {s: {dialogue_id: d for d, (dialogue_id, _) in enumerate(dials)} for s, dials in dd.items()}
    for split, ms in dpp_matches.items():
        for m in ms:
            for s, dialogue_id, _ in m["sources"]:
                eval_sets[(s, pos[s][dialogue_id])].add(f"dailydialog_pp_{split}")
                if s == "train":
                    reasons[dialogue_id].add(f"dpp_source:dailydialog_pp_{split}")
    related: dict[tuple[str, int], set[int]] = defaultdict(set)  # eval dialogue -> related train positions

    def relate(key: tuple[str, int], d: int, kind: str) -> None:
        if key != ("train", d) and d not in related[key]:
            related[key].add(d)
            reasons[dd["train"][d][0]].update(f"{kind}:{name}" for name in eval_sets[key])

    # Exact equality or containment (either way, as consecutive turns) after normalising.
    by_turn: dict[str, set[int]] = defaultdict(set)
    by_first_turn: dict[str, set[int]] = defaultdict(set)
    for d, turns in enumerate(normalized["train"]):
        if turns:
            by_first_turn[turns[0]].add(d)
        for turn in turns:
            by_turn[turn].add(d)
    keys = sorted(eval_sets, key=lambda k: (("train", "validation", "test").index(k[0]), k[1]))
    for key in keys:
        turns = normalized[key[0]][key[1]]
        if not turns:
            continue
        for d in sorted(set.intersection(*(by_turn.get(t, set()) for t in turns))):
            if _contains(normalized["train"][d], turns):
                relate(key, d, "exact")
        for d in sorted(set().union(*(by_first_turn.get(t, set()) for t in turns))):
            if _contains(turns, normalized["train"][d]):
                relate(key, d, "exact")
    # TF-IDF near-duplicates of whole dialogues, idf on the training dialogues.
    index = TfidfIndex([" ".join(turns) for turns in normalized["train"]])
    sims = index.cosine([" ".join(normalized[s][d]) for s, d in keys])
    for row, key in enumerate(keys):
        for d in (sims[row] >= threshold).nonzero()[:, 0].tolist():
            relate(key, d, "near_duplicate")
    pair_overlap = {}
    for split in DD_EVAL_SPLITS:
        pair_overlap[split] = [bool(related[(split, d)]) for d, (_, turns) in enumerate(dd[split])
                               for _ in range(len(turns) - 1)]
    return {
        "removal_reasons": {str(k): sorted(v) for k, v in sorted(reasons.items())},
        "dpp_matches": dpp_matches,
        "pair_overlap": pair_overlap,
    }


def _report(result: dict, dd: dict[str, list[tuple[int, list[str]]]], threshold: float) -> dict[str, Any]:
    pairs = {dialogue_id: len(turns) - 1 for dialogue_id, turns in dd["train"]}
    removed = {int(k): v for k, v in result["removal_reasons"].items()}

    def primary(reason_list: list[str]) -> str:
        kinds = {r.split(":")[0] for r in reason_list}
        return next(k for k in ("dpp_source", "exact", "near_duplicate") if k in kinds)

    by_reason: dict[str, dict[str, int]] = {}
    for dialogue_id, reason_list in removed.items():
        entry = by_reason.setdefault(primary(reason_list), {"dialogues": 0, "pairs": 0})
        entry["dialogues"] += 1
        entry["pairs"] += pairs[dialogue_id]
    by_eval_set: dict[str, dict[str, int]] = {}
    for dialogue_id, reason_list in removed.items():
        for eval_set in sorted({r.split(":")[1] for r in reason_list}):
            entry = by_eval_set.setdefault(eval_set, {"dialogues": 0, "pairs": 0})
            entry["dialogues"] += 1
            entry["pairs"] += pairs[dialogue_id]
    overlap = {split: {"pairs": len(flags), "overlapping": sum(flags), "clean": len(flags) - sum(flags)}
               for split, flags in result["pair_overlap"].items()}
    dpp = {}
    for split, matches in result["dpp_matches"].items():
        where = {s: sum(any(src[0] == s for src in m["sources"]) for m in matches) for s in ("train", "validation", "test")}
        dpp[split] = {"contexts": len(matches), "matched": sum(bool(m["sources"]) for m in matches),
                      "fuzzy": sum(m["kind"] == "fuzzy" for m in matches),
                      "source_dialogues": len({tuple(src[:2]) for m in matches for src in m["sources"]}),
                      "contexts_with_a_source_in": where}
    return {
        "threshold": threshold,
        "train_dialogues": len(dd["train"]),
        "train_pairs": sum(pairs.values()),
        "removed_dialogues": len(removed),
        "removed_pairs": sum(pairs[d] for d in removed),
        "kept_dialogues": len(dd["train"]) - len(removed),
        "kept_pairs": sum(pairs.values()) - sum(pairs[d] for d in removed),
        "removed_by_primary_reason": by_reason,
        "removed_by_eval_set": by_eval_set,
        "dailydialog_pair_overlap": overlap,
        "dailydialog_pp_matches": dpp,
    }


def build_clean_split(dailydialog_dir: str | os.PathLike, dailydialog_pp_dir: str | os.PathLike,
                      cache_dir: str | os.PathLike | None = None, threshold: float = 0.6) -> CleanSplit:
    """The clean DailyDialog training split (module docstring), read from the cache when it holds this input.

    ``dailydialog_dir``: the ijcnlp folder (``dialogues_{train,validation,test}.txt[.gz]``);
    ``dailydialog_pp_dir``: the DailyDialog++ folder (``{dev,test}.json[.gz]``). Raises ``FileNotFoundError``
    naming a missing file, ``ValueError`` for a threshold outside (0, 1] or a DailyDialog++ context with no
    source dialogue.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    files = [_find_split_file(Path(dailydialog_dir), s) for s in ("train", *DD_EVAL_SPLITS)]
    files += [_dpp_file(dailydialog_pp_dir, s) for s in DPP_SPLITS]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, threshold, [_sha256(f) for f in files]]).encode()).hexdigest()
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cache_file = cache / f"clean_split-{key[:16]}.json"
    dd = {s: read_dailydialog_dialogues(dailydialog_dir, s) for s in ("train", *DD_EVAL_SPLITS)}
    if cache_file.is_file():
        result = json.loads(cache_file.read_text(encoding="utf-8"))
    else:
        dpp = {s: load_dailydialog_pp(dailydialog_pp_dir, s) for s in DPP_SPLITS}
        result = _compute(dd, dpp, threshold)
        cache.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_file, json.dumps(result))
    removed = frozenset(int(k) for k in result["removal_reasons"])
    return CleanSplit(
        removed_train_dialogue_ids=removed,
        removal_reasons={int(k): v for k, v in result["removal_reasons"].items()},
        train_dialogues=[(i, turns) for i, turns in dd["train"] if i not in removed],
        dpp_matches=result["dpp_matches"],
        pair_overlap=result["pair_overlap"],
        report=_report(result, dd, threshold),
    )
