"""Multi-sample, multi-reference metrics: k sampled responses per context against several human references.

The protocol of Zhao et al. (2017) and DialogWAE (Gu et al., 2019) on DailyDialog++ (5 references per context):

* ``bleu{n}_precision``: per context, the mean over samples of the sample's best single-reference BLEU-n over the
  references; ``bleu{n}_recall``: the mean over references of the reference's best BLEU-n over the samples;
  ``bleu{n}_f1``: ``2PR / (P + R)`` of the two means over contexts. Precision asks "is every sample close to some
  reference", recall "is every reference covered by some sample": a responder that repeats one good answer has
  high precision and low recall.
* ``bleu{n}_multiref``: nltk multi-reference BLEU-n of each sample against all references of its context (clipped
  counts over the references, closest reference length), mean over samples: the expected score of one sample.
* ``relevance_best_ref``: all-MiniLM-L6-v2 cosine of each sample with its closest reference, mean over samples.
* within a context: ``sample_cosine`` (mean pairwise MiniLM cosine of its samples), ``self_bleu`` (BLEU-2 of each
  sample against the others, :func:`dior_cvae.training.metrics.self_bleu`), ``distinct{n}_within`` (Distinct-n of its
  samples); each averaged over the contexts with >= 2 samples; and over the corpus ``distinct{n}`` and
  ``entropy{n}`` of all samples.

BLEU is the paper's: nltk ``sentence_bleu``, weights (1,0,0,0) / (0.5,0.5,0,0), ``SmoothingFunction().method7``
(an exact match of >= 4 tokens scores BLEU-1 400/3, see :func:`dior_cvae.training.metrics.bleu`); a hypothesis whose
scoring raises scores 0. Every lexical metric here reads the texts through
:func:`dior_cvae.training.clean_split.normalize_text` and splits on whitespace, so a pre-tokenised DailyDialog
sample (``wrong ?``, ``I ' m``) and a DailyDialog++ reference (``wrong?``, ``I'm``) are compared token for
token. The MiniLM metrics embed the texts as given.
"""

from __future__ import annotations

import warnings
from typing import Any

from .metrics import BLEU_WEIGHTS, distinct, entropy, load_embedding_model, self_bleu

from .clean_split import normalize_text


