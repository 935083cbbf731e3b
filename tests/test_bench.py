"""benchmarks/: the figures `bench.py` derives from its timings (checked against a clock the test controls), its
same-tokens check, its keys, table and JSON; the probes under benchmarks/probes/.

The tests that run a benchmark script end to end on the CPU are marked `bench` (CI runs them as their own step:
`python -m pytest -m "bench or compile"`); the rest run in the default test command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SUBPROCESS_HANG_S, tiny_config_kwargs
from dior_cvae.utils_dior import compiled_training_problem

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))

import bench  # noqa: E402
import common  # noqa: E402

# ---- keys, table and JSON helpers --------------------------------------------------------------------------------


def test_keys_are_the_names_the_docs_quote():
    assert bench.key("train_examples_per_s", "dior", None, 64) == "train_examples_per_s_dior_bs64"
    assert bench.key("peak_mem_train", "dior", "compiled", 64, "mib") == "peak_mem_train_dior_compiled_bs64_mib"
    assert bench.key("gen_ratio", None, "static_vs_eager_bart", 256) == "gen_ratio_static_vs_eager_bart_bs256"
    assert bench.key("gen_tokens_per_s", "dior", "hfloop", 1) == "gen_tokens_per_s_dior_hfloop_bs1"
    assert bench.key(None, "bart", "static", 1) == "bart_static_bs1"
    assert bench.key("train_ratio", batch=0) == "train_ratio_bs0"
    assert bench.ratio(3.0, 4.0) == 0.75 and bench.ratio(None, 4.0) is None and bench.ratio(3.0, 0.0) is None


def test_format_table_aligns_columns_under_a_rule():
    assert common.format_table([("metric", "BART", "Dior"), ("gen tok/s bs1", "1,234.5", "7.0")]).splitlines() == [
        "metric            BART  Dior",
        "----------------------------",
        "gen tok/s bs1  1,234.5   7.0",
    ]
    assert common.fmt(None) == "-" and common.fmt(1234.5) == "1,234.5" and common.fmt(0.12345, 3) == "0.123"


def test_write_json_creates_parents_and_skips_without_a_path(tmp_path):
    out = tmp_path / "a" / "b.json"
    common.write_json({"x": 1.5, "path": tmp_path}, out)
    assert json.loads(out.read_text()) == {"x": 1.5, "path": str(tmp_path)}
    common.write_json({"x": 1}, None)  # no path: nothing written, no error


def test_token_batch_pads_half_the_rows():
    plain = common.token_batch(4, 10, 6, 100, seed=3)
    again = common.token_batch(4, 10, 6, 100, seed=3)
    assert all(torch.equal(plain[k], again[k]) for k in plain)
    assert (plain["input_ids"][:, 0] == 0).all() and (plain["input_ids"][:, -1] == 2).all()
    assert plain["attention_mask"].all()
    padded = common.token_batch(4, 10, 6, 100, seed=3, padded=True)
    assert padded["attention_mask"].sum(1).tolist() == [5, 5, 10, 10]
    assert (padded["input_ids"][:2, 5:] == 1).all() and (padded["labels"][:2, 3:] == -100).all()
    assert (padded["labels"][2:] >= 0).all()


# ---- the figures bench.py derives, under a clock the test controls ------------------------------------------------

SPEC = dict(bench.TINY, context=8, response=4, new_tokens=4, train_batches=(2, 4), gen_batches=(1, 2),
            warmup=1, iters=1, gen_warmup=0, gen_iters=1)
COST_S = {"bart": 0.25, "dior": 2.0}  # fake seconds per top-level forward call
BART_STATIC_S = 0.125  # BART's forward on a static cache (the path transformers compiles on CUDA)
PRIOR_S = 0.5  # fake seconds per `sample_latents` call


class FakeClock:
    """Time that moves only when a model runs: `advance` is called by the hooks below."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def timed_run(tmp_path, monkeypatch):
    """bench.run() on SPEC, with each model's forward costing COST_S (BART's on a static cache BART_STATIC_S) and
    the prior's sample PRIOR_S of a fake clock; returns (results, models, clock)."""
    clock, models = FakeClock(), {}
    real_build = common.build_models

    def build_models(*args, **kwargs):
        pair = dict(zip(("bart", "dior"), real_build(*args, **kwargs)))
        for name, model in pair.items():
            def hook(module, args, kwargs, name=name):
                cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.25
                static = bool(getattr(cache, "is_compileable", False))  # a static cache
                clock.advance(BART_STATIC_S if name == "bart" and static else COST_S[name])

            model.register_forward_pre_hook(hook, with_kwargs=True)
        sample = pair["dior"].sample_latents

        def timed_sample(*args, **kwargs):
            clock.advance(PRIOR_S)
            return sample(*args, **kwargs)

        pair["dior"].sample_latents = timed_sample
        models.update(pair)
        return pair["bart"], pair["dior"]

    monkeypatch.setattr(common, "build_models", build_models)
    monkeypatch.setattr(bench, "PRIOR_STEPS", (2, 3))  # the sweep's arithmetic is the same at every step count
    args = bench.parse_args(["--tiny", "--fast", "--device", "cpu", "--output", str(tmp_path / "speed.json")])
    results = bench.run(args, spec=SPEC, clock=clock)
    return results, models, clock


