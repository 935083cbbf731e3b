"""End-to-end test of examples/generate.py on a tiny random Dior-CVAE (subprocess, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SUBPROCESS_HANG_S, tiny_config_kwargs

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "generate.py"
SAMPLE_DIR = REPO / "data" / "dailydialog_sample"

SENTENCES = [
    "Hello there, how are you today?",
    "I am fine, thanks. And you?",
    "What time does the movie start?",
    "Let's go to the park this afternoon.",
    "Could you pass me the salt, please?",
    "Sure, here you are.",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
    from dior_cvae.training.data import train_tokenizer

    root = tmp_path_factory.mktemp("generate_script")
    tokenizer = train_tokenizer(SENTENCES * 3, vocab_size=300, model_max_length=64)
    torch.manual_seed(0)
    config = DiorCVAEConfig(**tiny_config_kwargs(vocab_size=len(tokenizer), dropout=0.1))
    DiorCVAEForConditionalGeneration(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    if (SAMPLE_DIR / "test.txt.gz").is_file():
        data_args = ["--dataset_dir", str(SAMPLE_DIR), "--split", "test"]
    else:  # the shipped sample is not there: an equivalent jsonl
        rows = [{"context": SENTENCES[: i + 1], "response": SENTENCES[i + 1]} for i in range(5)]
        (root / "dialogs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        data_args = ["--input_file", str(root / "dialogs.jsonl")]
    (root / "data_args.json").write_text(json.dumps(data_args))
    return root


def run_script(workdir: Path, output: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1",
        HF_HOME=str(workdir / "hf_home"),  # remote-code module cache, kept out of the user's
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable, str(SCRIPT),
        "--model_name_or_path", str(workdir / "model"),
        "--output", str(output),
        "--device", "cpu",
        "--max_new_tokens", "8",
        *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SUBPROCESS_HANG_S, cwd=REPO)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_sampling_rows_seeds_and_score(workdir):
    data_args = json.loads((workdir / "data_args.json").read_text())
    common = [*data_args, "--num_samples", "3", "--max_samples", "4", "--batch_size", "3",
              "--num_inference_steps", "5", "--prior_guidance_scale", "0.5"]  # fmt: skip
    out_a, out_b, out_c = (workdir / f"sampling_{n}.jsonl" for n in "abc")

    proc = run_script(workdir, out_a, *common, "--seed", "0", "--score")
    rows = read_rows(out_a)
    assert len(rows) == 4
    for row in rows:
        assert isinstance(row["context"], list) and row["context"] and all(isinstance(t, str) for t in row["context"])
        assert isinstance(row["reference"], str) and row["reference"].strip()
        assert len(row["samples"]) == 3 and all(isinstance(s, str) for s in row["samples"])
        assert all(s == " ".join(s.split()) for s in row["samples"])  # whitespace-collapsed
    assert "wrote 4 rows, 12 samples" in proc.stderr and "tokens/s" in proc.stderr
    scores = json.loads(proc.stdout)
    assert scores["num_contexts"] == 4 and scores["num_samples"] == 12
    assert "sample_cosine" not in scores  # semantic scoring only with --semantic

    run_script(workdir, out_b, *common, "--seed", "0")
    assert out_b.read_bytes() == out_a.read_bytes(), "same seed gave different generations"
    run_script(workdir, out_c, *common, "--seed", "1")
    assert out_c.read_bytes() != out_a.read_bytes(), "different seeds gave identical generations"


def test_beam_preset_with_input_file(workdir):
    contexts = workdir / "contexts.jsonl"
    contexts.write_text(
        json.dumps({"context": SENTENCES[:3], "response": SENTENCES[3]}) + "\n"
        + json.dumps({"context": SENTENCES[4]}) + "\n"  # a single turn as a string, no reference
    )  # fmt: skip
    output = workdir / "beam.jsonl"
    proc = run_script(workdir, output, "--input_file", str(contexts), "--decoding", "beam", "--num_samples", "2")
    rows = read_rows(output)
    assert [len(r["samples"]) for r in rows] == [2, 2]
    assert rows[0]["context"] == SENTENCES[:3] and rows[0]["reference"] == SENTENCES[3]
    assert rows[1]["context"] == [SENTENCES[4]] and "reference" not in rows[1]
    assert "beam" in proc.stderr


def test_score_writes_the_latent_diagnostics_and_plot(workdir):
    if not (SAMPLE_DIR / "validation.txt.gz").is_file():
        pytest.skip("the shipped DailyDialog sample is not there")
    data_args = json.loads((workdir / "data_args.json").read_text())
    generations = workdir / "for_score.jsonl"
    run_script(workdir, generations, *data_args, "--max_samples", "4", "--num_inference_steps", "3")
    plot = workdir / "latents.png"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "score.py"), "--input", str(generations), "--no_semantic",
         "--latent_model", str(workdir / "model"), "--dataset_dir", str(SAMPLE_DIR), "--latent_samples", "16",
         "--latent_plot", str(plot)],
        env=env, capture_output=True, text=True, timeout=SUBPROCESS_HANG_S, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latent = json.loads(proc.stdout)["latent"]
    assert latent["num_examples"] == 16 and latent["prior_type"] == "diffusion"
    assert 0 <= latent["active_units_fraction"] <= 1 and latent["prior_posterior_norm_ratio"] > 0
    assert len(latent["kl_to_standard_per_layer"]) == 2
    assert 0 <= latent["mutual_information"] <= latent["mutual_information_max"] + 1e-3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    refused = subprocess.run([sys.executable, str(REPO / "examples" / "score.py"), "--input", str(generations),
                              "--no_semantic", "--latent_model", str(workdir / "model")],
                             env=env, capture_output=True, text=True, timeout=SUBPROCESS_HANG_S, cwd=REPO)
    assert refused.returncode != 0 and "--latent_model needs --dataset_dir" in refused.stderr


def test_posterior_latents_are_the_references_posterior_draws(workdir, capsys):
    """--latents posterior decodes with z ~ q(z | c, r) of each context's reference: k different draws per context,
    the posterior's own for that reference (a different reference gives other latents); without a reference, or
    with a prior setting, it stops with an error naming the problem."""
    import importlib.util

    from dior_cvae import DiorCVAEForConditionalGeneration
    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location("generate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = DiorCVAEForConditionalGeneration.from_pretrained(workdir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    examples = [{"context": SENTENCES[:2], "reference": SENTENCES[2]}, {"context": SENTENCES[3:4], "reference": SENTENCES[4]}]

    def draws(examples, seed):
        encoded = script.encode_examples(tokenizer, [{"context": e["context"], "response": e["reference"]} for e in examples],
                                         max_target_length=64, show_progress=False)
        width = max(len(e["input_ids"]) for e in encoded)
        input_ids = torch.full((2, width), tokenizer.pad_token_id)
        for row, e in enumerate(encoded):
            input_ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask = input_ids.ne(tokenizer.pad_token_id).long()
        with torch.no_grad():
            latents = script.posterior_latents(model, encoded, [0, 1], model.encode(input_ids, mask)[1], 3,
                                               {"latent_generator": torch.Generator().manual_seed(seed)})
            labels = torch.full((2, max(len(e["labels"]) for e in encoded)), -100)
            for row, e in enumerate(encoded):
                labels[row, : len(e["labels"])] = torch.tensor(e["labels"])
            posterior = model.posterior(model.encode(input_ids, mask)[1], labels)[1]
            # the same generator through the posterior of each row's own (context, reference), k rows each
            expected = model.posterior(model.encode(input_ids, mask)[1].repeat_interleave(3, 0),
                                       labels.repeat_interleave(3, 0), generator=torch.Generator().manual_seed(seed))[0]
        torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
        return latents, posterior

    latents, posterior = draws(examples, 0)
    assert latents.shape == (6, model.config.encoder_layers, model.config.latent_size)
    # the first latent layer's q(z_1 | c, r) does not depend on other draws: standardised by that Gaussian, the
    # 3 draws x 2 contexts x 8 dimensions are N(0, 1) (mean within 4 standard errors, spread within 0.6-1.4)
    residual = (latents[:, 0].view(2, 3, -1) - posterior.mean[:, None, 0]) / posterior.log_std[:, None, 0].exp()
    assert abs(residual.mean().item()) < 4 / residual.numel() ** 0.5, residual
    assert 0.6 < residual.std().item() < 1.4, residual
    assert not torch.allclose(latents[0], latents[1])  # k draws, not one reused
    torch.testing.assert_close(draws(examples, 0)[0], latents)  # the generator decides them
    swapped = [dict(examples[0], reference=SENTENCES[5]), examples[1]]
    assert not torch.allclose(draws(swapped, 0)[1].mean[0], posterior.mean[0])  # the reference decides the posterior

    output = workdir / "posterior.jsonl"
    data_args = json.loads((workdir / "data_args.json").read_text())
    run_script(workdir, output, *data_args, "--latents", "posterior", "--num_samples", "2", "--max_samples", "3")
    assert [len(r["samples"]) for r in read_rows(output)] == [2, 2, 2]
    contexts = workdir / "no_reference.jsonl"
    contexts.write_text(json.dumps({"context": SENTENCES[4], "reference": "ok"}) + "\n"
                        + json.dumps({"context": SENTENCES[4]}) + "\n")
    with pytest.raises(SystemExit, match="needs a reference response for every context; 1 have none .*row 1"):
        script.main(["--model_name_or_path", "no-such-model", "--output", str(workdir / "posterior_2.jsonl"),
                     "--device", "cpu", "--input_file", str(contexts), "--latents", "posterior"])  # before any load
    with pytest.raises(SystemExit):
        script.parse_args(["--model_name_or_path", "m", "--output", str(output), "--input_file", str(contexts),
                           "--latents", "posterior", "--prior_temperature", "0.5"])
    assert "--prior_temperature is a setting of the prior" in capsys.readouterr().err
