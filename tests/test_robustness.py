"""Issue #14: bad inputs fail with an error that names the problem; nothing is lost, nothing from data is executed.

- `test_bad_input` is the table (`BAD_INPUTS`): each row runs one bad input in-process and asserts the error names
  the flag / argument / file:line / value, or checks the documented behaviour.
- kill-and-resume, NaN guard, output folder, Hub push and no-code-execution tests run train.py as a subprocess
  (tiny model, a few updates) where they must.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_kwargs
from test_train import FAKE_HUB_RUNNER, REPO, SAMPLE, TINY, read_log, run_train

from dior_cvae.data import DataFormatError, load_dailydialog_dir, load_jsonl


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
    train.load_raw_splits(args)


def _state_problem(mutate):
    def run(model, tmp):
        folder = tmp / "step_2"
        (folder / "pretrained").mkdir(parents=True)
        _write(folder / "model.safetensors", b"0123456789")
        files = {"model.safetensors": {"size": 10, "sha256": train._sha256(folder / "model.safetensors")}}
        state = {"completed_steps": 2, "epoch": 0, "batches_in_epoch": 2, "lr_scheduler": {}, "files": files}
        (folder / "trainer_state.json").write_text(json.dumps(state))
        mutate(folder)
        return train.checkpoint_problem(folder) or "intact"
    return run


def _non_empty_output_dir(model, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "model.safetensors").write_text("the first run's model")
    args = train.parse_args(TRAIN_ARGS + ["--output_dir", str(tmp / "out")])
    train.prepare_output_dir(args, FakeAccelerator())


def _truncated_model_for_generate(model, tmp):
    from dior_cvae.data import train_tokenizer

    model.save_pretrained(tmp / "m")
    train_tokenizer(["hello there", "general kenobi"] * 5, 120).save_pretrained(tmp / "m")
    weights = tmp / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = generate.parse_args(["--model_name_or_path", str(tmp / "m"), "--output", "o", "--input_file", "i"])
    generate.load_model_and_tokenizer(args, torch.device("cpu"))


def _score_truncated_gz(model, tmp):
    data = gzip.compress(b'{"context": "a", "reference": "b", "samples": ["c"]}\n' * 500)
    score.main(["--input", str(_write(tmp / "g.jsonl.gz", data[:200])), "--no_semantic"])


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
    ("generate truncated safetensors", _truncated_model_for_generate, ["cannot load", "/m:"]),
    ("score truncated gz", _score_truncated_gz, ["--input", "g.jsonl.gz"]),
    # model.generate()
    ("generate() num_inference_steps 0", _generate(num_inference_steps=0), ["`num_inference_steps`", "0"]),
    ("generate() num_inference_steps > T", _generate(num_inference_steps=21), ["`num_inference_steps` (21)", "20"]),
    ("generate() guidance nan", _generate(prior_guidance_scale=float("nan")), ["`prior_guidance_scale`", "nan"]),
    ("generate() guidance negative", _generate(prior_guidance_scale=-0.5), ["`prior_guidance_scale`", "-0.5"]),
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


def test_table_has_at_least_30_bad_inputs():
    assert len(BAD_INPUTS) >= 30
