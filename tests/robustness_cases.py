"""The second table of bad inputs: data lost, silently wrong, unbounded, bare tracebacks, unclear errors.

`CASES` rows are (id, class, check): `check(ctx)` returns when the code behaves as it should and raises
`AssertionError` (or anything else) naming what went wrong. Classes: "lost" (data lost), "silent" (silently wrong),
"unbounded", "traceback" (bare traceback or a late failure), "unclear" (an error that names no flag / field / file).
`tests/test_robustness.py::test_round_two` runs every row; `python tests/record_robustness.py OUT.json` records
each row's outcome (results/robustness_before.json, results/robustness_after.json).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from conftest import tiny_config_kwargs  # noqa: E402
from test_train import REPO, SAMPLE, TINY, WITH_HOOKS, _env  # noqa: E402



def _load_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train, generate, score = (_load_script(name) for name in ("train", "generate", "score"))

ERRORS = (SystemExit, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
# a tiny run of train.py (in-process or as a subprocess): the refused cases stop before any training
QUICK = SAMPLE + TINY + ["--max_train_samples", "24", "--max_train_steps", "1", "--num_eval_generation_samples", "0",
                         "--num_sample_contexts", "0", "--max_eval_samples", "4"]


class Context:
    """What a case gets: a fresh folder, the tiny model, a trained tokenizer, and one shared trained folder."""

    shared: dict = {}

    def __init__(self, tmp: Path, tiny):
        self.tmp, self.tiny = tmp, tiny

    def tokenizer(self):
        if "tokenizer" not in self.shared:
            from dior_cvae.training.data import train_tokenizer

            texts = ["hello there , how are you ?", "fine , thanks . and you ?", "general kenobi !"] * 20
            self.shared["tokenizer"] = train_tokenizer(texts, 300)
        return self.shared["tokenizer"]

    def trained(self) -> Path:
        """A copy of one train.py output folder (2 updates, step_2 checkpoint), shared by the cases."""
        if "trained" not in self.shared:
            base = Path(self.shared.get("dir") or os.environ.get("ROBUSTNESS_SHARED_TMP") or self.tmp) / "shared-trained"
            shutil.rmtree(base, ignore_errors=True)
            base.mkdir(parents=True)
            result = subprocess.run([sys.executable, str(REPO / "examples" / "train.py"), *QUICK, "--max_train_steps",
                                     "2", "--checkpointing_steps", "2", "--output_dir", str(base / "out")],
                                    cwd=base, env=_env(base), capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            self.shared["trained"] = base / "out"
        copy = self.tmp / f"trained-{len(list(self.tmp.glob('trained-*')))}"
        shutil.copytree(self.shared["trained"], copy)
        return copy

    def saved_tiny(self, **overrides) -> Path:
        """The tiny model (vocabulary of the trained tokenizer) saved with that tokenizer."""
        from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

        tokenizer = self.tokenizer()
        torch.manual_seed(0)
        model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(vocab_size=len(tokenizer),
                                                                                     **overrides)))
        folder = self.tmp / f"model-{len(list(self.tmp.glob('model-*')))}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(call, *texts, quiet_ok=False):
    """`call()` must raise one of ERRORS whose message (with stderr) holds every text, and no traceback text."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            call()
    except ERRORS as exc:
        message = f"{exc} {err.getvalue()}"
    except Exception as exc:  # noqa: BLE001 - the outcome being measured
        raise AssertionError(f"bare {type(exc).__name__}: {str(exc)[:300]}") from None
    else:
        raise AssertionError("accepted without an error")
    missing = [t for t in texts if t not in message]
    assert not missing, f"error {message[:400]!r} does not name {missing}"
    assert "Traceback" not in message, message[:400]
    return message


def _train_main(*argv):
    return lambda: train.main(list(argv))


def _run_train_process(cwd: Path, *argv, **kwargs):
    return subprocess.Popen([sys.executable, str(REPO / "examples" / "train.py"), *argv], cwd=cwd, env=_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"context": ["hi there", "hello"], "response": "how are you ?"}] * 6


# ---------------------------------------------------------------------------------------------------------------
# data lost
# ---------------------------------------------------------------------------------------------------------------


def resume_latest_without_checkpoint(ctx):
    out = ctx.tmp / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "vocab.json").write_text("my own tokenizer")
    (out / "best").mkdir()
    (out / "best" / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my README")
    before = _snapshot(out)
    refused(_train_main(*QUICK, "--output_dir", str(out), "--resume_from_checkpoint", "latest"),
            "--resume_from_checkpoint", str(out))
    assert _snapshot(out) == before, "files changed"


def overwrite_user_files(ctx):
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "README.md").write_text("my README")
    (out / "model.safetensors").write_text("my model")
    before = _snapshot(out)
    refused(_train_main(*QUICK, "--output_dir", str(out), "--overwrite_output_dir"), "--overwrite_output_dir",
            "README.md")
    assert _snapshot(out) == before, "files changed"