def fake_seconds(model, clock, batch, **extra):
    """The fake time of one `generate()` with the benchmark's settings (and `extra`), read off the clock here."""
    inputs = common.token_batch(batch, SPEC["context"], SPEC["response"], SPEC["shape"]["vocab_size"])
    start = clock()
    with torch.no_grad():
        model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], **bench.generation_kwargs(SPEC),
                       **extra)
    return clock() - start


def test_rates_and_ratios_follow_from_a_known_clock(timed_run):
    """Every rate, ratio and share is what the fake clock's costs imply, worked out here without bench.py's
    arithmetic: a swapped ratio, a wrong batch or token count, a ratio against the wrong baseline, or a prior timed
    without its call fails."""
    results, models, clock = timed_run
    assert results["errors"] == {}, results["errors"]
    for batch in (2, 4):  # one forward per training step: batch / cost examples per (fake) second
        assert results[f"train_examples_per_s_bart_bs{batch}"] == pytest.approx(batch / 0.25)
        assert results[f"train_examples_per_s_dior_bs{batch}"] == pytest.approx(batch / 2.0)
        assert results[f"train_ratio_bs{batch}"] == pytest.approx(0.125)
    for batch in (1, 2):
        bart_s, dior_s = fake_seconds(models["bart"], clock, batch), fake_seconds(models["dior"], clock, batch)
        bart_static_s = fake_seconds(models["bart"], clock, batch, cache_implementation="static")
        dior_static_s = fake_seconds(models["dior"], clock, batch, cache_implementation="static")
        assert bart_s == pytest.approx(4 * 0.25), "BART: one forward per new token"
        assert bart_static_s == pytest.approx(4 * BART_STATIC_S) and dior_static_s == pytest.approx(dior_s)
        assert results[f"gen_tokens_per_s_bart_bs{batch}"] == pytest.approx(batch * 4 / bart_s)
        assert results[f"gen_tokens_per_s_dior_bs{batch}"] == pytest.approx(batch * 4 / dior_s)
        assert results[f"gen_ms_dior_bs{batch}"] == pytest.approx(dior_s * 1e3)
        assert results[f"gen_ratio_bs{batch}"] == pytest.approx(bart_s / dior_s)
        assert results[f"gen_ratio_hfloop_bs{batch}"] == pytest.approx(bart_s / dior_s)
        assert results[f"gen_ratio_static_bs{batch}"] == pytest.approx(bart_static_s / dior_static_s)
        assert results[f"gen_ratio_static_vs_eager_bart_bs{batch}"] == pytest.approx(bart_s / dior_static_s)
    dior_bs1_s = 4 * 2.0 + PRIOR_S
    assert results["prior_ms_bs1"] == pytest.approx(PRIOR_S * 1e3)
    assert all(v == pytest.approx(PRIOR_S * 1e3) for by_steps in results["prior_ms_bs1_sweep"].values()
               for v in by_steps.values())
    assert results["prior_share"] == pytest.approx(PRIOR_S / dior_bs1_s)
    assert results["prior_share_default"] == pytest.approx(PRIOR_S / dior_bs1_s)
    assert results["bs1_tokens_per_s"] == pytest.approx(4 / dior_bs1_s)
    assert results["bs1_path"] in ("default", "static")
    assert results["goals_met"]["prior_share"] is False  # 0.5 / 8.5 > 0.05


# ---- the same-tokens check -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dior():
    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

    torch.manual_seed(0)
    return DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs())).eval()


