"""Tests for examples/train.py and the `dior_cvae.training` parts it runs on.

Every training run is a real subprocess on the shipped DailyDialog sample with a tiny model (d_model 32, 2 layers)
and a few steps; HF_HUB_OFFLINE=1 everywhere, so any unmocked Hub call fails at once.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SUBPROCESS_HANG_S
from dior_cvae.utils_dior import compiled_training_problem
from dior_cvae.training.compiled import DeferredReadback
from dior_cvae.training.optimization import kl_weight

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"
# runs train.py with test hooks patched in (tests/train_with_hooks.py: a kill at a given point, per-rank checksums)
WITH_HOOKS = REPO / "tests" / "train_with_hooks.py"
SAMPLE_DIR = REPO / "data" / "dailydialog_sample"

TINY = [
    "--train_tokenizer_vocab_size", "400",
    "--d_model", "32", "--encoder_layers", "2", "--latent_size", "4", "--denoiser_hidden_size", "32",
    "--max_position_embeddings", "128",
    "--max_source_length", "64",
    "--max_target_length", "16",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--learning_rate", "1e-3",
    "--num_eval_generation_samples", "4",
    "--num_sample_contexts", "1",
    "--num_samples_per_context", "2",
    "--logging_steps", "1",
]
SAMPLE = ["--dataset_dir", str(SAMPLE_DIR)]

LOAD_AND_GENERATE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    path = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = tokenizer("Hello , how are you ?" + tokenizer.eos_token + "Fine , thanks .", return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**inputs, do_sample=True, top_k=50, top_p=0.9, num_return_sequences=2, max_new_tokens=8)
    assert out.shape[0] == 2, out.shape
    print("LOADED", type(model).__name__, tokenizer.batch_decode(out, skip_special_tokens=True))
    """
)


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                                    "MASTER_"))}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def run_train(tmp_path: Path, args: list[str], launcher: list[str] | None = None, check: bool = True):
    """Run train.py (`launcher`: the command before the script, e.g. torchrun, or a runner whose first argument it
    is) in a subprocess, offline."""
    command = (launcher or [sys.executable]) + [str(TRAIN), *args]
    result = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                            timeout=SUBPROCESS_HANG_S, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def load_in_fresh_process(tmp_path: Path, folder: Path) -> str:
    """Load with trust_remote_code in `python -I` from an empty folder, offline, with a fresh HF_HOME; generate."""
    workdir = tmp_path / "fresh"
    workdir.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-I", "-c", LOAD_AND_GENERATE, str(folder)], cwd=workdir,
                            env=_env(tmp_path, HF_HOME=str(tmp_path / "hf_home_fresh")), capture_output=True, text=True,
                            timeout=SUBPROCESS_HANG_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "LOADED DiorCVAEForConditionalGeneration" in result.stdout
    return result.stdout


def train_script():
    """examples/train.py, imported."""
    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log_history.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# 1. end to end
# ---------------------------------------------------------------------------------------------------------------


