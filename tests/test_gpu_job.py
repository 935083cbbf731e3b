"""The GPU job's whole path on the CPU (experiments/gpu_job.sh run --smoke): clean split, tokenizer, training selected on
DailyDialog++ dev, k samples per DailyDialog++ test context with the temperature sweep, the single samples on
DailyDialog validation/test, the likelihood, packing; then the CPU scoring command (gpu_job.sh score)."""

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DIOR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.mark.skipif(not (DATA / "dailydialog_plusplus").is_dir(), reason="needs the shared DailyDialog / ++ data")
def test_gpu_job_smoke_end_to_end(tmp_path):
    job, out, work = tmp_path / "job", tmp_path / "out", tmp_path / "scored"
    out.mkdir()
    env = {**os.environ, "JOB_DIR": str(job), "DATA_DIR": str(DATA), "OUT": str(out), "RUNS": "diffusion,none",
           "DIOR_CVAE_CACHE": os.environ.get("DIOR_CVAE_CACHE", str(tmp_path / "cache"))}
    run = subprocess.run(["bash", "experiments/gpu_job.sh", "run", "--smoke"], cwd=REPO, env=env, capture_output=True,
                         text=True)
    status = (job / "status.txt").read_text()
    assert run.returncode == 0 and "DONE" in status, status + run.stderr[-3000:]
    assert "train phase exit 0" in status and "eval phase exit 0" in status, status

    poll = subprocess.run(["bash", "experiments/gpu_job.sh", "poll", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert poll.returncode == 0, poll.stderr
    assert sorted(p.name for p in out.iterdir()) == ["eval.tgz", "status.txt", "train.tgz"]
    with tarfile.open(out / "train.tgz") as tar:
        names = tar.getnames()
    assert "models/diffusion/log_history.jsonl" in names and "commands.jsonl" in names
    commands = [json.loads(line) for line in (job / "work" / "commands.jsonl").read_text().splitlines()]
    train = next(c["command"] for c in commands if c["name"] == "train:diffusion")
    assert "--clean_split" in train and "ddpp_dev_pairs.jsonl" in train  # trained clean, selected on DailyDialog++ dev

    results = tmp_path / "results.json"
    score = subprocess.run(["bash", "experiments/gpu_job.sh", "score", str(out), str(work), "--no_semantic",
                            "--results", str(results), "--plots_dir", str(tmp_path / "plots"),
                            "--dataset_dir", str(DATA / "dailydialog" / "ijcnlp"),
                            "--ddpp_dir", str(DATA / "dailydialog_plusplus")],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert score.returncode == 0, score.stderr[-3000:]
    data = json.loads(results.read_text())
    ddpp = {r["name"]: r for r in data["runs"] if r["split"] == "ddpp_test" and r["prior"] != "trivial"}
    assert set(ddpp) == {"diffusion", "none"}
    for row in ddpp.values():
        assert row["decoding"] == "10samples" and row["num_contexts"] == 8 and row["clean_split"]
        assert 0 <= row["bleu2_recall"] and 0 <= row["bleu2_precision"] and row["self_bleu"] is not None
    sweep = {(r["name"], r["value"]) for r in data["temperature_sweep"] if r["split"] == "ddpptest"}
    assert {("diffusion", 0.0), ("diffusion", 0.5), ("diffusion", 1.0), ("none", 0.7), ("none", 1.0)} <= sweep
    single = {(r["name"], r["subset"]) for r in data["runs"] if r["decoding"] == "sampling"}
    assert {("diffusion", "validation"), ("none", "test"), ("none", "test_clean")} <= single
    likelihood = {r["name"]: r for r in data["likelihood"]}
    assert likelihood["none"]["estimator"].startswith("exact")
    assert "VDM bound" in likelihood["diffusion"]["estimator"] and likelihood["diffusion"]["num_samples"] == 50
    assert likelihood["diffusion"]["responses"] == 10  # 2 contexts x 5 references
    assert (tmp_path / "plots" / "case_study.md").read_text().count("reference:") == 2 * 5 * 5