def overwrite_repository_root(ctx):
    out = ctx.tmp / "repo"
    (out / ".git").mkdir(parents=True)
    (out / "README.md").write_text("# my project")
    (out / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    before = _snapshot(out)
    refused(_train_main(*QUICK, "--output_dir", str(out), "--overwrite_output_dir"), "--output_dir", "README.md")
    assert _snapshot(out) == before, "files changed"


def overwrite_user_log(ctx):
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "log_history.jsonl").write_text('{"my": "experiment log"}\n')
    (out / "training_args.json").write_text("{}")
    before = _snapshot(out)
    refused(_train_main(*QUICK, "--output_dir", str(out), "--overwrite_output_dir"), "log_history.jsonl")
    assert _snapshot(out) == before, "files changed"


def overwrite_user_tokenizer_folder(ctx):
    out = ctx.tmp / "out"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "merges.txt").write_text("my merges")
    with contextlib.suppress(*ERRORS):
        with contextlib.redirect_stderr(io.StringIO()):
            train.main([*QUICK, "--output_dir", str(out), "--overwrite_output_dir"])
    assert (out / "tokenizer" / "merges.txt").is_file(), "the user's tokenizer/ was deleted"
    assert (out / "tokenizer" / "merges.txt").read_text() == "my merges"


def overwrite_edited_readme_of_a_run(ctx):
    out = ctx.trained()
    (out / "README.md").write_text("my edited model card")
    refused(_train_main(*QUICK, "--output_dir", str(out), "--overwrite_output_dir"), "README.md",
            "--overwrite_output_dir")
    assert (out / "README.md").read_text() == "my edited model card"


def overwrite_keeps_run_files_policy(ctx):
    """--overwrite_output_dir over a previous run's folder: the run's files replaced, a user's file kept."""
    out = ctx.trained()
    (out / "my_notes.txt").write_text("mine")
    old_weights = (out / "model.safetensors").read_bytes()
    with contextlib.redirect_stderr(io.StringIO()):
        train.main([*QUICK, "--output_dir", str(out), "--overwrite_output_dir", "--seed", "7"])
    assert (out / "my_notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").read_bytes() != old_weights


def _hold_folder(ctx, out: Path):
    """Start train.py on `out`, wait until it has claimed the folder, stop it (SIGSTOP): it holds the folder."""
    first = _run_train_process(ctx.tmp, *QUICK, "--max_train_steps", "400", "--output_dir", str(out))
    for _ in range(1200):
        if (out / "run.json").exists() or first.poll() is not None:
            break
        time.sleep(0.25)
    assert first.poll() is None, f"the first run ended: {first.communicate()[1][-2000:]}"
    os.kill(first.pid, signal.SIGSTOP)
    return first


def _release(first):
    os.kill(first.pid, signal.SIGKILL)
    os.kill(first.pid, signal.SIGCONT)
    first.communicate()


def two_runs_overwrite(ctx):
    out = ctx.tmp / "out"
    first = _hold_folder(ctx, out)
    try:
        run_json = (out / "run.json").read_text()
        second = subprocess.run([sys.executable, str(REPO / "examples" / "train.py"), *QUICK, "--output_dir", str(out),
                                 "--overwrite_output_dir"], cwd=ctx.tmp, env=_env(ctx.tmp), capture_output=True,
                                text=True, timeout=600)
        assert second.returncode != 0, "the second run on the same folder ran"
        assert f"pid {first.pid}" in second.stderr, second.stderr[-1500:]
        assert "Traceback" not in second.stderr, second.stderr[-1500:]
        assert (out / "run.json").read_text() == run_json
    finally:
        _release(first)


def two_runs_resume(ctx):
    out = ctx.tmp / "out"
    first = _hold_folder(ctx, out)
    try:
        second = subprocess.run([sys.executable, str(REPO / "examples" / "train.py"), *QUICK, "--output_dir", str(out),
                                 "--resume_from_checkpoint", "latest"], cwd=ctx.tmp, env=_env(ctx.tmp),
                                capture_output=True, text=True, timeout=600)
        assert second.returncode != 0, "the second run on the same folder ran"
        assert f"pid {first.pid}" in second.stderr, second.stderr[-1500:]
    finally:
        _release(first)


