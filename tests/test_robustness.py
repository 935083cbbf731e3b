"""Bad inputs fail with an error that names the problem; nothing is lost, nothing from data is
executed.

- `test_bad_input` is the first table (`BAD_INPUTS`): each row runs one bad input in-process and asserts the error
  names the flag / argument / file:line / value, or checks the documented behaviour.
- `test_round_two` runs the second table (`robustness_cases.CASES`, by class: data lost, silently wrong, unbounded,
  bare tracebacks, unclear errors): each row checks the outcome (files unchanged, the refusal naming the flag and
  the path, the tokens a special token typed as text becomes, ...); two train.py processes on one folder and a
  SIGKILL during the final merge run as subprocesses, over one shared trained folder.
- kill-and-resume, NaN guard, output folder, Hub push and no-code-execution tests run train.py as a subprocess
  (tiny model, a few updates) where they must.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_HANG_S, tiny_config_kwargs
from robustness_cases import CASES
from test_train import FAKE_HUB_RUNNER, REPO, SAMPLE, TINY, WITH_HOOKS, read_log, run_train

from dior_cvae.training import checkpointing, optimization, sources
from dior_cvae.training.data import DataFormatError, load_dailydialog_dir, load_jsonl


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_script("train")
generate = _load_script("generate")
score = _load_script("score")

TRAIN_ARGS = ["--dataset_dir", str(REPO / "data" / "dailydialog_sample"), "--train_tokenizer_vocab_size", "300"]


class FakeAccelerator:
    """The single-process surface of `Accelerator` that the output-folder and checkpoint helpers use."""

    is_main_process = True

    def wait_for_everyone(self):
        pass


@pytest.fixture(scope="module")
def tiny():
    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

    torch.manual_seed(0)
    return DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs())).eval()


def _ids():
    return torch.tensor([[0, 5, 6, 7, 2]])


def _generate(**kwargs):
    return lambda model, tmp: model.generate(**{"input_ids": _ids(), "max_new_tokens": 4, **kwargs})


def _train_args(*extra):
    return lambda model, tmp: train.parse_args(TRAIN_ARGS + list(extra))


def _generate_args(*extra):
    return lambda model, tmp: generate.parse_args(["--model_name_or_path", "m", *extra])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _jsonl_rows(*rows: bytes) -> bytes:
    return b"\n".join(rows) + b"\n"


GOOD = b'{"context": ["hi"], "response": "hello"}'


def _jsonl_not_utf8(model, tmp):
    load_jsonl(_write(tmp / "d.jsonl", _jsonl_rows(GOOD, GOOD, b'{"context": ["caf\xe9"], "response": "x"}')))


def _jsonl_not_utf8_skipped(model, tmp):
    path = _write(tmp / "d.jsonl", _jsonl_rows(GOOD, b'{"context": ["\xff"], "response": "x"}', GOOD))
    assert load_jsonl(path, skip_bad_lines=True)[1] == 1
    return "documented: skipped 1"


def _jsonl_gz_truncated(model, tmp):
    data = gzip.compress(_jsonl_rows(*[GOOD] * 2000))
    load_jsonl(_write(tmp / "d.jsonl.gz", data[: len(data) // 2]), skip_bad_lines=True)


def _dailydialog_not_utf8(model, tmp):
    _write(tmp / "train.txt", b"a __eou__ b __eou__\nc __eou__ \xe9 __eou__\n")
    load_dailydialog_dir(tmp, ["train"])


def _dailydialog_empty_turns(model, tmp):
    _write(tmp / "train.txt", b"a __eou__  __eou__ b __eou__  __eou__\n")
    pairs = load_dailydialog_dir(tmp, ["train"])["train"]
    assert [(p["context"], p["response"]) for p in pairs] == [(["a"], "b")]
    return "documented: empty turns dropped"


def _empty_validation_file(model, tmp):
    args = train.parse_args(["--train_file", str(_write(tmp / "t.jsonl", _jsonl_rows(GOOD))),
                             "--validation_file", str(_write(tmp / "v.jsonl", b"\n")), "--tokenizer_name", "x"])
    sources.load_raw_splits(args)


def _state_problem(mutate):
    def run(model, tmp):
        folder = tmp / "step_2"
        (folder / "pretrained").mkdir(parents=True)
        _write(folder / "model.safetensors", b"0123456789")
        files = {"model.safetensors": {"size": 10, "sha256": checkpointing.sha256(folder / "model.safetensors")}}
        state = {"completed_steps": 2, "epoch": 0, "batches_in_epoch": 2, "lr_scheduler": {}, "files": files}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        mutate(folder)
        return checkpointing.checkpoint_problem(folder) or "intact"
    return run


def _non_empty_output_dir(model, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "model.safetensors").write_text("the first run's model")
    args = train.parse_args(TRAIN_ARGS + ["--output_dir", str(tmp / "out")])
    checkpointing.prepare_output_dir(FakeAccelerator(), Path(args.output_dir), args.resume_from_checkpoint,
                                     args.overwrite_output_dir)


def _truncated_model_for_generate(model, tmp):
    from dior_cvae.training.data import train_tokenizer

    model.save_pretrained(tmp / "m")
    train_tokenizer(["hello there", "general kenobi"] * 5, 120).save_pretrained(tmp / "m")
    weights = tmp / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = generate.parse_args(["--model_name_or_path", str(tmp / "m"), "--output", "o", "--input_file", "i"])
    generate.load_model_and_tokenizer(args, torch.device("cpu"))


def _score_truncated_gz(model, tmp):
    rows = "".join(json.dumps({"context": f"a {i}", "reference": f"b {i * 7}", "samples": [f"c {i * 13}"]}) + "\n"
                   for i in range(2000))
    data = gzip.compress(rows.encode())
    score.main(["--input", str(_write(tmp / "g.jsonl.gz", data[: len(data) // 2])), "--no_semantic"])


# (id, callable(model, tmp_path), substrings the error must contain)
BAD_INPUTS = [
    # train.py flags
    ("train checkpointing_steps 0", _train_args("--checkpointing_steps", "0"), ["--checkpointing_steps", "'0'"]),
    ("train checkpointing_steps abc", _train_args("--checkpointing_steps", "abc"), ["--checkpointing_steps", "abc"]),
    ("train logging_steps 0", _train_args("--logging_steps", "0"), ["--logging_steps must be >= 1, got 0"]),
    ("train grad accumulation 0", _train_args("--gradient_accumulation_steps", "0"), ["--gradient_accumulation_steps"]),
    ("train num_train_epochs 0", _train_args("--num_train_epochs", "0"), ["--num_train_epochs must be >= 1"]),
    ("train batch size 0", _train_args("--per_device_train_batch_size", "0"), ["--per_device_train_batch_size"]),
    ("train eval_steps 0", _train_args("--eval_steps", "0"), ["--eval_steps"]),
    ("train max_train_steps 0", _train_args("--max_train_steps", "0"), ["--max_train_steps"]),
    ("train max_target_length 1", _train_args("--max_target_length", "1"), ["--max_target_length must be >= 2"]),
    ("train learning_rate nan", _train_args("--learning_rate", "nan"), ["--learning_rate", "nan"]),
    ("train learning_rate negative", _train_args("--learning_rate", "-1"), ["--learning_rate", "-1"]),
    ("train max_grad_norm inf", _train_args("--max_grad_norm", "inf"), ["--max_grad_norm", "inf"]),
    ("train adam_beta1 1.5", _train_args("--adam_beta1", "1.5"), ["--adam_beta1", "1.5"]),
    ("train checkpoints_total_limit 0", _train_args("--checkpoints_total_limit", "0"), ["--checkpoints_total_limit"]),
    ("train lr_scheduler_kwargs list", _train_args("--lr_scheduler_kwargs", "[1]"), ["--lr_scheduler_kwargs"]),
    ("train unknown lr schedule", _train_args("--lr_scheduler_type", "noam"), ["--lr_scheduler_type", "noam"]),
    ("train tokenizer ./missing", _train_args("--tokenizer_name", "./missing-tok"), ["no such folder: ./missing-tok"]),
    ("train model /abs/missing", _train_args("--model_name_or_path", "/no/such/model"), ["no such folder: /no/such/model"]),
    ("train model ~/missing", _train_args("--model_name_or_path", "~/no-such-dior"), ["no such folder: ~/no-such-dior"]),
    ("train missing train_file", lambda m, t: train.parse_args(["--train_file", str(t / "nope.jsonl"),
                                                                "--tokenizer_name", "x"]), ["--train_file", "nope.jsonl"]),
    ("train empty validation_file", _empty_validation_file, ["--validation_file", "v.jsonl", "no examples"]),
    ("train non-empty output_dir", _non_empty_output_dir, ["--output_dir", "not empty", "model.safetensors",
                                                           "--overwrite_output_dir"]),
    # checkpoints
    ("ckpt empty trainer_state", _state_problem(lambda f: (f / "trainer_state.json").write_text("")),
     ["trainer_state.json is not valid JSON"]),
    ("ckpt truncated weights", _state_problem(lambda f: _write(f / "model.safetensors", b"01234")),
     ["model.safetensors is truncated", "5 bytes, 10 expected"]),
    ("ckpt weights from another save", _state_problem(lambda f: _write(f / "model.safetensors", b"9876543210")),
     ["model.safetensors does not match its sha256"]),
    ("ckpt missing file", _state_problem(lambda f: (f / "model.safetensors").unlink()), ["model.safetensors is missing"]),
    ("ckpt old pickle-scheduler format", _state_problem(lambda f: (f / "trainer_state.json").write_text(
        json.dumps({"completed_steps": 2, "epoch": 0, "batches_in_epoch": 2}))), ["lacks lr_scheduler, files"]),
    # data files
    ("jsonl non-UTF-8 line", _jsonl_not_utf8, ["d.jsonl:3:", "not valid UTF-8", "0xe9"]),
    ("jsonl non-UTF-8 --skip_bad_lines", _jsonl_not_utf8_skipped, ["documented: skipped 1"]),
    ("jsonl.gz truncated", _jsonl_gz_truncated, ["d.jsonl.gz:", "truncated or corrupt gzip"]),
    ("dailydialog non-UTF-8", _dailydialog_not_utf8, ["train.txt:2:", "not valid UTF-8"]),
    ("dailydialog empty turns", _dailydialog_empty_turns, ["documented: empty turns dropped"]),
    # generate.py / score.py
    ("generate output is input", _generate_args("--output", "x.jsonl", "--input_file", "./x.jsonl"),
     ["--output x.jsonl is the --input_file"]),
    ("generate steps 0", _generate_args("--output", "o", "--input_file", "i", "--num_inference_steps", "0"),
     ["--num_inference_steps must be >= 1"]),
    ("generate guidance nan", _generate_args("--output", "o", "--input_file", "i", "--prior_guidance_scale", "nan"),
     ["--prior_guidance_scale", "nan"]),
    ("generate prior temperature nan", _generate_args("--output", "o", "--input_file", "i", "--prior_temperature",
                                                      "nan"), ["--prior_temperature", "nan"]),
    ("generate truncated safetensors", _truncated_model_for_generate, ["cannot load", "/m:"]),
    ("score truncated gz", _score_truncated_gz, ["--input", "g.jsonl.gz", "EOFError"]),
    # model.generate()
    ("generate() num_inference_steps 0", _generate(num_inference_steps=0), ["`num_inference_steps`", "0"]),
    ("generate() guidance nan", _generate(prior_guidance_scale=float("nan")), ["`prior_guidance_scale`", "nan"]),
    ("generate() guidance negative", _generate(prior_guidance_scale=-0.5), ["`prior_guidance_scale`", "-0.5"]),
    ("generate() prior_temperature negative", _generate(prior_temperature=-1.0), ["`prior_temperature`", "-1.0"]),
    ("generate() num_return_sequences 0", _generate(num_return_sequences=0), ["`num_return_sequences`", "0"]),
    ("generate() max_new_tokens 0", _generate(max_new_tokens=0), ["`max_new_tokens`", "0"]),
    ("generate() max_new_tokens too long", _generate(max_new_tokens=64), ["`max_new_tokens` (64)",
                                                                          "max_position_embeddings"]),
    ("generate() id >= vocab", _generate(input_ids=torch.tensor([[0, 96, 2]])), ["`input_ids`", "[0, 96)", "96]"]),
    ("generate() negative id", _generate(input_ids=torch.tensor([[0, -1, 2]])), ["`input_ids`", "-1"]),
    ("generate() float ids", _generate(input_ids=torch.ones(1, 3)), ["`input_ids` must be an integer tensor"]),
    ("generate() 1-D ids", _generate(input_ids=torch.tensor([0, 5, 2])), ["`input_ids` must have shape"]),
    ("generate() mask shape", _generate(attention_mask=torch.ones(1, 3, dtype=torch.long)),
     ["`attention_mask` shape (1, 3)", "(1, 5)"]),
    ("generate() integer latents", _generate(latents=torch.zeros(1, 2, 8, dtype=torch.long)),
     ["`latents` must be a floating-point tensor"]),
    ("generate() nan latents", _generate(latents=torch.full((1, 2, 8), float("nan"))), ["`latents` contain NaN"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case, tiny, tmp_path, capsys, monkeypatch):
    name, run, expected = case
    monkeypatch.chdir(tmp_path)
    try:
        message = run(tiny, tmp_path)  # a documented behaviour (checked inside) returns its description
        assert message is not None, f"{name}: accepted without an error"
    except (SystemExit, ValueError, DataFormatError, FileNotFoundError) as exc:
        message = f"{exc}"
    message += capsys.readouterr().err
    for text in expected:
        assert text in message, f"{name}: {text!r} not in {message!r}"
    assert "Traceback" not in message


def test_every_row_checks_something():
    """A row with no expected text would pass on any message, and a repeated name would hide a row in the report."""
    names = [name for name, _, _ in BAD_INPUTS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    vacuous = [name for name, _, expected in BAD_INPUTS if not expected or not all(text.strip() for text in expected)]
    assert not vacuous, vacuous


@pytest.fixture(scope="module")
def round_two_shared(tmp_path_factory):
    """The trained folder that the second table's rows copy, built once (by the first row that needs it)."""
    from robustness_cases import Context

    Context.shared.clear()
    Context.shared["dir"] = tmp_path_factory.mktemp("round-two-shared")
    yield
    Context.shared.clear()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_round_two(case, round_two_shared, tiny, tmp_path, monkeypatch):
    from robustness_cases import Context

    name, _, check = case
    monkeypatch.chdir(tmp_path)
    check(Context(tmp_path, tiny))