def test_end_to_end_output_loads_with_remote_code(tmp_path):
    out = tmp_path / "out"
    result = run_train(tmp_path, SAMPLE + TINY + [
        "--max_train_samples", "64", "--max_train_steps", "3", "--eval_steps", "2", "--checkpointing_steps", "2",
        "--with_tracking", "--output_dir", str(out)])
    log = result.stdout + result.stderr
    for split, n in (("train", 64), ("validation", 8), ("test", 8)):
        assert f"{split}: Num examples = {n}" in log
    assert "sampled responses each" in result.stdout and "sample 2:" in result.stdout

    for name in ("config.json", "model.safetensors", "modeling_dior.py", "configuration_dior.py", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json", "README.md", "eval_results.json",
                 "training_args.json", "best/model.safetensors", "best/tokenizer.json",
                 "step_2/trainer_state.json", "step_2/pretrained/model.safetensors"):
        assert (out / name).is_file(), name
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert not (out / "tokenizer").exists()

    history = read_log(out)
    train_rows = [r for r in history if "rc_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert {"loss", "rc_loss", "kl_loss", "neg_entropy", "prior_loss", "beta", "lr"} <= set(train_rows[0])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["step"] == 3
    for key in ("eval_loss", "eval_rc_loss", "eval_kl_loss", "eval_kl_loss_stderr", "eval_bleu1", "eval_bleu2", "eval_distinct1",
                "eval_distinct2", "eval_entropy1", "eval_entropy2", "eval_entropy3", "test_loss"):
        assert key in results, key
    # the latent diagnostics of every evaluation, logged beside the losses (and to tensorboard with tracking)
    evals = [r for r in history if "eval_loss" in r]
    assert evals and all(0 <= r["eval_active_units_fraction"] <= 1 and r["eval_prior_posterior_norm_ratio"] > 0
                         and math.isfinite(r["eval_mutual_information"]) for r in evals)
    assert all(f"eval_kl_layer{l}" in evals[-1] for l in range(2))

    load_in_fresh_process(tmp_path, out)


# ---------------------------------------------------------------------------------------------------------------
# 2. exact resume
# ---------------------------------------------------------------------------------------------------------------


def test_resume_continues_the_same_run(tmp_path):
    """6 updates straight (checkpoint at 2) vs resume from step_2 ("latest"): same losses, bit-identical weights.

    40 examples / batch 8 / accumulation 2 = 3 updates per epoch (the last one a single batch), so the run crosses
    an epoch boundary; validation every 2 updates must not disturb the training randomness. The resumed run collates
    in a worker process (the CUDA default) and the straight one in the loop: the batches must not depend on it."""
    from safetensors.torch import load_file

    common = SAMPLE + TINY + [
        "--max_train_samples", "40", "--gradient_accumulation_steps", "2", "--max_train_steps", "6",
        "--eval_steps", "2", "--num_sample_contexts", "0", "--lr_scheduler_type", "inverse_sqrt",
        "--num_warmup_steps", "2", "--kl_annealing", "linear", "--kl_annealing_steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(tmp_path, common + ["--checkpointing_steps", "2", "--output_dir", str(straight)])
    state = json.loads((straight / "step_2" / "trainer_state.json").read_text())
    assert (state["completed_steps"], state["epoch"], state["batches_in_epoch"]) == (2, 0, 4)

    resumed.mkdir()
    subprocess.run(["cp", "-r", str(straight / "step_2"), str(resumed / "step_2")], check=True)
    result = run_train(tmp_path, common + ["--resume_from_checkpoint", "latest", "--output_dir", str(resumed),
                                           "--dataloader_num_workers", "1"])
    assert "Resuming from" in result.stderr + result.stdout

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = {r["step"]: r for r in read_log(straight) if "rc_loss" in r and r["step"] > 2}
    rows_b = {r["step"]: r for r in read_log(resumed) if "rc_loss" in r}
    assert sorted(rows_b) == [3, 4, 5, 6]
    for step, row in rows_b.items():
        for key in ("loss", "rc_loss", "kl_loss", "beta", "lr"):
            assert row[key] == rows_a[step][key], (step, key)
    evals_a = {r["step"]: r["eval_loss"] for r in read_log(straight) if "eval_loss" in r}
    evals_b = {r["step"]: r["eval_loss"] for r in read_log(resumed) if "eval_loss" in r}
    assert evals_b == {4: evals_a[4], 6: evals_a[6]}


def test_metric_for_best_model_picks_best_by_the_sampled_responses(tmp_path):
    """`--metric_for_best_model bleu1`: best/ is the model of the evaluation with the highest validation BLEU-1 (the
    first on ties), byte for byte that step's checkpoint; eval_results.json names the step and the value. Without
    sampled responses to score, the flag is refused."""
    out = tmp_path / "out"
    run_train(tmp_path, SAMPLE + TINY + [
        "--max_train_samples", "32", "--max_train_steps", "4", "--eval_steps", "1", "--checkpointing_steps", "1",
        "--learning_rate", "3e-3", "--num_eval_generation_samples", "8", "--num_sample_contexts", "0",
        "--metric_for_best_model", "bleu1", "--output_dir", str(out)])
    evals = [r for r in read_log(out) if "eval_bleu1" in r and r["step"] <= 4]
    by_step = {r["step"]: r["eval_bleu1"] for r in evals}
    assert sorted(by_step) == [1, 2, 3, 4]
    best_step = max(sorted(by_step), key=lambda step: (by_step[step], -step))
    results = json.loads((out / "eval_results.json").read_text())
    assert (results["metric_for_best_model"], results["best_step"]) == ("bleu1", best_step)
    assert results["best_metric"] == by_step[best_step]
    best = (out / "best" / "model.safetensors").read_bytes()
    assert best == (out / f"step_{best_step}" / "pretrained" / "model.safetensors").read_bytes()

    refused = run_train(tmp_path, SAMPLE + TINY + ["--metric_for_best_model", "bleu2", "--num_eval_generation_samples",
                                                   "0", "--output_dir", str(tmp_path / "refused")], check=False)
    assert refused.returncode == 2
    assert "--metric_for_best_model bleu2 is a metric of sampled responses" in refused.stderr


def test_compiled_training_needs_a_transformers_without_the_layerdrop_branch():
    from dior_cvae.utils_dior import compiled_training_problem

    assert "transformers >= 5.23.0" in compiled_training_problem("5.17.0")
    assert compiled_training_problem("5.23.0") is None and compiled_training_problem("5.24.0.dev0") is None


@pytest.mark.skipif(compiled_training_problem() is None, reason="only older transformers refuse --torch_compile")
def test_torch_compile_is_refused_on_an_older_transformers(tmp_path):
    result = run_train(tmp_path, SAMPLE + TINY + ["--torch_compile", "--output_dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 2
    assert "--torch_compile: a compiled training step needs transformers >= 5.23.0" in result.stderr


@pytest.mark.skipif(compiled_training_problem() is not None, reason="needs transformers >= 5.23 (layerdrop branch)")
@pytest.mark.compile
def test_torch_compile_trains_the_same_model(tmp_path):
    """`--torch_compile` runs the training forward and backward through `CompiledTrainingForward` (backend aot_eager
    here: eager kernels and random draws, so it runs on the CPU and must give the eager run's numbers) on batches of
    one static shape (the eager run pads to the same lengths, so that the random draws line up): 4 updates
    with β annealed (a new value each update, given as a tensor) and memory dropout give the eager run's losses and
    weights; evaluation, sampling and saving run on the eager model."""
    from safetensors.torch import load_file

    common = SAMPLE + TINY + [
        "--max_train_samples", "32", "--max_train_steps", "4", "--num_sample_contexts", "0", "--kl_annealing", "linear",
        "--kl_annealing_steps", "4", "--dataloader_num_workers", "0",
        "--max_target_length", "64", "--pad_to_multiple_of", "64"]  # eager batches: the compiled run's static shape
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_train(tmp_path, common + ["--output_dir", str(eager)])
    result = run_train(tmp_path, common + ["--output_dir", str(compiled), "--torch_compile",
                                           "--torch_compile_backend", "aot_eager"])
    assert "torch.compile of the training step" in result.stderr + result.stdout
    rows_a = [r for r in read_log(eager) if "rc_loss" in r]
    rows_b = [r for r in read_log(compiled) if "rc_loss" in r]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert len({r["beta"] for r in rows_b}) == 4
    for a, b in zip(rows_a, rows_b):
        for key in ("loss", "rc_loss", "kl_loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-4), (a["step"], key, a[key], b[key])
    weights_a, weights_b = load_file(eager / "model.safetensors"), load_file(compiled / "model.safetensors")
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(compiled_training_problem() is not None, reason="needs transformers >= 5.23 (layerdrop branch)")
def test_torch_compile_with_cuda_graphs_refuses_gradient_accumulation(tmp_path):
    result = run_train(tmp_path, SAMPLE + TINY + ["--torch_compile", "--gradient_accumulation_steps", "2",
                                                  "--output_dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 2
    assert "--torch_compile_mode reduce-overhead" in result.stderr and "--gradient_accumulation_steps 1" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 3. two-process CPU DDP
# ---------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path):
    """torchrun with 2 processes and no GPU (no ACCELERATE_USE_CPU set: the script must switch to gloo itself).
    No find_unused_parameters: every parameter gets a gradient every step (diffusion prior, accumulation 2)."""
    dump = tmp_path / "ranks"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    result = run_train(tmp_path, SAMPLE + TINY + [
        "--max_train_samples", "64", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "4", "--eval_steps", "2", "--output_dir", str(tmp_path / "out")],
        launcher=launcher + [str(WITH_HOOKS), f"dump_rank_weights={dump}"])
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["distributed_type"].endswith("MULTI_CPU") for r in ranks), ranks
    assert all(r["optimizer_steps"] == [4] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 16" in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------------------------------
# 4. Hub push (mocked)
# ---------------------------------------------------------------------------------------------------------------

FAKE_HUB_RUNNER = textwrap.dedent(
    """
    import json, runpy, shutil, sys
    from pathlib import Path
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    fake_root, script = Path(__file__).parent / "fake_hub", sys.argv[1]
    calls = []

    class RepoUrl(str):
        @property
        def repo_id(self):
            return self.split("huggingface.co/")[-1]

    def create_repo(self, repo_id, *args, **kwargs):
        calls.append({"create_repo": repo_id, "private": kwargs.get("private"), "token": self.token})
        return RepoUrl("https://huggingface.co/" + repo_id)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append({"upload_folder": repo_id, "ignore_patterns": ignore_patterns})
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            target = fake_root / repo_id / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, target)
        (fake_root / "calls.json").write_text(json.dumps(calls))
        return "https://huggingface.co/" + repo_id

    huggingface_hub.HfApi.create_repo = create_repo
    huggingface_hub.HfApi.upload_folder = upload_folder
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
    """
)


def test_push_to_hub_mocked(tmp_path):
    from huggingface_hub import ModelCard

    fake = tmp_path / "fake_hub"
    runner = tmp_path / "fake_hub_runner.py"
    runner.write_text(FAKE_HUB_RUNNER)
    run_train(tmp_path, SAMPLE + TINY + [
        "--max_train_samples", "64", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--output_dir", str(tmp_path / "out"), "--push_to_hub", "--hub_model_id", "someone/dior-tiny",
        "--hub_token", "hf_fake"], launcher=[sys.executable, str(runner)])

    calls = json.loads((fake / "calls.json").read_text())
    assert calls[0] == {"create_repo": "someone/dior-tiny", "private": False, "token": "hf_fake"}  # before training
    assert calls[-1]["upload_folder"] == "someone/dior-tiny"  # through hub_dior.upload_model_folder
    repo = fake / "someone" / "dior-tiny"
    for name in ("README.md", "config.json", "generation_config.json", "model.safetensors", "modeling_dior.py",
                 "configuration_dior.py", "latent_dior.py", "prior_dior.py", "scheduling_dior.py", "tokenizer.json",
                 "tokenizer_config.json", "eval_results.json"):
        assert (repo / name).is_file(), name
    assert not list(repo.glob("step_*")) and not (repo / "best").exists()
    assert "hf_fake" not in "".join(p.read_text(errors="ignore") for p in repo.rglob("*") if p.is_file())

    card = ModelCard.load(repo / "README.md")
    meta = yaml.safe_load(card.content.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"dior-cvae", "dialog", "cvae", "diffusion"} <= set(meta["tags"]) and "text2text-generation" not in meta["tags"]
    assert meta["datasets"] == ["li2017dailydialog/daily_dialog"] and meta["license"] == "cc-by-nc-sa-4.0"
    assert "base_model" not in meta  # from scratch
    (index,) = meta["model-index"]
    assert index["name"] == "dior-tiny"
    (result,) = index["results"]
    assert result["dataset"]["name"] == "DailyDialog (sample)" and result["dataset"]["split"] == "test"
    metrics = {m["name"]: m["value"] for m in result["metrics"]}
    assert {"BLEU-1, paper protocol (nltk method7)", "BLEU-2, paper protocol (nltk method7)", "Distinct-1",
            "Distinct-2"} <= set(metrics)
    eval_results = json.loads((repo / "eval_results.json").read_text())
    assert metrics["BLEU-1, paper protocol (nltk method7)"] == round(eval_results["test_bleu1"], 4)
    assert 'pipeline("dialog-generation", model="someone/dior-tiny", trust_remote_code=True)' in card.text
    assert 'from_pretrained("someone/dior-tiny", trust_remote_code=True)' in card.text
    assert "Sample generations" in card.text and "Reference:" in card.text and "## Citation" in card.text

    load_in_fresh_process(tmp_path, repo)


# ---------------------------------------------------------------------------------------------------------------
# 5. JSON Lines input with a bad line
# ---------------------------------------------------------------------------------------------------------------


def test_jsonl_bad_line_fails_with_location_or_is_skipped(tmp_path):
    from dior_cvae.training.data import load_dailydialog_dir

    splits = load_dailydialog_dir(SAMPLE_DIR, ["train", "validation"])
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    lines = [json.dumps(ex) for ex in splits["train"][:24]]
    lines.insert(4, '{"context": ["unterminated", "response": "x"')  # line 5
    train.write_text("\n".join(lines) + "\n")
    validation.write_text("\n".join(json.dumps(ex) for ex in splits["validation"][:8]) + "\n")
    args = ["--train_file", str(train), "--validation_file", str(validation)] + TINY + [
        "--max_train_steps", "2", "--output_dir", str(tmp_path / "out")]

    failed = run_train(tmp_path, args, check=False)
    assert failed.returncode != 0
    assert f"{train}:5:" in failed.stderr and "invalid JSON" in failed.stderr
    assert "Traceback" not in failed.stderr

    ok = run_train(tmp_path, args + ["--skip_bad_lines"])
    log = ok.stdout + ok.stderr
    assert "skipped 1 bad line" in log
    assert "train: Num examples = 24" in log and "validation: Num examples = 8" in log
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "| skipped bad lines | 1 |" in (tmp_path / "out" / "README.md").read_text()


def test_csv_with_custom_column_names_trains(tmp_path):
    """CSV through `datasets` (map + DataCollatorForSeq2Seq); the string context column holds `__eou__`-separated
    turns."""
    import csv

    from dior_cvae.training.data import load_dailydialog_dir

    splits = load_dailydialog_dir(SAMPLE_DIR, ["train", "validation"])
    files = {}
    for split, n in (("train", 24), ("validation", 8)):
        files[split] = tmp_path / f"{split}.csv"
        with files[split].open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "history", "reply"])
            writer.writerows((i, " __eou__ ".join(ex["context"]), ex["response"]) for i, ex in enumerate(splits[split][:n]))
    out = tmp_path / "out"
    result = run_train(tmp_path, TINY + [
        "--train_file", str(files["train"]), "--validation_file", str(files["validation"]),
        "--context_column", "history", "--response_column", "reply", "--num_proc", "1",
        "--num_sample_contexts", "2", "--max_train_steps", "2", "--output_dir", str(out)])
    log = result.stdout + result.stderr
    assert "train: Num examples = 24" in log and "validation: Num examples = 8" in log
    assert [r["step"] for r in read_log(out) if "rc_loss" in r] == [1, 2]
    last = splits["validation"][7]  # the second printed context: its turns come back one per line
    assert len(last["context"]) > 1
    assert all(f": {turn}" in result.stdout for turn in last["context"])
    assert (out / "model.safetensors").is_file()

    failed = run_train(tmp_path, TINY + ["--train_file", str(files["train"]), "--output_dir", str(tmp_path / "x")],
                       check=False)
    assert failed.returncode != 0 and "no column 'context'" in failed.stderr and "--context_column" in failed.stderr
    assert "Traceback" not in failed.stderr


# ---------------------------------------------------------------------------------------------------------------
# In-process checks of the helpers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior_type", ["diffusion", "gaussian", "standard"])
def test_every_parameter_gets_a_gradient(tiny_model, prior_type):
    """Why DDP needs no find_unused_parameters: one training step reaches every parameter, even at β = 0."""
    model = tiny_model(prior_type=prior_type).train()
    input_ids, labels = torch.randint(5, 96, (3, 10)), torch.randint(5, 96, (3, 6))
    model(input_ids=input_ids, labels=labels, kl_weight=0.0).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_deferred_readback_on_the_cpu_reads_at_once():
    readback = DeferredReadback(torch.device("cpu"))
    tag, value = readback.push(torch.tensor([1.0, float("nan")]), "update 1")
    assert tag == "update 1" and value[0] == 1 and value[1].isnan()
    assert readback.flush() is None  # nothing is left pending on the CPU


def test_kl_weight_schedules():
    assert [kl_weight(s, "linear", 4) for s in (0, 2, 4, 10)] == [0.0, 0.5, 1.0, 1.0]
    assert kl_weight(10_000, "linear") == 0.5  # paper default: 20k steps
    assert kl_weight(7, "none") == 1.0
    # cyclical, 10 updates per epoch: epoch 0 flat at 1e-5, epoch 1 rising to 1 at its middle, epoch 2 flat again
    betas = [kl_weight(s, "cyclical", steps_per_epoch=10) for s in range(30)]
    assert betas[:10] == [1e-5] * 10
    assert betas[10] == pytest.approx(1e-5) and betas[12] == pytest.approx(0.4, abs=1e-4)
    assert betas[15:20] == [1.0] * 5 and betas[20:30] == [1e-5] * 10
    assert kl_weight(5, "cyclical", 4) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)  # half-cycle of 4 updates


def test_config_fields_are_flags_with_their_docs_and_types(capsys):
    """Every DiorCVAEConfig hyper-parameter is a flag typed by its field and documented by the config's docstring;
    only the flags given override the config (from scratch, completed as the model needs: equal layer counts, heads
    and FFN sizes from d_model); a bad value is refused when the arguments are parsed."""
    import argparse

    from dior_cvae import DiorCVAEConfig
    from dior_cvae.training.model_config import add_config_arguments, complete_from_scratch, given_config_fields

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--d_model", "256", "--encoder_layers", "4", "--latent_size", "16", "--prior_type",
                              "gaussian", "--memory_dropout", "0.5", "--no-cross_attention_infusion"])
    given = given_config_fields(args)
    assert given == {"d_model": 256, "encoder_layers": 4, "latent_size": 16, "prior_type": "gaussian",
                     "memory_dropout": 0.5, "cross_attention_infusion": False}
    completed, _ = complete_from_scratch(given)
    config = DiorCVAEConfig(**completed)
    assert (config.decoder_layers, config.encoder_attention_heads, config.decoder_ffn_dim) == (4, 4, 1024)
    for bad in (["--latent_size", "big"], ["--prior_type", "vampprior"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "invalid int value: 'big'" in capsys.readouterr().err
    help_text = " ".join(parser.format_help().split())
    assert "--kl_free_bits KL_FREE_BITS Free bits (Kingma et al. 2016), in nats per latent dimension" in help_text
    assert "(default: the loaded config's; 1.0 from scratch)" in help_text and "--vocab_size" not in help_text  # vocab: the tokenizer's


def test_config_file_and_flags_build_the_model_and_bad_values_fail_at_parsing(tmp_path):
    """--config_name (a config.json) with flags on top; an invalid combination is refused before any data is read."""
    from dior_cvae import DiorCVAEConfig
    from dior_cvae.training.model_config import build_model

    train = train_script()

    DiorCVAEConfig(d_model=64, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                   encoder_ffn_dim=128, decoder_ffn_dim=128, latent_size=8, prior_type="gaussian",
                   max_position_embeddings=64).save_pretrained(tmp_path / "cfg")
    args = train.parse_args(SAMPLE + ["--config_name", str(tmp_path / "cfg" / "config.json"), "--latent_size", "4",
                                      "--train_tokenizer_vocab_size", "100", "--max_source_length", "32",
                                      "--max_target_length", "16"])
    from dior_cvae.training.data import train_tokenizer

    model = build_model(args, train_tokenizer(["a b c", "d e f"] * 5, 120))
    assert (model.config.d_model, model.config.encoder_layers, model.config.latent_size, model.config.prior_type) == (
        64, 3, 4, "gaussian")
    with pytest.raises(SystemExit):
        train.parse_args(SAMPLE + ["--train_tokenizer_vocab_size", "100", "--encoder_layers", "2", "--decoder_layers",
                                   "3"])


@pytest.mark.parametrize("missing, flags, expected", [
    ("matplotlib", SAMPLE, "training_curves.png needs matplotlib"),
    ("tensorboard", SAMPLE + ["--with_tracking"], "--with_tracking --report_to tensorboard needs tensorboard"),
    ("datasets", ["--dataset_name", "daily_dialog"], "--dataset_name and JSON / CSV files are read with the `datasets`"),
])
def test_a_missing_training_extra_is_named_when_the_arguments_are_parsed(monkeypatch, capsys, missing, flags, expected):
    train = train_script()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    with pytest.raises(SystemExit):
        train.parse_args(flags + ["--train_tokenizer_vocab_size", "100"])
    err = capsys.readouterr().err
    assert expected in err and 'pip install -e ".[train]"' in err
    monkeypatch.undo()
    train.parse_args(flags + ["--train_tokenizer_vocab_size", "100"])  # all installed: accepted


def test_trainer_route_anneals_beta(tiny_model, tmp_path):
    """Seq2SeqTrainer route: β from the linear schedule at each update (2 forwards per update with accumulation),
    as a 0-d tensor (so that `torch_compile=True` does not recompile per β), logged as `beta`; evaluation at β = 1."""
    from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast, Seq2SeqTrainingArguments

    from dior_cvae.training.data import encode_examples, load_dailydialog_dir, train_tokenizer
    from dior_cvae.training.trainer import DiorTrainer, KLAnnealingCallback

    examples = load_dailydialog_dir(SAMPLE_DIR, ["validation"])["validation"][:24]
    tokenizer: PreTrainedTokenizerFast = train_tokenizer(
        [t for ex in examples for t in (*ex["context"], ex["response"])], vocab_size=96)
    data = encode_examples(tokenizer, examples, 32, 12, show_progress=False)
    model = tiny_model(vocab_size=len(tokenizer)).train()
    used = []
    forward = model.forward

    @functools.wraps(forward)  # the Trainer reads the signature to pick the batch columns
    def spy(**kwargs):
        beta = kwargs["kl_weight"]
        assert torch.is_tensor(beta) and beta.ndim == 0, "β must reach the model as a 0-d tensor (no recompiles)"
        used.append(beta.item())
        return forward(**kwargs)

    model.forward = spy
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                                    gradient_accumulation_steps=2, per_device_eval_batch_size=8, learning_rate=1e-3,
                                    logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = DiorTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8],
                          data_collator=DataCollatorForSeq2Seq(tokenizer),
                          kl_annealing=KLAnnealingCallback("linear", annealing_steps=4))
    trainer.train()
    expected = [kl_weight(step, "linear", 4) for step in range(5)]
    assert expected == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert used == [beta for beta in expected for _ in range(2)]
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert [(row["step"], row["beta"]) for row in logged] == list(enumerate(expected, start=1))
    assert all(math.isfinite(row["loss"]) for row in logged)

    used.clear()
    metrics = trainer.evaluate()
    assert used == [1.0] and math.isfinite(metrics["eval_loss"])
    with pytest.raises(ValueError, match="unknown KL annealing schedule"):
        KLAnnealingCallback("cosine")


def test_batch_mean_stderr_is_the_standard_error_of_the_example_mean():
    from dior_cvae.training.evaluation import batch_mean_stderr

    means = torch.tensor([1.0, 3.0, 2.0, 6.0])
    equal = torch.stack([means, torch.full((4,), 8.0)], dim=1)
    assert batch_mean_stderr(equal) == pytest.approx(means.std().item() / 2)  # s / √(number of batches)
    # unequal batches (a last batch of 2 of 26 examples): the cluster formula term by term
    sizes = torch.tensor([8.0, 8.0, 8.0, 2.0])
    m = (sizes * means).sum() / sizes.sum()
    by_hand = math.sqrt(4 / 3 * sum((n * (x - m)) ** 2 for n, x in zip(sizes.tolist(), means.tolist()))) / 26
    assert batch_mean_stderr(torch.stack([means, sizes], dim=1)) == pytest.approx(by_hand)
    assert math.isnan(batch_mean_stderr(equal[:1]))