def kill_during_final_merge(ctx):
    """SIGKILL after the first file of the final save moved into a folder holding a previous run's model: the folder
    is never loaded as a mix (generate.py refuses it until the save is completed) and the next train.py run on the
    folder completes the interrupted save first (all files new)."""
    out = ctx.trained()
    old = {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors", "tokenizer.json")}
    killed = subprocess.run([sys.executable, str(WITH_HOOKS), "kill_merging=1", str(REPO / "examples" / "train.py"),
                             *QUICK, "--output_dir", str(out), "--overwrite_output_dir", "--train_tokenizer_vocab_size",
                             "333"], cwd=ctx.tmp, env=_env(ctx.tmp), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, f"not killed during the final merge (rc {killed.returncode})"
    args = generate.parse_args(["--model_name_or_path", str(out), "--output", str(ctx.tmp / "g.jsonl"),
                                "--input_file", str(_jsonl(ctx.tmp / "in.jsonl", [{"context": ["hi"]}]))])
    refused(lambda: generate.load_model_and_tokenizer(args, torch.device("cpu")), "interrupted", str(out))
    refused(_train_main(*QUICK, "--output_dir", str(out)), "--output_dir")  # a refused run still completes the save
    new = {name: (out / name).read_bytes() for name in old}
    assert all(new[n] != old[n] for n in old), [n for n in old if new[n] == old[n]]


def _generate_main(ctx, *extra, model=None):
    model = model or ctx.saved_tiny()
    inputs = _jsonl(ctx.tmp / "in.jsonl", [{"context": ["hi there"], "reference": "hello"}])
    return lambda: generate.main(["--model_name_or_path", str(model), "--input_file", str(inputs), "--max_new_tokens",
                                  "3", "--num_inference_steps", "2", "--device", "cpu", *extra])


def generate_output_exists(ctx):
    target = ctx.tmp / "earlier.jsonl"
    target.write_text('{"context": ["earlier"], "samples": ["results"]}\n')
    refused(_generate_main(ctx, "--output", str(target)), "--output", str(target), "--overwrite")
    assert target.read_text().startswith('{"context": ["earlier"]')


def generate_output_is_dataset_split(ctx):
    data = ctx.tmp / "dd"
    shutil.copytree(REPO / "data" / "dailydialog_sample", data)
    before = (data / "test.txt.gz").read_bytes()
    model = ctx.saved_tiny()
    refused(lambda: generate.main(["--model_name_or_path", str(model), "--dataset_dir", str(data), "--max_samples", "2",
                                   "--max_new_tokens", "3", "--num_inference_steps", "2", "--device", "cpu",
                                   "--output", str(data / "test.txt.gz")]), "--output", "test.txt.gz")
    assert (data / "test.txt.gz").read_bytes() == before


def generate_output_is_model_weights(ctx):
    model = ctx.saved_tiny()
    before = (model / "model.safetensors").read_bytes()
    refused(_generate_main(ctx, "--output", str(model / "model.safetensors"), model=model), "--output",
            "model.safetensors")
    assert (model / "model.safetensors").read_bytes() == before


def generate_output_hard_link_to_input(ctx):
    model = ctx.saved_tiny()
    inputs = _jsonl(ctx.tmp / "in.jsonl", [{"context": ["hi there"], "reference": "hello"}])
    os.link(inputs, ctx.tmp / "link.jsonl")
    before = inputs.read_bytes()
    refused(lambda: generate.main(["--model_name_or_path", str(model), "--input_file", str(inputs), "--max_new_tokens",
                                   "3", "--num_inference_steps", "2", "--device", "cpu", "--output",
                                   str(ctx.tmp / "link.jsonl"), "--overwrite"]), "--output", "--input_file")
    assert inputs.read_bytes() == before


def generate_full_disk_keeps_old_file(ctx):
    target = ctx.tmp / "earlier.jsonl"
    target.write_text('{"context": ["earlier"], "samples": ["results"]}\n')
    real_dumps = generate.json.dumps
    calls = {"n": 0}

    def failing_dumps(obj, *a, **k):  # the second row hits a full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_dumps(obj, *a, **k)

    main = _generate_main(ctx, "--output", str(target), "--overwrite", "--num_samples", "1")
    inputs = _jsonl(ctx.tmp / "in.jsonl", [{"context": ["hi there"], "reference": "hello"}] * 3)
    assert inputs.exists()
    generate.json.dumps = failing_dumps
    try:
        with contextlib.suppress(OSError, SystemExit), contextlib.redirect_stderr(io.StringIO()):
            main()
    finally:
        generate.json.dumps = real_dumps
    assert calls["n"] >= 2, "never wrote"
    assert target.read_text() == '{"context": ["earlier"], "samples": ["results"]}\n', "the old file was truncated"
    assert not [p for p in ctx.tmp.iterdir() if ".tmp" in p.name], "a temporary file was left"


def _generations(ctx) -> Path:
    return _jsonl(ctx.tmp / "g.jsonl", [{"context": ["hi"], "reference": "hello there", "samples": ["hello", "hi"]}] * 3)


def score_output_is_input(ctx):
    path = _generations(ctx)
    before = path.read_bytes()
    refused(lambda: score.main(["--input", str(path), "--output", str(path), "--no_semantic"]), "--output", "--input")
    assert path.read_bytes() == before


def score_output_exists(ctx):
    path = _generations(ctx)
    (ctx.tmp / "scores.json").write_text("earlier scores")
    refused(lambda: score.main(["--input", str(path), "--output", str(ctx.tmp / "scores.json"), "--no_semantic"]),
            "--output", "scores.json", "--overwrite")
    assert (ctx.tmp / "scores.json").read_text() == "earlier scores"


def score_output_hard_link_to_input(ctx):
    path = _generations(ctx)
    os.link(path, ctx.tmp / "link.json")
    before = path.read_bytes()
    refused(lambda: score.main(["--input", str(path), "--output", str(ctx.tmp / "link.json"), "--no_semantic",
                                "--overwrite"]), "--output", "--input")
    assert path.read_bytes() == before


def generate_output_into_model_folder_config(ctx):
    model = ctx.saved_tiny()
    before = (model / "config.json").read_bytes()
    refused(_generate_main(ctx, "--output", str(model / "config.json"), model=model), "--output", "config.json")
    assert (model / "config.json").read_bytes() == before


def train_output_dir_is_a_file_kept(ctx):
    target = ctx.tmp / "notes.txt"
    target.write_text("mine")
    refused(_train_main(*QUICK, "--output_dir", str(target), "--overwrite_output_dir"), "--output_dir", "notes.txt")
    assert target.read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# silently wrong
# ---------------------------------------------------------------------------------------------------------------


def _encode(ctx, example):
    from dior_cvae.training.data import encode_example

    return encode_example(ctx.tokenizer(), example, 64, 32)


def literal_eos_in_context(ctx):
    tokenizer = ctx.tokenizer()
    ids = _encode(ctx, {"context": ["I typed </s> here", "ok"], "response": "fine"})["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 2, f"{ids.count(tokenizer.eos_token_id)} eos for 2 turns"


def literal_pad_in_response(ctx):
    tokenizer = ctx.tokenizer()
    labels = _encode(ctx, {"context": ["hi"], "response": "a <pad> b"})["labels"]
    assert tokenizer.pad_token_id not in labels, labels


def literal_eos_in_response(ctx):
    tokenizer = ctx.tokenizer()
    labels = _encode(ctx, {"context": ["hi"], "response": "stop </s> here"})["labels"]
    assert labels.count(tokenizer.eos_token_id) == 1 and labels[-1] == tokenizer.eos_token_id, labels


def literal_bos_in_persona(ctx):
    tokenizer = ctx.tokenizer()
    ids = _encode(ctx, {"context": ["hi"], "persona": ["i like <s> tags"], "response": "x"})["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1, ids


def literal_mask_in_context(ctx):
    tokenizer = ctx.tokenizer()
    ids = _encode(ctx, {"context": ["fill <mask> here"], "response": "x"})["input_ids"]
    assert tokenizer.mask_token_id not in ids, ids


def _pipeline(ctx):
    from dior_cvae import DiorCVAEForConditionalGeneration
    from dior_cvae.pipeline_dior import DialogGenerationPipeline

    folder = ctx.saved_tiny()
    model = DiorCVAEForConditionalGeneration.from_pretrained(folder).eval()
    pipe = DialogGenerationPipeline(model=model, tokenizer=ctx.tokenizer())
    seen = []
    original = model.generate

    def spy(**kwargs):
        seen.append(kwargs["input_ids"])
        return original(**kwargs)

    model.generate = spy
    return pipe, seen


def _contexts(ctx, seen):
    return [ctx.tokenizer().decode(ids[0], skip_special_tokens=False) for ids in seen]


def pipeline_literal_eos(ctx):
    pipe, seen = _pipeline(ctx)
    pipe(["hello </s> world", "ok"], max_new_tokens=2, num_inference_steps=2)
    ids = seen[0][0].tolist()
    assert ids.count(ctx.tokenizer().eos_token_id) == 2, _contexts(ctx, seen)


def pipeline_message_dict(ctx):
    pipe, seen = _pipeline(ctx)
    out = pipe({"role": "user", "content": "hi there"}, max_new_tokens=2, num_inference_steps=2)
    assert "role" not in _contexts(ctx, seen)[0] and "hi there" in _contexts(ctx, seen)[0], _contexts(ctx, seen)
    assert isinstance(out, list) and all("generated_text" in r for r in out), out


def pipeline_system_message(ctx):
    pipe, seen = _pipeline(ctx)
    messages = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi there"}]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            pipe(messages, max_new_tokens=2, num_inference_steps=2)
    except ValueError as exc:
        assert "system" in str(exc), exc
        return
    assert "be terse" not in _contexts(ctx, seen)[0], f"the system message became a turn: {_contexts(ctx, seen)}"


def pipeline_batch_of_message_lists(ctx):
    pipe, seen = _pipeline(ctx)
    batch = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
             [{"role": "user", "content": "how are you"}]]
    out = pipe(batch, max_new_tokens=2, num_inference_steps=2)
    assert len(out) == 2 and all(isinstance(r, list) for r in out), out
    assert len(seen) == 2 and "hello" in _contexts(ctx, seen)[0], _contexts(ctx, seen)


def pipeline_unknown_role(ctx):
    pipe, _ = _pipeline(ctx)
    refused(lambda: pipe([{"role": "tool", "content": "42"}], max_new_tokens=2), "role", "tool")


def _load_raw_splits(args):
    from dior_cvae.training.sources import load_raw_splits

    return load_raw_splits(args)


def empty_validation_split_dailydialog(ctx):
    data = ctx.tmp / "dd"
    shutil.copytree(REPO / "data" / "dailydialog_sample", data)
    (data / "validation.txt.gz").write_bytes(gzip.compress(b""))
    args = train.parse_args(["--dataset_dir", str(data), "--train_tokenizer_vocab_size", "300"])
    refused(lambda: _load_raw_splits(args), "validation")


def tampered_prior_type(ctx):
    from dior_cvae import DiorCVAEForConditionalGeneration

    folder = ctx.saved_tiny()
    config = json.loads((folder / "config.json").read_text())
    config["prior_type"] = "gaussian"
    (folder / "config.json").write_text(json.dumps(config))
    refused(lambda: DiorCVAEForConditionalGeneration.from_pretrained(folder), "prior_type")


def tampered_infusion_switch(ctx):
    from dior_cvae import DiorCVAEForConditionalGeneration

    folder = ctx.saved_tiny()
    config = json.loads((folder / "config.json").read_text())
    config["self_attention_infusion"] = False
    (folder / "config.json").write_text(json.dumps(config))
    refused(lambda: DiorCVAEForConditionalGeneration.from_pretrained(folder), "self_attention_infusion")


def nan_weights(ctx):
    from safetensors.torch import load_file, save_file

    from dior_cvae import DiorCVAEForConditionalGeneration

    folder = ctx.saved_tiny()
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[len(weights) // 2]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    refused(lambda: DiorCVAEForConditionalGeneration.from_pretrained(folder), "non-finite", name)


def _resume(ctx, *extra):
    out = ctx.trained()
    refused(_train_main(*QUICK, "--max_train_steps", "2", "--output_dir", str(out), "--resume_from_checkpoint",
                        "latest", *extra), *[e for e in extra if e.startswith("--")][:1])


def resume_other_dataset(ctx):
    _resume(ctx, "--max_train_samples", "16")


def resume_other_batch_size(ctx):
    _resume(ctx, "--per_device_train_batch_size", "4")


def resume_other_config(ctx):
    _resume(ctx, "--kl_free_bits", "0.5")


def resume_other_schedule(ctx):
    _resume(ctx, "--lr_scheduler_type", "constant")


def resume_other_learning_rate(ctx):
    _resume(ctx, "--learning_rate", "0.01")


def _model_call(**kwargs):
    def run(ctx):
        ids = torch.tensor([[0, 5, 6, 7, 2]])
        labels = kwargs.pop("labels", torch.tensor([[0, 8, 9, 2]]))
        ctx.tiny(input_ids=ids, labels=labels, **kwargs)
    return run


def forward_all_ignored_labels(ctx):
    refused(lambda: _model_call(labels=torch.full((1, 4), -100))(ctx), "labels")


def forward_nan_kl_weight(ctx):
    refused(lambda: _model_call(kl_weight=float("nan"))(ctx), "kl_weight", "nan")


def forward_negative_kl_weight(ctx):
    refused(lambda: _model_call(kl_weight=-1.0)(ctx), "kl_weight", "-1")


def forward_nan_latents(ctx):
    refused(lambda: ctx.tiny(input_ids=torch.tensor([[0, 5, 6, 2]]), decoder_input_ids=torch.tensor([[2, 0]]),
                             latents=torch.full((1, 2, 8), float("nan"))), "latents", "NaN")


def _gen(ctx, **kwargs):
    return lambda: ctx.tiny.generate(input_ids=torch.tensor([[0, 5, 6, 7, 2]]), max_new_tokens=3, **kwargs)


def generate_guidance_bool(ctx):
    refused(_gen(ctx, prior_guidance_scale=True), "prior_guidance_scale", "True")


def generate_steps_float(ctx):
    refused(_gen(ctx, num_inference_steps=2.5), "num_inference_steps", "2.5")


def generate_temperature_bool(ctx):
    refused(_gen(ctx, prior_temperature=True), "prior_temperature", "True")


def _generate_args(*extra):
    return lambda ctx: refused(lambda: generate.parse_args(["--model_name_or_path", "m", "--output", "o",
                                                            "--input_file", "i", *extra]), extra[0], extra[1])


def config_guidance_bool(ctx):
    from dior_cvae import DiorCVAEConfig

    refused(lambda: DiorCVAEConfig(**tiny_config_kwargs(prior_guidance_scale=True)), "prior_guidance_scale")


def train_empty_turn_separator(ctx):
    refused(lambda: train.parse_args(QUICK + ["--turn_separator", ""]), "--turn_separator")


def generate_empty_turn_separator(ctx):
    _generate_args("--turn_separator", "")(ctx)


def jsonl_special_token_in_training_data(ctx):
    """A training file whose response holds a literal </s>: the labels keep one EOS, at the end."""
    from dior_cvae.training.data import encode_examples, load_jsonl, parse_record

    path = _jsonl(ctx.tmp / "t.jsonl", [{"context": ["hi"], "response": "a </s> b <pad>"}])
    examples, _ = load_jsonl(path, parse=parse_record)
    encoded = encode_examples(ctx.tokenizer(), examples, 64, 32, show_progress=False)
    labels = encoded[0]["labels"]
    assert labels.count(ctx.tokenizer().eos_token_id) == 1 and ctx.tokenizer().pad_token_id not in labels, labels


def generate_script_context_with_eos(ctx):
    """generate.py's input: a context turn holding a literal </s> stays one turn."""
    from dior_cvae.training.data import encode_examples

    ids = encode_examples(ctx.tokenizer(), [{"context": ["a </s> b"]}], 64, 32, show_progress=False)[0]["input_ids"]
    assert ids.count(ctx.tokenizer().eos_token_id) == 1, ids


# ---------------------------------------------------------------------------------------------------------------
# unbounded
# ---------------------------------------------------------------------------------------------------------------


def generate_steps_huge(ctx):
    refused(_gen(ctx, num_inference_steps=10**7), "num_inference_steps", "10000000")


def config_steps_huge(ctx):
    from dior_cvae import DiorCVAEConfig

    refused(lambda: DiorCVAEConfig(**tiny_config_kwargs(num_inference_steps=10**9)), "num_inference_steps")


def config_json_steps_huge(ctx):
    from dior_cvae import DiorCVAEForConditionalGeneration

    folder = ctx.saved_tiny()
    config = json.loads((folder / "config.json").read_text())
    config["num_inference_steps"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    refused(lambda: DiorCVAEForConditionalGeneration.from_pretrained(folder), "num_inference_steps")


def generate_script_steps_huge(ctx):
    _generate_args("--num_inference_steps", "10000000")(ctx)


def train_eval_steps_huge_generation(ctx):
    refused(lambda: train.parse_args(QUICK + ["--eval_samples_per_context", "100000000"]), "--eval_samples_per_context")


def generate_num_samples_huge(ctx):
    _generate_args("--num_samples", "100000000")(ctx)


# ---------------------------------------------------------------------------------------------------------------
# bare tracebacks, late failures
# ---------------------------------------------------------------------------------------------------------------


def output_dir_root(ctx):
    refused(lambda: train.parse_args(QUICK + ["--output_dir", "/", "--overwrite_output_dir"]), "--output_dir", "/")


def train_seed_negative(ctx):
    refused(lambda: train.parse_args(QUICK + ["--seed", "-1"]), "--seed", "-1")


def train_pad_multiple_negative(ctx):
    refused(lambda: train.parse_args(QUICK + ["--pad_to_multiple_of", "-3"]), "--pad_to_multiple_of", "-3")


def train_compile_backend_bogus(ctx):
    refused(lambda: train.parse_args(QUICK + ["--torch_compile", "--torch_compile_backend", "nope",
                                              "--torch_compile_mode", "default"]), "--torch_compile_backend", "nope")


def train_source_length_too_long(ctx):
    refused(lambda: train.parse_args(QUICK + ["--max_source_length", "100000"]), "--max_source_length", "100000")


def train_target_length_over_positions(ctx):
    refused(_train_main(*QUICK, "--max_target_length", "1000", "--output_dir", str(ctx.tmp / "o")),
            "--max_target_length", "max_position_embeddings")


def train_num_proc_zero(ctx):
    refused(lambda: train.parse_args(QUICK + ["--num_proc", "0"]), "--num_proc", "0")


def generate_output_is_folder(ctx):
    (ctx.tmp / "folder").mkdir()
    refused(lambda: generate.parse_args(["--model_name_or_path", "m", "--input_file", "i", "--output",
                                         str(ctx.tmp / "folder")]), "--output", "folder")


def generate_seed_negative(ctx):
    _generate_args("--seed", "-1")(ctx)


def checkpoint_full_disk(ctx):
    class Full:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def unwrap_model(self, model):
            return model

        def save_state(self, path):
            raise RuntimeError("basic_ios::clear: iostream error")

    folder = ctx.tmp / "out" / "step_1"
    folder.parent.mkdir()
    refused(lambda: train.save_checkpoint(Full(), ctx.tiny, ctx.tokenizer(), folder, {}), "step_1", "disk")
    assert not folder.exists() and not list(folder.parent.glob(".step_1*")), list(folder.parent.iterdir())


def score_gz_input(ctx):
    path = ctx.tmp / "g.jsonl.gz"
    path.write_bytes(gzip.compress(_generations(ctx).read_bytes()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        score.main(["--input", str(path), "--no_semantic"])
    assert json.loads(out.getvalue())["num_samples"] == 6, out.getvalue()[:300]


def zero_byte_safetensors(ctx):
    from dior_cvae import DiorCVAEForConditionalGeneration

    folder = ctx.saved_tiny()
    (folder / "model.safetensors").write_bytes(b"")
    refused(lambda: DiorCVAEForConditionalGeneration.from_pretrained(folder), "model.safetensors")


def generate_zero_byte_safetensors(ctx):
    folder = ctx.saved_tiny()
    (folder / "model.safetensors").write_bytes(b"")
    refused(_generate_main(ctx, "--output", str(ctx.tmp / "g.jsonl"), model=folder), "model.safetensors")


def config_dropout_out_of_range(ctx):
    from dior_cvae import DiorCVAEConfig

    refused(lambda: DiorCVAEConfig(**tiny_config_kwargs(dropout=1.5)), "dropout", "1.5")


def config_heads_do_not_divide(ctx):
    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

    refused(lambda: DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(d_model=30))),
            "d_model", "encoder_attention_heads")


def config_vocab_zero(ctx):
    from dior_cvae import DiorCVAEConfig

    refused(lambda: DiorCVAEConfig(**tiny_config_kwargs(vocab_size=0)), "vocab_size")


def config_overrides_bad_field(ctx):
    refused(_train_main(*QUICK, "--d_model", "30", "--encoder_attention_heads", "4", "--output_dir",
                        str(ctx.tmp / "o")), "d_model")


# ---------------------------------------------------------------------------------------------------------------
# unclear errors
# ---------------------------------------------------------------------------------------------------------------


def empty_csv_validation(ctx):
    (ctx.tmp / "t.csv").write_text("context,response\nhi,hello\nhow are you,fine\n")
    (ctx.tmp / "v.csv").write_text("context,response\n")
    args = train.parse_args(["--train_file", str(ctx.tmp / "t.csv"), "--validation_file", str(ctx.tmp / "v.csv"),
                             "--tokenizer_name", "x"])
    refused(lambda: _load_raw_splits(args), "--validation_file", "v.csv")


def empty_json_train(ctx):
    (ctx.tmp / "t.json").write_text("[]")
    args = train.parse_args(["--train_file", str(ctx.tmp / "t.json"), "--tokenizer_name", "x"])
    refused(lambda: _load_raw_splits(args), "--train_file", "t.json")


def generate_top_p_two(ctx):
    _generate_args("--top_p", "2")(ctx)


def generate_top_p_zero(ctx):
    _generate_args("--top_p", "0")(ctx)


def generate_temperature_zero(ctx):
    _generate_args("--temperature", "0")(ctx)


def generate_top_k_negative(ctx):
    _generate_args("--top_k", "-1")(ctx)


def generate_repetition_penalty_zero(ctx):
    _generate_args("--repetition_penalty", "0")(ctx)


def generate_no_repeat_negative(ctx):
    _generate_args("--no_repeat_ngram_size", "-1")(ctx)


def score_min_fraction_two(ctx):
    refused(lambda: score.main(["--input", str(_generations(ctx)), "--multiref_min_fraction", "2", "--no_semantic"]),
            "--multiref_min_fraction", "2")


def score_latent_samples_zero(ctx):
    refused(lambda: score.main(["--input", str(_generations(ctx)), "--latent_samples", "0", "--no_semantic"]),
            "--latent_samples", "0")


def score_missing_input(ctx):
    refused(lambda: score.main(["--input", str(ctx.tmp / "nope.jsonl"), "--no_semantic"]), "--input", "nope.jsonl")


def generate_missing_input(ctx):
    refused(lambda: generate.main(["--model_name_or_path", "m", "--output", "o", "--input_file",
                                   str(ctx.tmp / "nope.jsonl")]), "--input_file", "nope.jsonl")


def generate_missing_model_folder(ctx):
    refused(lambda: generate.parse_args(["--model_name_or_path", "./no-such-model", "--output", "o", "--input_file",
                                         "i"]), "--model_name_or_path", "no-such-model")


def generate_max_source_length_one(ctx):
    _generate_args("--max_source_length", "2")(ctx)


def train_lr_scheduler_kwargs_bad_key(ctx):
    refused(_train_main(*QUICK, "--lr_scheduler_kwargs", '{"bogus": 1}', "--output_dir", str(ctx.tmp / "o")),
            "--lr_scheduler_kwargs")


def train_config_override_unknown(ctx):
    refused(_train_main(*QUICK, "--no_such_field", "1", "--output_dir", str(ctx.tmp / "o")), "no_such_field")


def train_dataset_dir_without_train(ctx):
    (ctx.tmp / "dd").mkdir()
    refused(_train_main("--dataset_dir", str(ctx.tmp / "dd"), "--train_tokenizer_vocab_size", "300", "--output_dir",
                        str(ctx.tmp / "o")), "train")


def train_report_to_unknown(ctx):
    refused(lambda: train.parse_args(QUICK + ["--with_tracking", "--report_to", "nope"]), "--report_to", "nope")


def generate_dtype_on_cpu_half(ctx):
    """--dtype float16 on the CPU works or says why; the model is the tiny saved one."""
    refused(lambda: generate.parse_args(["--model_name_or_path", "m", "--output", "o", "--input_file", "i", "--device",
                                         "nope"]), "--device", "nope")


def resume_missing_folder(ctx):
    refused(lambda: train.parse_args(QUICK + ["--resume_from_checkpoint", str(ctx.tmp / "step_9")]),
            "--resume_from_checkpoint", "step_9")


CASES = [
    # data lost
    ("train resume latest without a checkpoint keeps user files", "lost", resume_latest_without_checkpoint),
    ("train --overwrite_output_dir over user files", "lost", overwrite_user_files),
    ("train --overwrite_output_dir on a repository root", "lost", overwrite_repository_root),
    ("train --overwrite_output_dir over a user's log_history.jsonl", "lost", overwrite_user_log),
    ("train --overwrite_output_dir keeps a user's tokenizer/", "lost", overwrite_user_tokenizer_folder),
    ("train --overwrite_output_dir over a run's README the user edited", "lost", overwrite_edited_readme_of_a_run),
    ("train --overwrite_output_dir replaces a run's files, keeps the user's", "lost", overwrite_keeps_run_files_policy),
    ("two train.py on one folder (--overwrite_output_dir)", "lost", two_runs_overwrite),
    ("two train.py on one folder (--resume_from_checkpoint latest)", "lost", two_runs_resume),
    ("SIGKILL during the final merge", "lost", kill_during_final_merge),
    ("generate --output an earlier results file", "lost", generate_output_exists),
    ("generate --output the dataset's split", "lost", generate_output_is_dataset_split),
    ("generate --output the model's weights", "lost", generate_output_is_model_weights),
    ("generate --output the model's config", "lost", generate_output_into_model_folder_config),
    ("generate --output a hard link to --input_file", "lost", generate_output_hard_link_to_input),
    ("generate full disk keeps the old file", "lost", generate_full_disk_keeps_old_file),
    ("score --output is --input", "lost", score_output_is_input),
    ("score --output an existing file", "lost", score_output_exists),
    ("score --output a hard link to --input", "lost", score_output_hard_link_to_input),
    ("train --output_dir a file", "lost", train_output_dir_is_a_file_kept),
    # silently wrong
    ("literal </s> in a context turn", "silent", literal_eos_in_context),
    ("literal <pad> in a response", "silent", literal_pad_in_response),
    ("literal </s> in a response", "silent", literal_eos_in_response),
    ("literal <s> in a persona", "silent", literal_bos_in_persona),
    ("literal <mask> in a context", "silent", literal_mask_in_context),
    ("training file with special tokens", "silent", jsonl_special_token_in_training_data),
    ("generate.py context with a literal </s>", "silent", generate_script_context_with_eos),
    ("pipeline literal </s>", "silent", pipeline_literal_eos),
    ("pipeline one message dict", "silent", pipeline_message_dict),
    ("pipeline system message", "silent", pipeline_system_message),
    ("pipeline batch of message lists", "silent", pipeline_batch_of_message_lists),
    ("pipeline unknown role", "silent", pipeline_unknown_role),
    ("empty DailyDialog validation split", "silent", empty_validation_split_dailydialog),
    ("config.json prior_type over diffusion weights", "silent", tampered_prior_type),
    ("config.json infusion switched off", "silent", tampered_infusion_switch),
    ("NaN weights in model.safetensors", "silent", nan_weights),
    ("resume with another dataset", "silent", resume_other_dataset),
    ("resume with another batch size", "silent", resume_other_batch_size),
    ("resume with a same-shape config override", "silent", resume_other_config),
    ("resume with another lr schedule", "silent", resume_other_schedule),
    ("resume with another learning rate", "silent", resume_other_learning_rate),
    ("forward labels all -100", "silent", forward_all_ignored_labels),
    ("forward kl_weight nan", "silent", forward_nan_kl_weight),
    ("forward kl_weight negative", "silent", forward_negative_kl_weight),
    ("forward NaN latents", "silent", forward_nan_latents),
    ("generate() prior_guidance_scale=True", "silent", generate_guidance_bool),
    ("generate() num_inference_steps=2.5", "silent", generate_steps_float),
    ("generate() prior_temperature=True", "silent", generate_temperature_bool),
    ("config prior_guidance_scale=True", "silent", config_guidance_bool),
    ("train --turn_separator ''", "silent", train_empty_turn_separator),
    ("generate --turn_separator ''", "silent", generate_empty_turn_separator),
    ("generate --top_p 2", "silent", generate_top_p_two),
    # unbounded
    ("generate() num_inference_steps 10**7", "unbounded", generate_steps_huge),
    ("config num_inference_steps 10**9", "unbounded", config_steps_huge),
    ("config.json num_inference_steps 10**9", "unbounded", config_json_steps_huge),
    ("generate --num_inference_steps 10**7", "unbounded", generate_script_steps_huge),
    ("train --eval_samples_per_context 10**8", "unbounded", train_eval_steps_huge_generation),
    ("generate --num_samples 10**8", "unbounded", generate_num_samples_huge),
    # bare tracebacks and late failures
    ("train --output_dir / --overwrite_output_dir", "traceback", output_dir_root),
    ("train --seed -1", "traceback", train_seed_negative),
    ("train --pad_to_multiple_of -3", "traceback", train_pad_multiple_negative),
    ("train --torch_compile_backend nope", "traceback", train_compile_backend_bogus),
    ("train --max_source_length 100000", "traceback", train_source_length_too_long),
    ("train --max_target_length over the positions", "traceback", train_target_length_over_positions),
    ("train --num_proc 0", "traceback", train_num_proc_zero),
    ("generate --output a folder", "traceback", generate_output_is_folder),
    ("generate --seed -1", "traceback", generate_seed_negative),
    ("checkpoint on a full disk", "traceback", checkpoint_full_disk),
    ("score .jsonl.gz input", "traceback", score_gz_input),
    ("config d_model not divisible by heads", "traceback", config_heads_do_not_divide),
    ("train --config_overrides d_model=30 with 4 heads", "traceback", config_overrides_bad_field),
    # unclear errors
    ("empty CSV validation split", "unclear", empty_csv_validation),
    ("empty JSON train split", "unclear", empty_json_train),
    ("0-byte model.safetensors", "unclear", zero_byte_safetensors),
    ("generate 0-byte model.safetensors", "unclear", generate_zero_byte_safetensors),
    ("config dropout 1.5", "unclear", config_dropout_out_of_range),
    ("config vocab_size 0", "unclear", config_vocab_zero),
    ("generate --top_p 0", "unclear", generate_top_p_zero),
    ("generate --temperature 0", "unclear", generate_temperature_zero),
    ("generate --top_k -1", "unclear", generate_top_k_negative),
    ("generate --repetition_penalty 0", "unclear", generate_repetition_penalty_zero),
    ("generate --no_repeat_ngram_size -1", "unclear", generate_no_repeat_negative),
    ("generate --max_source_length 2", "unclear", generate_max_source_length_one),
    ("generate --device nope", "unclear", generate_dtype_on_cpu_half),
    ("generate missing --input_file", "unclear", generate_missing_input),
    ("generate missing --model_name_or_path folder", "unclear", generate_missing_model_folder),
    ("score --multiref_min_fraction 2", "unclear", score_min_fraction_two),
    ("score --latent_samples 0", "unclear", score_latent_samples_zero),
    ("score missing --input", "unclear", score_missing_input),
    ("train --lr_scheduler_kwargs bogus key", "unclear", train_lr_scheduler_kwargs_bad_key),
    ("train --config_overrides unknown field", "unclear", train_config_override_unknown),
    ("train --dataset_dir without a train file", "unclear", train_dataset_dir_without_train),
    ("train --report_to nope", "unclear", train_report_to_unknown),
    ("train --resume_from_checkpoint missing folder", "unclear", resume_missing_folder),
]
