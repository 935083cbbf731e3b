"""Tests for dior_cvae.training (clean_split, tfidf, eval_sets, responders) and score.py --responder: the clean protocol.

Hand-made fixtures check each rule; the real-data tests (DailyDialog and DailyDialog++ in ``$DIOR_SHARED_DATA`` or
``<repo>/../shared/data``, skipped with a reason otherwise) check the counts of the shipped files.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch

from dior_cvae.training.data import load_dailydialog_dir
from dior_cvae.training import clean_split as cs
from dior_cvae.training.clean_split import build_clean_split, load_dailydialog_pp, normalize_text
from dior_cvae.training.eval_sets import load_eval_set
from dior_cvae.training.tfidf import TfidfIndex, word_ngrams

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIOR_SHARED_DATA") or (REPO.parent / "shared" / "data"))
IJCNLP = SHARED_DATA / "dailydialog" / "ijcnlp"
DPP = SHARED_DATA / "dailydialog_plusplus"
real_data = pytest.mark.skipif(
    not ((IJCNLP / "dialogues_train.txt.gz").is_file() and (DPP / "test.json.gz").is_file()),
    reason=f"DailyDialog / DailyDialog++ not found under {SHARED_DATA} (set DIOR_SHARED_DATA to the shared/data folder)",
)


def test_normalize_text_equates_the_two_spellings():
    assert normalize_text("Is there something WRONG?") == normalize_text("is there something wrong ?") == (
        "is there something wrong ?")
    assert normalize_text("I ’ m fine , it's \u201cok\u201d") == normalize_text('I\'m fine, it ’ s "ok"') == (
        "i ' m fine , it ' s ' ok '")
    assert normalize_text("  $20\tplease.  ") == "$ 20 please ."


def test_tfidf_cosine_and_top_k():
    docs = ["the cat sat on the mat", "a dog ran in the park", "the cat sat on a mat today"]
    index = TfidfIndex(docs)
    assert word_ngrams("The cat, a dog") == ["the", "cat", "dog", "the cat", "cat dog"]  # 1-char tokens dropped
    sims = index.cosine(docs)
    assert torch.allclose(sims.diagonal(), torch.ones(3, dtype=torch.float64))  # L2-normalised rows
    assert torch.allclose(sims, sims.T)
    assert sims[0, 2] > 0.5 > sims[0, 1]
    # idf = ln((1 + 3) / (1 + df)) + 1: "the" (df 3) weighs 1, "park" (df 1) ln 2 + 1
    assert index.idf[index.vocabulary["the"]] == pytest.approx(1.0)
    assert index.idf[index.vocabulary["park"]] == pytest.approx(torch.log(torch.tensor(2.0)).item() + 1)
    top = index.top_k(["cat on the mat", "zebra"], 2)
    assert [i for i, _ in top[0]] == [0, 2]
    assert top[1] == [(0, 0.0), (1, 0.0)]  # no shared term: ties in index order
    with pytest.raises(ValueError, match="k must be in"):
        index.top_k(["x"], 4)


def _write_lines(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _dialogue(*turns: str) -> str:
    return "".join(f"{t} __eou__ " for t in turns).rstrip(" ")


UNRELATED = [
    ("Where is the nearest bank ?", "Two blocks down on the left .", "Thanks a lot ."),
    ("Do you like jazz music ?", "Yes , especially live concerts .", "Me too , let us go together ."),
    ("My computer keeps crashing .", "Have you tried restarting it ?", "Several times , no luck ."),
    ("What time does the train leave ?", "At half past seven .", "Then we must hurry ."),
    ("How was your holiday in Spain ?", "Sunny and relaxing , the beaches were great .", "I envy you ."),
    ("Can I pay by credit card ?", "Sorry , cash only .", "Is there an ATM nearby ?"),
]


@pytest.fixture
def tiny_data(tmp_path):
    """A 9-dialogue train split whose dialogues 1-3 (1-based lines) overlap the evaluation sets, one way each."""
    dd, dpp = tmp_path / "dd", tmp_path / "dpp"
    dd.mkdir()
    dpp.mkdir()
    validation = [_dialogue("Good morning , Sir . Is there a bank near here ?", "There is one . 5 blocks away from here ?",
                            "Well , that's too far.Can you change some money for me ?")]
    test = [_dialogue("I would like to book a table for four tonight .", "Certainly , at what time would you like it ?",
                      "Around eight , near the window if possible .", "Fine , I have written it down .")]
    train = [
        # 1: the validation dialogue, in other case and with curly quotes: "exact"
        _dialogue("good morning , sir . is there a bank near here ?", "There is one . 5 blocks away from here ?",
                  "Well , that ’ s too far.Can you change some money for me ?"),
        # 2: contains the DailyDialog++ test context (written the DailyDialog++ way there): "dpp_source"
        _dialogue("Hello !", "Is there something wrong ?", "I enjoy having your daughter in my class .",
                  "I ’ m glad to hear it .", "She is a good student ."),
        # 3: the test dialogue with one turn edited: "near_duplicate"
        _dialogue("I would like to book a table for four tonight .", "Certainly , at what time would you like it ?",
                  "Around nine , near the window if possible .", "Fine , I have written it down ."),
        *[_dialogue(*turns) for turns in UNRELATED],
    ]
    _write_lines(dd / "dialogues_train.txt.gz", train)
    _write_lines(dd / "dialogues_validation.txt.gz", validation)
    _write_lines(dd / "dialogues_test.txt.gz", test)
    records = {
        "test": [{"id": 0, "context": ["Is there something wrong?", "I enjoy having your daughter in my class.",
                                       "I'm glad to hear it."], "positive_responses": ["She is brilliant."] * 5}],
        # DailyDialog++ corrected a spelling ("can not" -> "cannot"): a fuzzy match of unrelated dialogue 6
        "dev": [{"id": 7, "context": ["What time does the train leave?", "At half past seven."],
                 "positive_responses": ["Thanks.", "Great.", "OK.", "Fine.", "Good."]},
                {"id": 8, "context": ["My computer keeps crashing.", "Have you tried restartng it?"],
                 "positive_responses": ["Yes.", "No.", "Twice.", "Never.", "Once."]}],
    }
    for split, recs in records.items():
        _write_lines(dpp / f"{split}.json.gz", [json.dumps(r) for r in recs])
    return dd, dpp


def test_clean_split_removes_each_kind_of_overlap(tiny_data, tmp_path):
    dd, dpp = tiny_data
    split = build_clean_split(dd, dpp, cache_dir=tmp_path / "cache")
    assert split.removal_reasons == {
        1: ["exact:validation"],
        2: ["dpp_source:dailydialog_pp_test"],
        3: ["near_duplicate:test"],
        # the sources of the two dev contexts (one exact, one fuzzy)
        6: ["dpp_source:dailydialog_pp_dev"],
        7: ["dpp_source:dailydialog_pp_dev"],
    }
    assert split.removed_train_dialogue_ids == {1, 2, 3, 6, 7}
    assert [i for i, _ in split.train_dialogues] == [4, 5, 8, 9]
    assert split.dpp_matches["test"] == [{"sources": [["train", 2, 1]], "kind": "exact",
                                          "continuation": "She is a good student ."}]
    assert [m["kind"] for m in split.dpp_matches["dev"]] == ["exact", "fuzzy"]
    assert split.dpp_matches["dev"][1]["sources"] == [["train", 6, 0]]
    assert split.pair_overlap == {"validation": [True, True], "test": [True, True, True]}
    report = split.report
    assert (report["removed_dialogues"], report["removed_pairs"], report["kept_pairs"]) == (5, 2 + 4 + 3 + 2 + 2, 8)
    assert report["removed_by_primary_reason"] == {"exact": {"dialogues": 1, "pairs": 2},
                                                   "dpp_source": {"dialogues": 3, "pairs": 8},
                                                   "near_duplicate": {"dialogues": 1, "pairs": 3}}
    assert report["dailydialog_pp_matches"]["dev"]["fuzzy"] == 1
    # a stricter threshold keeps the edited copy of the test dialogue, and flags the test pairs clean
    strict = build_clean_split(dd, dpp, cache_dir=tmp_path / "cache", threshold=0.99)
    assert 3 not in strict.removed_train_dialogue_ids and strict.pair_overlap["test"] == [False] * 3
    # the data loader leaves the removed dialogues out
    kept = load_dailydialog_dir(dd, ["train"], exclude_dialogues={"train": split.removed_train_dialogue_ids})["train"]
    assert len(kept) == report["kept_pairs"] and kept[0]["context"] == ["Where is the nearest bank ?"]


def test_clean_split_is_cached_by_the_files_content(tiny_data, tmp_path, monkeypatch):
    dd, dpp = tiny_data
    first = build_clean_split(dd, dpp, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("clean_split-*.json"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds this input")

    monkeypatch.setattr(cs, "_compute", fail)
    again = build_clean_split(dd, dpp, cache_dir=tmp_path / "cache")
    assert again.removal_reasons == first.removal_reasons and again.report == first.report
    _write_lines(dd / "dialogues_validation.txt.gz", [_dialogue("A new dialogue .", "Indeed it is .")])
    with pytest.raises(AssertionError, match="recomputed"):  # other content, other key
        build_clean_split(dd, dpp, cache_dir=tmp_path / "cache")


def test_unmatched_dailydialog_pp_context_and_bad_input_are_errors(tiny_data, tmp_path):
    dd, dpp = tiny_data
    _write_lines(dpp / "dev.json.gz", [json.dumps({"id": 0, "context": ["Nothing like this .", "At all ."],
                                                   "positive_responses": ["a"] * 5})])
    with pytest.raises(ValueError, match="no DailyDialog source dialogue: {'dev': 1, 'test': 0}"):
        build_clean_split(dd, dpp, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="threshold must be in"):
        build_clean_split(dd, dpp, threshold=0.0)
    with pytest.raises(FileNotFoundError, match="DailyDialog\\+\\+ split 'dev' not found"):
        build_clean_split(dd, tmp_path, cache_dir=tmp_path / "cache")
    _write_lines(dpp / "test.json.gz", ['{"id": 0, "context": ["a"]}'])
    with pytest.raises(ValueError, match="test.json.gz:1: not a DailyDialog\\+\\+ record"):
        load_dailydialog_pp(dpp, "test")


def test_train_py_clean_split_flag(tiny_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    from accelerate import PartialState

    from dior_cvae.training.sources import load_raw_splits

    dd, dpp = tiny_data
    monkeypatch.setenv("DIOR_CVAE_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("train_script", REPO / "examples" / "train.py")
    train = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    spec.loader.exec_module(train)
    PartialState()
    base = ["--output_dir", str(tmp_path / "out"), "--tokenizer_name", "x"]
    with pytest.raises(SystemExit):
        train.parse_args([*base, "--train_file", str(dd / "dialogues_train.txt.gz"), "--clean_split", str(dpp)])
    assert "--clean_split needs --dataset_dir" in capsys.readouterr().err
    args = train.parse_args([*base, "--dataset_dir", str(dd), "--clean_split", str(dpp)])
    splits, description, meta = load_raw_splits(args)
    assert len(splits["train"]) == 8 and len(splits["validation"]) == 2 and len(splits["test"]) == 3
    assert meta["clean_split"]["removed_dialogues"] == 5 and "--clean_split" in description
    full, _, _ = load_raw_splits(train.parse_args([*base, "--dataset_dir", str(dd)]))
    assert len(full["train"]) == 21


@pytest.fixture(scope="module")
def real_split(tmp_path_factory):
    cache = os.environ.get("DIOR_CVAE_CACHE") or tmp_path_factory.mktemp("clean_split_cache")
    return build_clean_split(IJCNLP, DPP, cache_dir=cache)


@real_data
def test_real_clean_split_counts(real_split):
    report = real_split.report
    dpp = report["dailydialog_pp_matches"]
    assert (dpp["test"]["contexts"], dpp["test"]["matched"], dpp["test"]["fuzzy"]) == (1142, 1142, 0)
    assert (dpp["dev"]["contexts"], dpp["dev"]["matched"], dpp["dev"]["fuzzy"]) == (1028, 1028, 4)
    assert dpp["test"]["source_dialogues"] == 522
    assert dpp["test"]["contexts_with_a_source_in"]["train"] == 996
    assert (report["train_dialogues"], report["train_pairs"]) == (11118, 76053)
    assert (report["removed_dialogues"], report["removed_pairs"]) == (2086, 16429)
    assert report["dailydialog_pair_overlap"]["validation"] == {"pairs": 7069, "overlapping": 1858, "clean": 5211}
    assert report["dailydialog_pair_overlap"]["test"] == {"pairs": 6740, "overlapping": 2070, "clean": 4670}
    # every kept training dialogue is far from every DailyDialog++ test source dialogue
    kept = {i for i, _ in real_split.train_dialogues}
    sources = {src[1] for m in real_split.dpp_matches["test"] for src in m["sources"] if src[0] == "train"}
    assert not kept & sources and len(kept) == 11118 - 2086


@real_data
def test_real_eval_sets(real_split):
    rows = load_eval_set("dailydialog_pp_test", IJCNLP, DPP, clean_split=real_split)
    assert len(rows) == 1142 and all(len(r["references"]) == 5 and r["continuation"] for r in rows)
    assert rows[0]["continuation"] == "She is a great addition to my class ."  # train line 8865, turn 8
    valid = load_eval_set("dailydialog_validation", IJCNLP, DPP, clean_split=real_split)
    assert len(valid) == 7069 and sum(r["overlap"] for r in valid) == 1858
    with pytest.raises(ValueError, match="unknown evaluation set"):
        load_eval_set("dailydialog_train", IJCNLP, DPP, clean_split=real_split)


def _dpp_test_rows(dd, dpp, split):
    return load_eval_set("dailydialog_pp_test", dd, dpp, clean_split=split)


def test_responders(tiny_data, tmp_path):
    from dior_cvae.training.responders import Responder

    dd, dpp = tiny_data
    split = build_clean_split(dd, dpp, cache_dir=tmp_path / "cache")
    rows = _dpp_test_rows(dd, dpp, split)  # context: "Is there something wrong?", ..., "I'm glad to hear it."
    # the full pool holds the context's source dialogue: its last two turns retrieve the original continuation
    assert Responder("tfidf_full", dd).respond(rows, 1) == [["She is a good student ."]]
    clean = Responder("tfidf_clean", clean_split=split).respond(rows, 3)[0]
    kept_responses = {t for _, turns in split.train_dialogues for t in turns[1:]}
    assert len(clean) == 3 and set(clean) <= kept_responses and "She is a good student ." not in clean
    assert Responder("dd_continuation").respond(rows, 2) == [["She is a good student ."] * 2]
    assert Responder("copy_last").respond(rows, 2) == [["I'm glad to hear it."] * 2]
    rand = Responder("random_train", dd, seed=3).respond(rows * 50, 2)
    assert rand == Responder("random_train", dd, seed=3).respond(rows * 50, 2)  # seeded
    all_responses = {t for turns in UNRELATED for t in turns[1:]}
    assert len({s for r in rand for s in r}) > 5 and {s for r in rand for s in r} - all_responses  # drawn from all
    valid = load_eval_set("dailydialog_validation", dd, dpp, clean_split=split)
    with pytest.raises(ValueError, match="needs each row's 'continuation'"):
        Responder("dd_continuation").respond(valid, 1)
    with pytest.raises(ValueError, match="needs the DailyDialog folder"):
        Responder("tfidf_full")
    with pytest.raises(ValueError, match="unknown responder"):
        Responder("oracle")


def test_score_py_responders(tiny_data, tmp_path, monkeypatch):
    import sys

    dd, dpp = tiny_data
    monkeypatch.setenv("DIOR_CVAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    sys.modules.pop("score", None)
    import score

    out = tmp_path / "scores.json"
    argv = ["--responder", "all", "--eval_set", "all", "--dataset_dir", str(dd), "--dailydialog_pp_dir", str(dpp),
            "--num_samples", "2", "--no_semantic", "--jobs", "2", "--output", str(out)]
    score.main(argv)
    result = json.loads(out.read_text())
    one_process = tmp_path / "one_process.json"
    score.main([*argv[:-4], "--output", str(one_process)])
    assert json.loads(one_process.read_text())["results"] == result["results"]  # --jobs changes nothing
    assert result["command"].startswith("python examples/score.py --responder all --eval_set all")
    assert result["clean_split"]["removed_dialogues"] == 5
    pp = result["results"]["dailydialog_pp_test"]
    assert set(pp) == {"tfidf_full", "tfidf_clean", "dd_continuation", "copy_last", "random_train"}
    assert pp["dd_continuation"]["num_samples"] == 2 and pp["dd_continuation"]["bleu1_precision"] > 0
    valid = result["results"]["dailydialog_validation"]
    assert set(valid) == {"tfidf_full", "tfidf_clean", "copy_last", "random_train"}  # no continuation there
    assert valid["tfidf_full"]["all"]["num_contexts"] == 2 and valid["tfidf_full"]["overlapping"]["num_contexts"] == 2
    # the full pool holds a copy of the validation dialogue ("that ’ s" for "that's"): retrieval returns its responses
    assert valid["tfidf_full"]["all"]["bleu1"] > 100 > valid["tfidf_clean"]["all"]["bleu1"]
    assert valid["tfidf_full"]["clean"] == {"num_contexts": 0}
    with pytest.raises(SystemExit):
        score.main(["--responder", "dd_continuation", "--eval_set", "dailydialog_test", "--dataset_dir", str(dd),
                    "--dailydialog_pp_dir", str(dpp)])
    with pytest.raises(SystemExit):
        score.main(["--responder", "copy_last", "--eval_set", "dailydialog_pp_test", "--dataset_dir", str(dd)])