# ---------------------------------------------------------------------------------------------------------------
# Subprocess runs of train.py
# ---------------------------------------------------------------------------------------------------------------

RUN = SAMPLE + TINY + ["--max_train_samples", "40", "--max_train_steps", "6", "--num_eval_generation_samples", "0",
                       "--num_sample_contexts", "0", "--checkpointing_steps", "2", "--lr_scheduler_type",
                       "inverse_sqrt", "--num_warmup_steps", "2", "--kl_annealing_steps", "4"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_kill_and_resume_end_with_the_same_weights(tmp_path):
    """SIGKILL after update 3 (mid-run) and in the middle of writing step_4: each resume ("latest") ends with the
    weights of the uninterrupted run, and log_history.jsonl has each step once."""
    straight = tmp_path / "straight"
    run_train(tmp_path, RUN + ["--output_dir", str(straight)])
    reference = _weights(straight)
    for kill, resumed_from in (("kill_after_update=3", "step_2"), ("kill_saving=step_4", "step_2")):
        out = tmp_path / kill.replace("=", "_")
        killed = run_train(tmp_path, RUN + ["--output_dir", str(out)], check=False,
                           launcher=[sys.executable, str(WITH_HOOKS), kill])
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not (out / "step_4").exists()
        if kill.startswith("kill_saving"):
            assert (out / ".step_4.tmp").is_dir()  # the interrupted write, never renamed into place
        result = run_train(tmp_path, RUN + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
        assert f"Resuming from {out / resumed_from}" in result.stderr
        weights = _weights(out)
        assert all(torch.equal(weights[k], reference[k]) for k in reference), kill
        steps = [r["step"] for r in read_log(out) if "rc_loss" in r]
        assert steps == [1, 2, 3, 4, 5, 6], steps
        assert not (out / ".step_4.tmp").exists()


def test_latest_falls_back_past_a_broken_checkpoint_of_this_run_only(tmp_path, caplog):
    from accelerate import PartialState

    PartialState()  # accelerate's logger needs it
    out = tmp_path / "out"
    run_train(tmp_path, RUN + ["--max_train_steps", "4", "--output_dir", str(out)])
    run_id = checkpointing.read_run_id(out)
    args = argparse.Namespace(resume_from_checkpoint="latest", output_dir=str(out))
    assert checkpointing.find_checkpoint(args.resume_from_checkpoint, args.output_dir, run_id) == out / "step_4"
    optimizer = out / "step_4" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a truncated newest checkpoint
    assert checkpointing.find_checkpoint(args.resume_from_checkpoint, args.output_dir, run_id) == out / "step_2"
    assert f"skipping {out / 'step_4'}: {optimizer} is truncated" in caplog.text
    assert checkpointing.find_checkpoint(args.resume_from_checkpoint, args.output_dir, "another-run") is None  # another run's checkpoints are never picked
    with pytest.raises(SystemExit, match="optimizer.bin is truncated"):
        checkpointing.find_checkpoint(str(out / "step_4"), out, None)


def test_nan_loss_stops_with_the_step_and_saves_no_nonfinite_weights(tmp_path):
    out = tmp_path / "out"
    result = run_train(tmp_path, RUN + ["--learning_rate", "1e30", "--eval_steps", "1", "--checkpointing_steps", "1",
                                        "--output_dir", str(out)], check=False)
    assert result.returncode != 0
    assert "non-finite loss or gradient" in result.stderr
    assert re.search(r"at update step \d+ \(epoch 0, batch \d+\)", result.stderr)
    assert "Traceback" not in result.stderr
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
    if (out / "best").exists():  # only a finite validation loss is "best"
        state = json.loads((out / "step_1" / "trainer_state.json").read_text())
        assert state["best_step"] == 1 and state["best_eval_loss"] < float("inf")
    saved = list(out.rglob("*.safetensors"))
    assert saved  # step_1, taken before the loss became NaN
    for path in saved:
        assert all(torch.isfinite(t).all() for t in _weights(path.parent).values()), path


def test_output_dir_is_refused_or_written_into_without_deleting(tmp_path):
    out = tmp_path / "work"
    run_train(tmp_path, RUN + ["--max_train_steps", "2", "--output_dir", str(out)])
    first_model = (out / "model.safetensors").read_bytes()
    first_run = checkpointing.read_run_id(out)

    refused = run_train(tmp_path, RUN + ["--output_dir", str(out)], check=False)
    assert refused.returncode != 0 and "is not empty" in refused.stderr and "--overwrite_output_dir" in refused.stderr
    assert (out / "model.safetensors").read_bytes() == first_model and checkpointing.read_run_id(out) == first_run

    (out / "my_notes.txt").write_text("not the script's")
    # `--output_dir . --overwrite_output_dir` from inside the folder: writes, deletes nothing
    subprocess.run([sys.executable, str(REPO / "examples" / "train.py"), *RUN, "--max_train_steps", "1",
                    "--checkpointing_steps", "1", "--output_dir", ".", "--overwrite_output_dir"], cwd=out, check=True,
                   capture_output=True, env=train_env(tmp_path), timeout=SUBPROCESS_HANG_S)
    assert (out / "my_notes.txt").read_text() == "not the script's"
    assert (out / "step_2" / "trainer_state.json").is_file()  # the first run's checkpoint is kept ...
    second_run = checkpointing.read_run_id(out)
    assert second_run != first_run
    args = argparse.Namespace(resume_from_checkpoint="latest", output_dir=str(out))
    assert checkpointing.find_checkpoint(args.resume_from_checkpoint, args.output_dir, second_run) == out / "step_1"  # ... but `latest` only picks this run's
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def train_env(tmp_path):
    from test_train import _env

    return _env(tmp_path)


class _Payload:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def test_no_code_runs_from_checkpoints_tokenizers_or_model_folders(tmp_path, tiny, monkeypatch):
    from accelerate import Accelerator

    from dior_cvae.training.data import train_tokenizer

    marker = tmp_path / "pwned"
    # 1. accelerate state as train.py saves it: a pickle in place of the RNG state or beside it is never executed
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.save_state(str(tmp_path / "ckpt"))
    torch.save(_Payload(marker), tmp_path / "ckpt" / "custom_checkpoint_0.pkl")  # the old lr-scheduler pickle
    with pytest.raises(RuntimeError, match="custom checkpoints"):  # refused: train.py registers no pickled object
        accelerator.load_state(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "custom_checkpoint_0.pkl").unlink()
    torch.save(_Payload(marker), tmp_path / "ckpt" / "random_states_0.pkl")
    accelerator.load_state(str(tmp_path / "ckpt"))  # torch.load(weights_only=True) refuses the payload
    assert not marker.exists()
    code = "".join(p.read_text() for p in (REPO / "examples/train.py", REPO / "examples/generate.py",
                                            *(REPO / "dior_cvae" / "training").glob("*.py")))
    assert "register_for_checkpointing" not in code and "weights_only=False" not in code

    # 2. a model folder whose tokenizer and model code were replaced: loaded without running either
    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    train_tokenizer(["hello there", "general kenobi"] * 5, 120).save_pretrained(folder)
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
    for name in ("modeling_dior.py", "configuration_dior.py", "tokenization_evil.py"):
        (folder / name).write_text(payload)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    args = generate.parse_args(["--model_name_or_path", str(folder), "--output", "o", "--input_file", "i"])
    loaded, tokenizer = generate.load_model_and_tokenizer(args, torch.device("cpu"))
    assert type(loaded).__module__ == "dior_cvae.modeling_dior"
    sources.load_tokenizer(str(folder))
    assert not marker.exists()


def test_push_to_hub_creates_the_repo_before_training_and_fails_early_offline(tmp_path):
    runner = tmp_path / "fake_hub_runner.py"
    runner.write_text(FAKE_HUB_RUNNER.replace(
        'calls.append({"create_repo": repo_id,',
        'calls.append({"trained": any(Path(a).joinpath("log_history.jsonl").exists() for a in sys.argv), '
        '"create_repo": repo_id,'))
    out = tmp_path / "out"
    run_train(tmp_path, RUN + ["--max_train_steps", "1", "--output_dir", str(out), "--push_to_hub",
                               "--hub_model_id", "someone/dior-tiny", "--hub_token", "hf_fake"],
              launcher=[sys.executable, str(runner)])
    calls = json.loads((tmp_path / "fake_hub" / "calls.json").read_text())
    assert calls[0]["create_repo"] == "someone/dior-tiny" and calls[0]["trained"] is False
    assert calls[-1]["upload_folder"] == "someone/dior-tiny"

    offline = tmp_path / "offline"  # the real HfApi under HF_HUB_OFFLINE=1
    failed = run_train(tmp_path, RUN + ["--output_dir", str(offline), "--push_to_hub", "--hub_model_id", "a/b"],
                       check=False)
    assert failed.returncode != 0 and "--push_to_hub: cannot create the Hub repository 'a/b'" in failed.stderr
    assert "Nothing was trained" in failed.stderr and not (offline / "log_history.jsonl").exists()


def test_every_transformers_schedule_works_and_its_state_is_json():
    from transformers import SchedulerType

    assert {s.value for s in SchedulerType} <= set(optimization.LR_SCHEDULES)
    model = torch.nn.Linear(2, 2)
    for name in optimization.LR_SCHEDULES:
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        kwargs = {"min_lr_rate": 0.1} if "min_lr" in name else {"num_decay_steps": 2} if name == "warmup_stable_decay" else None
        scheduler = optimization.create_lr_scheduler(name, optimizer, 2, 10, kwargs)
        state = json.loads(json.dumps(scheduler.state_dict()))  # trainer_state.json holds it as JSON
        scheduler.load_state_dict(state)


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--learning_rate", "5e-05"), ("--logging_steps", "50"), ("--output_dir", "outputs/dior-cvae"),
                          ("--lr_scheduler_type", "linear"), ("--trust_remote_code", "False")):
        assert flag in help_text and f"(default: {default})" in help_text, flag