SAME_SPEC = dict(SPEC, shape=dict(vocab_size=96))


def test_same_tokens_is_one_for_the_same_call_and_counts_the_rows_that_differ(tiny_dior, monkeypatch):
    """`same_tokens` reseeds before each call and passes the same latents: two identical calls agree on every row;
    a reference that changes one row of four gives 0.75, one that changes the length gives 0, and a reference that
    samples differently (another temperature) agrees on fewer than all rows."""
    assert bench.same_tokens(tiny_dior, 4, SAME_SPEC, torch.device("cpu"), 0) == 1.0
    real_generate = tiny_dior.generate

    def generate(*args, flip_row=None, cut=False, **kwargs):
        out = real_generate(*args, **kwargs)
        if flip_row is not None:
            out = out.clone()
            out[flip_row, -1] = (out[flip_row, -1] + 1) % 96
        return out[:, :-1] if cut else out

    monkeypatch.setattr(tiny_dior, "generate", generate)
    assert bench.same_tokens(tiny_dior, 4, SAME_SPEC, torch.device("cpu"), 0, flip_row=2) == 0.75
    assert bench.same_tokens(tiny_dior, 4, SAME_SPEC, torch.device("cpu"), 0, cut=True) == 0.0
    monkeypatch.undo()
    hot = bench.same_tokens(tiny_dior, 8, SAME_SPEC, torch.device("cpu"), 0, temperature=3.0)
    assert hot < 1.0


def test_equal_rows_by_hand():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    b = torch.tensor([[1, 2, 3], [4, 5, 0], [7, 8, 9], [1, 1, 2]])
    assert bench.equal_rows(a, b) == 0.5
    assert bench.equal_rows(a, a) == 1.0
    assert bench.equal_rows(a, a[:, :2]) == 0.0


# ---- end to end on the CPU (marked: CI's benchmark step) ----------------------------------------------------------

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