def _sentence_bleu(hypothesis: list[str], references: list[list[str]], n: int) -> tuple[float, bool]:
    """nltk sentence BLEU-n (x100) with method7 smoothing, and whether scoring raised (then 0)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nltk warns about empty n-gram overlaps; smoothing handles them
            return 100.0 * sentence_bleu(references, hypothesis, weights=BLEU_WEIGHTS[n],
                                         smoothing_function=SmoothingFunction().method7), False
    except Exception:  # e.g. an empty hypothesis; scored 0 as in dior_cvae.training.metrics
        return 0.0, True


def _check(samples_per_context: list[list[str]], references_per_context: list[list[str]]) -> None:
    if len(samples_per_context) != len(references_per_context):
        raise ValueError(f"{len(samples_per_context)} contexts of samples but {len(references_per_context)} of "
                         "references")
    if not samples_per_context:
        raise ValueError("no contexts to score")
    for i, (samples, refs) in enumerate(zip(samples_per_context, references_per_context)):
        for name, texts in (("samples", samples), ("references", refs)):
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"context {i}: {name} must be a non-empty list of strings, got {texts!r}")


def bleu_precision_recall(samples: list[str], references: list[str], n: int) -> tuple[float, float, int]:
    """BLEU-n precision and recall (x100) of one context's samples (module docstring) and the number of
    distinct (sample, reference) scorings that raised."""
    if n not in BLEU_WEIGHTS:
        raise ValueError(f"n must be 1 or 2, got {n}")
    hyps = [normalize_text(s) for s in samples]
    refs = [normalize_text(r).split() for r in references]
    failures = 0
    rows: dict[str, list[float]] = {}  # each distinct sample is scored once
    for hyp in hyps:
        if hyp not in rows:
            rows[hyp] = []
            for ref in refs:
                score, failed = _sentence_bleu(hyp.split(), [ref], n)
                rows[hyp].append(score)
                failures += failed
    matrix = [rows[hyp] for hyp in hyps]
    precision = sum(max(row) for row in matrix) / len(matrix)
    recall = sum(max(col) for col in zip(*matrix)) / len(refs)
    return precision, recall, failures


def multiref_bleu(samples: list[str], references: list[str], n: int) -> tuple[float, int]:
    """Mean over samples of nltk multi-reference BLEU-n (x100) against all ``references``, and the failures."""
    refs = [normalize_text(r).split() for r in references]
    hyps = [normalize_text(s) for s in samples]
    distinct_scores = {hyp: _sentence_bleu(hyp.split(), refs, n) for hyp in dict.fromkeys(hyps)}
    return (sum(distinct_scores[h][0] for h in hyps) / len(hyps),
            sum(failed for _, failed in distinct_scores.values()))


def relevance_best_reference(samples_per_context: list[list[str]], references_per_context: list[list[str]],
                             model: Any = None, batch_size: int = 64, show_progress: bool = False) -> float:
    """Mean over all samples of the MiniLM cosine with the closest reference of their context (in [-1, 1])."""
    from dior_cvae.training.metrics import _encode

    _check(samples_per_context, references_per_context)
    model = model if model is not None else load_embedding_model()
    texts = sorted({t for group in (*samples_per_context, *references_per_context) for t in group})
    index = {t: i for i, t in enumerate(texts)}
    emb = _encode(model, texts, batch_size, show_progress)
    total, count = 0.0, 0
    for samples, refs in zip(samples_per_context, references_per_context):
        sims = emb[[index[s] for s in samples]] @ emb[[index[r] for r in refs]].T
        total += sims.max(dim=1).values.sum().item()
        count += len(samples)
    return total / count


def score_multiref(samples_per_context: list[list[str]], references_per_context: list[list[str]],
                   embedding_model: Any = None, semantic: bool = True, semantic_contexts: int | None = None,
                   show_progress: bool = False) -> dict[str, float | int]:
    """All metrics of the module docstring for ``samples_per_context[i]`` against ``references_per_context[i]``.

    ``semantic``: also the MiniLM metrics (``relevance_best_ref``, ``sample_cosine``; ``embedding_model`` or the
    bundled all-MiniLM-L6-v2), on the first ``semantic_contexts`` contexts (None: all), reported as
    ``semantic_contexts``. Raises ``ValueError`` naming the context for an empty or non-string list.
    """
    _check(samples_per_context, references_per_context)
    scores: dict[str, float | int] = {}
    failures = 0
    for n in (1, 2):
        precisions, recalls, multi = [], [], []
        for samples, refs in zip(samples_per_context, references_per_context):
            p, r, f = bleu_precision_recall(samples, refs, n)
            m, g = multiref_bleu(samples, refs, n)
            precisions.append(p)
            recalls.append(r)
            multi.append(m)
            failures += f + g
        p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
        scores[f"bleu{n}_precision"], scores[f"bleu{n}_recall"] = p, r
        scores[f"bleu{n}_f1"] = 2 * p * r / (p + r) if p + r else 0.0
        scores[f"bleu{n}_multiref"] = sum(multi) / len(multi)
    normalized = [[normalize_text(s) for s in samples] for samples in samples_per_context]
    groups = [samples for samples in normalized if len(samples) >= 2]
    if groups:
        scores["self_bleu"] = self_bleu(groups)
        for n in (1, 2):
            scores[f"distinct{n}_within"] = sum(distinct(g, n) for g in groups) / len(groups)
    flat = [s for samples in normalized for s in samples]
    for n in (1, 2):
        scores[f"distinct{n}"] = distinct(flat, n)
    for n in (1, 2, 3):
        scores[f"entropy{n}"] = entropy(flat, n)
    if semantic:
        from dior_cvae.training.metrics import sample_similarity

        model = embedding_model if embedding_model is not None else load_embedding_model()
        subset = slice(0, semantic_contexts)
        scores["semantic_contexts"] = len(samples_per_context[subset])
        scores["relevance_best_ref"] = relevance_best_reference(
            samples_per_context[subset], references_per_context[subset], model, show_progress=show_progress)
        if any(len(s) >= 2 for s in samples_per_context[subset]):
            scores["sample_cosine"] = sample_similarity(samples_per_context[subset], model, show_progress=show_progress)
    scores.update(num_contexts=len(samples_per_context), num_samples=len(flat),
                  num_empty=sum(not s.strip() for s in flat), num_bleu_failures=failures)
    return scores
