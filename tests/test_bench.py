"""`benchmarks/bench.py --tiny` stays runnable on CPU and writes every key the GPU run reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dior_cvae.utils_dior import compiled_training_problem

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = [
    *(f"train_examples_per_s_{m}_bs{b}" for m in ("bart", "dior") for b in (64, 256)),
    "train_ratio_bs64", "train_ratio_bs256",
    *(f"gen_tokens_per_s_{m}_bs{b}" for m in ("bart", "dior") for b in (1, 64, 256)),
    "gen_ratio_bs1", "gen_ratio_bs64", "gen_ratio_bs256",
    "bs1_tokens_per_s", "bs1_path", "prior_ms_bs1", "generate_ms_bs1", "prior_share",
    *(f"peak_mem_train_{m}_bs{b}_mib" for m in ("bart", "dior") for b in (64, 256)),
    *(f"peak_mem_gen_{m}_bs{b}_mib" for m in ("bart", "dior") for b in (1, 64, 256)),
    "gpu", "torch", "transformers", "dtype", "device", "tiny", "goals", "goals_met", "errors",
]
PRIOR_KEYS = ["prior_default", "prior_ms_bs1_sweep", "prior_share_default", "generate_ms_bs1_default",
              "same_tokens_bs1", "same_tokens_bs64",
              *(f"gen_tokens_per_s_dior_hfloop_bs{b}" for b in (1, 64, 256)),
              *(f"gen_ratio_hfloop_bs{b}" for b in (1, 64, 256))]
FAST_KEYS = [
    *(f"gen_tokens_per_s_{m}_static_bs{b}" for m in ("bart", "dior") for b in (1, 64, 256)),
    *(f"gen_ms_{m}_static_bs{b}" for m in ("bart", "dior") for b in (1, 64, 256)),
    *(f"gen_ratio_static_bs{b}" for b in (1, 64, 256)),
    *(f"gen_ratio_static_vs_eager_bart_bs{b}" for b in (1, 64, 256)),
    "static_compiled", "static_compile_expected",
    "static_first_call_s", "generate_ms_bs1_static", "prior_share_static",
]


def test_tiny_benchmark_runs_and_reports(tmp_path):
    output, plot = tmp_path / "speed.json", tmp_path / "speed.png"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--fast", "--device", "cpu",
         "--output", str(output), "--plot", str(plot)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(output.read_text())

    missing = [k for k in REQUIRED_KEYS + PRIOR_KEYS + FAST_KEYS if k not in results]
    assert not missing, missing
    assert results["errors"] == {}, results["errors"]
    assert results["complete"] is True
    assert results["tiny"] is True and results["device"] == "cpu" and results["gpu"] is None
    for key in REQUIRED_KEYS[:16] + ["bs1_tokens_per_s", "prior_ms_bs1", "generate_ms_bs1"]:
        assert isinstance(results[key], float) and results[key] > 0, key
    assert 0 < results["prior_share"] < 1
    assert results["bs1_path"] in ("default", "static")
    assert not any("fast" in key or "graphed" in key for key in results), "a key of the deleted dior_fast path"

    # the training step's FLOPs (forward + backward): Dior does BART's work plus the response encoding and pooling
    for batch in (64, 256):
        bart, dior = results[f"train_gflop_bart_bs{batch}"], results[f"train_gflop_dior_bs{batch}"]
        assert 0 < bart < dior and results[f"train_flop_ratio_bs{batch}"] == pytest.approx(bart / dior)
    assert results["train_gflop_dior_bs256"] == pytest.approx(4 * results["train_gflop_dior_bs64"], rel=1e-6)
    by_module = results["train_forward_gflop_by_module_dior_bs64"]
    assert {"model.encoder", "model.decoder", "layer_pooling", "lm_head"} <= set(by_module)

    # the prior: the default sampler/steps and every sampler over the step sweep, all measured
    assert results["prior_default"] == {"sampler": "dpmsolver++", "num_inference_steps": 20}
    sweep = results["prior_ms_bs1_sweep"]
    assert set(sweep) == {"dpmsolver++", "ddim", "ddpm"}
    for sampler, by_steps in sweep.items():
        assert set(by_steps) == {"5", "10", "20"}, sampler
        assert all(isinstance(v, float) and v > 0 for v in by_steps.values()), sampler
    assert results["prior_share_default"] == results["prior_ms_bs1"] / results["gen_ms_dior_bs1"]
    # Dior through transformers' own loop: measured, and the default's tokens are its tokens (on the CPU the
    # default is that loop; on CUDA the captured step, checked by the same key in the GPU run)
    assert results["same_tokens_bs1"] == 1.0 and results["same_tokens_bs64"] == 1.0
    assert results["gen_ratio_hfloop_bs64"] == (results["gen_tokens_per_s_dior_hfloop_bs64"]
                                                / results["gen_tokens_per_s_bart_bs64"])

    # the static cache (no compile on CPU): every figure measured, same tokens as the eager path
    assert results["static_compile_expected"] is False
    assert not any(results["static_compiled"].values())
    for key in FAST_KEYS[:18]:
        assert isinstance(results[key], float) and results[key] > 0, key
    assert results["gen_ratio_static_bs64"] == (results["gen_tokens_per_s_dior_static_bs64"]
                                                / results["gen_tokens_per_s_bart_static_bs64"])
    assert results["gen_ratio_static_vs_eager_bart_bs64"] == (results["gen_tokens_per_s_dior_static_bs64"]
                                                              / results["gen_tokens_per_s_bart_bs64"])
    assert 0 < results["prior_share_static"] < 1
    assert results["train_ratio_bs256"] == results["train_examples_per_s_dior_bs256"] / results["train_examples_per_s_bart_bs256"]
    assert set(results["goals_met"]) == {"train_ratio_bs64", "train_ratio_bs256", "gen_ratio_bs64", "gen_ratio_bs256",
                                         "bs1_tokens_per_s", "prior_share"}
    assert results["goals"]["train_ratio_bs64"] == ">= 0.85" and results["goals"]["gen_ratio_bs256"] == ">= 1.0"
    assert plot.stat().st_size > 0

    # the table comes last on stdout
    table = proc.stdout
    assert table.splitlines()[-1].startswith("wrote ")
    for label in ("metric", "train ex/s bs64", "train ex/s bs256", "gen tok/s bs1", "gen tok/s bs64",
                  "gen tok/s bs256", "gen tok/s bs1 static",
                  "gen tok/s bs256 static", "Dior static / BART eager bs64", "prior ms bs1 (dpmsolver++, 20 steps)",
                  "prior ms bs1 ddim 5/10/20 steps", "default tokens == transformers' loop tokens",
                  "Dior through transformers' loop bs64", "peak MiB train bs256", "bs1_tokens_per_s",
                  "prior_share", "goals met"):
        assert label in table, label
    header = next(line for line in table.splitlines() if line.startswith("metric"))
    assert "BART" in header and "Dior" in header


@pytest.mark.skipif(compiled_training_problem() is not None, reason="needs transformers >= 5.23 (layerdrop branch)")
def test_train_only_benchmark_times_the_compiled_training_step(tmp_path):
    """`--train-only --compile-train`: eager and compiled training of both models (backend aot_eager, so that it
    runs on the CPU), with ratios like for like and against eager BART, and no generation phase."""
    output = tmp_path / "speed.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--train-only", "--device", "cpu",
         "--compile-train", "default", "--compile-train-backend", "aot_eager", "--output", str(output)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(output.read_text())
    assert results["errors"] == {}, results["errors"]
    for batch in (64, 256):
        for name in ("bart", "dior"):
            for key in (f"train_examples_per_s_{name}_bs{batch}", f"train_examples_per_s_{name}_compiled_bs{batch}",
                        f"train_compile_s_{name}_bs{batch}"):
                assert isinstance(results[key], float) and results[key] > 0, key
        ratio = results[f"train_ratio_compiled_bs{batch}"]
        assert ratio == pytest.approx(results[f"train_examples_per_s_dior_compiled_bs{batch}"]
                                      / results[f"train_examples_per_s_bart_compiled_bs{batch}"])
        assert results[f"train_ratio_compiled_vs_eager_bart_bs{batch}"] > 0
    assert not any(key.startswith("gen_") for key in results)
    assert "train ex/s bs64 compiled (default)" in proc.stdout


def test_host_cost_a_decoding_step_adds_only_the_slot_concatenations(tmp_path):
    """`benchmarks/host_cost.py` runs and writes its ratios; and what Dior adds to a decoding step is at most the two
    concatenations of the latent slot with each layer's self-attention cache, plus two: the slots' projections
    happen once per `generate()`, not per step (they used to cost 2·L + 1 more ops per step)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import host_cost

    output = tmp_path / "host.json"
    result = host_cost.main(["--layers", "3", "--steps", "3", "--iters", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == result
    for key in ("train_ops", "decode_ops_per_step", "generate_ops", "train_ms", "generate_ms"):
        assert 0 < result[f"{key}_ratio"] < 10, key
    extra = result["decode_ops_per_step_dior"] - result["decode_ops_per_step_bart"]
    assert 0 < extra <= 2 * 3 + 2, extra


def test_profile_generate_refuses_to_run_without_cuda(tmp_path):
    """`benchmarks/profile_generate.py` measures kernel launches and host syncs, which only a CUDA GPU has: on a
    machine without one it must stop with a message that says so, and write no JSON of zeros."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would profile it")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_generate

    output = tmp_path / "profile.json"
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        profile_generate.main(["--output", str(output)])
    assert not output.exists()


def test_epoch_rate_reads_the_steady_rate_past_the_compile(tmp_path):
    """benchmarks/epoch_rate.py: the rate between the first row `--skip_s` past the first logged one and the last
    (a run that spent 60 s compiling before its first logged update still reads its steady rate), epochs from
    step / epoch; evaluation rows ignored; a broken line is an error naming file:line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import epoch_rate

    log = tmp_path / "log_history.jsonl"
    rows = [{"step": s, "rc_loss": 1.0, "loss": 2.0, "train_time_s": 60 + (s - 25) / 50, "epoch": s / 500}
            for s in range(25, 2025, 25)] + [{"step": 2000, "eval_loss": 3.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "rate.json"
    epoch_rate.main(["--run", f"compiled={log}", "--output", str(out), "--plot", str(tmp_path / "rate.png")])
    run = json.loads(out.read_text())["runs"]["compiled"]
    assert run["updates_per_s"] == pytest.approx(50.0) and run["steps_per_epoch"] == 500
    assert run["epoch_s"] == pytest.approx(10.0) and run["first_logged_s"] == pytest.approx(60.0)
    assert (tmp_path / "rate.png").stat().st_size > 0
    log.write_text(log.read_text() + "{not json\n")
    with pytest.raises(SystemExit, match=r"log_history.jsonl:82: not JSON"):
        epoch_rate.main(["--run", f"compiled={log}", "--output", str(out)])