def run_script(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_HANG_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.bench
def test_tiny_benchmark_runs_and_reports(tmp_path):
    """The script as a user runs it: every key the GPU run reports, measured; the table last on stdout; the plot."""
    output, plot = tmp_path / "speed.json", tmp_path / "speed.png"
    proc = run_script([ROOT / "benchmarks" / "bench.py", "--tiny", "--fast", "--device", "cpu", "--output", output,
                       "--plot", plot], tmp_path)
    results = json.loads(output.read_text())

    missing = [k for k in REQUIRED_KEYS + PRIOR_KEYS + FAST_KEYS if k not in results]
    assert not missing, missing
    assert results["errors"] == {}, results["errors"]
    assert results["complete"] is True
    assert results["tiny"] is True and results["device"] == "cpu" and results["gpu"] is None
    for key in REQUIRED_KEYS[:16] + ["bs1_tokens_per_s", "prior_ms_bs1", "generate_ms_bs1"] + FAST_KEYS[:18]:
        assert isinstance(results[key], float) and results[key] > 0, key
    assert 0 < results["prior_share"] < 1 and 0 < results["prior_share_static"] < 1
    assert results["bs1_path"] in ("default", "static")

    # the training step's FLOPs (forward + backward): Dior does BART's work plus the response encoding and pooling
    for batch in (64, 256):
        bart, dior = results[f"train_gflop_bart_bs{batch}"], results[f"train_gflop_dior_bs{batch}"]
        assert 0 < bart < dior and results[f"train_flop_ratio_bs{batch}"] == pytest.approx(bart / dior)
    assert results["train_gflop_dior_bs256"] == pytest.approx(4 * results["train_gflop_dior_bs64"], rel=1e-6)
    assert {"model.encoder", "model.decoder", "layer_pooling", "lm_head"} <= set(
        results["train_forward_gflop_by_module_dior_bs64"])

    # the prior: the default sampler/steps and every sampler over the step sweep, all measured
    assert results["prior_default"] == {"sampler": "dpmsolver++", "num_inference_steps": 20}
    sweep = results["prior_ms_bs1_sweep"]
    assert set(sweep) == {"dpmsolver++", "ddim", "ddpm"}
    for sampler, by_steps in sweep.items():
        assert set(by_steps) == {"5", "10", "20"}, sampler
        assert all(isinstance(v, float) and v > 0 for v in by_steps.values()), sampler
    # on the CPU the default path is transformers' loop: the same tokens (the check's power: the tests above)
    assert results["same_tokens_bs1"] == 1.0 and results["same_tokens_bs64"] == 1.0
    # the static cache (no compile on CPU)
    assert results["static_compile_expected"] is False
    assert not any(results["static_compiled"].values())
    assert set(results["goals_met"]) == set(bench.GOALS)
    assert results["goals"]["train_ratio_bs64"] == ">= 0.85" and results["goals"]["gen_ratio_bs256"] == ">= 1.0"
    assert plot.stat().st_size > 0

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


@pytest.mark.bench
@pytest.mark.compile
@pytest.mark.skipif(compiled_training_problem() is not None, reason="needs transformers >= 5.23 (layerdrop branch)")
def test_train_only_benchmark_times_the_compiled_training_step(tmp_path):
    """`--train-only --compile-train`: eager and compiled training of both models (backend aot_eager, so that it
    runs on the CPU), with ratios like for like and against eager BART, and no generation phase."""
    output = tmp_path / "speed.json"
    proc = run_script([ROOT / "benchmarks" / "bench.py", "--tiny", "--train-only", "--device", "cpu",
                       "--compile-train", "default", "--compile-train-backend", "aot_eager", "--output", output],
                      tmp_path)
    results = json.loads(output.read_text())
    assert results["errors"] == {}, results["errors"]
    for batch in (64, 256):
        for name in ("bart", "dior"):
            for key in (f"train_examples_per_s_{name}_bs{batch}", f"train_examples_per_s_{name}_compiled_bs{batch}",
                        f"train_compile_s_{name}_bs{batch}"):
                assert isinstance(results[key], float) and results[key] > 0, key
        assert results[f"train_ratio_compiled_bs{batch}"] > 0
        assert results[f"train_ratio_compiled_vs_eager_bart_bs{batch}"] > 0
    assert not any(key.startswith("gen_") for key in results)
    assert "train ex/s bs64 compiled (default)" in proc.stdout


# ---- probes ------------------------------------------------------------------------------------------------------


@pytest.mark.bench
def test_host_cost_a_decoding_step_adds_only_the_slot_concatenations(tmp_path):
    """`probes/host_cost.py` runs and writes its ratios; and what Dior adds to a decoding step is at most the two
    concatenations of the latent slot with each layer's self-attention cache, plus two: the slots' projections
    happen once per `generate()`, not per step."""
    import host_cost

    output = tmp_path / "host.json"
    result = host_cost.main(["--layers", "3", "--steps", "3", "--iters", "1", "--output", str(output)])
    assert json.loads(output.read_text()) == result
    for key in ("train_ops", "decode_ops_per_step", "generate_ops", "train_ms", "generate_ms"):
        assert 0 < result[f"{key}_ratio"] < 10, key
    extra = result["decode_ops_per_step_dior"] - result["decode_ops_per_step_bart"]
    assert 0 < extra <= 2 * 3 + 2, extra


def test_train_step_counts_the_ops_of_one_step():
    """`probes/train_step.py`: a forward + backward issues matmuls, and Dior more ops than BART of its shape."""
    import train_step

    small = ["--d_model", "16", "--layers", "1", "--vocab_size", "64", "--latent_size", "4", "--batch", "2",
             "--source", "6", "--target", "4", "--iters", "0", "--threads", "1"]
    dior, bart = train_step.main(small), train_step.main(small + ["--bart"])
    assert dior["step_ms_median"] is None and dior["matmul_ops_forward_backward"] > 0
    assert dior["ops_per_step"] == dior["ops_forward_backward"] + dior["ops_optimizer_step"]
    assert dior["ops_forward_backward"] > bart["ops_forward_backward"] > 0


def test_profile_generate_refuses_to_run_without_cuda(tmp_path):
    """`probes/profile_generate.py` measures kernel launches and host syncs, which only a CUDA GPU has: on a
    machine without one it must stop with a message that says so, and write no JSON of zeros."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would profile it")
    import profile_generate

    output = tmp_path / "profile.json"
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        profile_generate.main(["--output", str(output)])
    assert not output.exists()


def test_epoch_rate_reads_the_steady_rate_past_the_compile(tmp_path):
    """probes/epoch_rate.py: the rate between the first row `--skip_s` past the first logged one and the last
    (a run that spent 60 s compiling before its first logged update still reads its steady rate), epochs from
    step / epoch; evaluation rows ignored; a broken line is an error naming file:line."""
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
