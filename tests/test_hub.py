"""HF-ecosystem integration: the dialog pipeline shipped with the remote code, the model card, Hub pushes (mocked)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config_kwargs

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
from dior_cvae.data import train_tokenizer

TURNS = ["Hi , how are you ?", "Fine , thanks . And you ?", "I am good ."]

PIPELINE_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    sys.meta_path.insert(0, type("Block", (), {"find_spec": staticmethod(lambda name, path=None, target=None: (
        (_ for _ in ()).throw(ImportError(name)) if name.split(".")[0] == "dior_cvae" else None))})())
    import torch
    from transformers import pipeline
    chat = pipeline("dialog-generation", model=sys.argv[1], trust_remote_code=True)
    assert type(chat).__module__.startswith("transformers_modules"), type(chat).__module__
    torch.manual_seed(0)
    one = chat(["Hi , how are you ?", "Fine , thanks . And you ?"], num_return_sequences=3, max_new_tokens=6,
               min_new_tokens=3)
    batch = chat([["Hi , how are you ?"], "I am good ."], max_new_tokens=4)
    json.dump({"one": one, "batch": batch, "task": pipeline(model=sys.argv[1], trust_remote_code=True).task},
              open(sys.argv[2], "w"))
    """
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model + trained tokenizer, saved the ordinary way (model.save_pretrained + tokenizer.save_pretrained)."""
    folder = tmp_path_factory.mktemp("dior") / "model"
    tokenizer = train_tokenizer(TURNS * 10, vocab_size=300)
    torch.manual_seed(0)
    model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))
    model.generation_config.update(do_sample=True, top_k=50)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval(), tokenizer


def test_saved_folder_names_the_pipeline_and_ships_its_code(saved):
    folder, _, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == {"dialog-generation": {
        "impl": "pipeline_dior.DialogGenerationPipeline", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}}
    assert {"pipeline_dior.py", "modelcard_dior.py", "README.md"} <= set(os.listdir(folder))


def test_pipeline_from_a_saved_folder_in_a_fresh_process(saved, tmp_path):
    folder, model, tokenizer = saved
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-I", "-c", PIPELINE_IN_FRESH_PROCESS, str(folder), str(tmp_path / "o")],
                            cwd="/", env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "o").read_text())
    assert out["task"] == "dialog-generation"  # the only custom pipeline: pipeline(model=path) picks it
    assert len(out["one"]) == 3 and all(set(r) == {"generated_text"} for r in out["one"])
    assert [len(rows) for rows in out["batch"]] == [1, 1]

    # the remote-code pipeline samples exactly what the package's pipeline samples here
    from transformers import pipeline

    torch.manual_seed(0)
    expected = pipeline("dialog-generation", model=model, tokenizer=tokenizer)(
        TURNS[:2], num_return_sequences=3, max_new_tokens=6, min_new_tokens=3)
    assert out["one"] == expected and len({r["generated_text"] for r in expected}) == 3


def test_pipeline_inputs_and_generation_kwargs(saved):
    from transformers import pipeline

    _, model, tokenizer = saved
    chat = pipeline("dialog-generation", model=model, tokenizer=tokenizer)
    # k responses = generate() on the eos-joined context with k prior draws
    inputs = tokenizer(tokenizer.eos_token.join(TURNS[:2]), return_tensors="pt")
    greedy = dict(do_sample=False, num_return_sequences=3, max_new_tokens=5, min_new_tokens=5)
    expected = model.generate(**inputs, **greedy, latent_generator=torch.Generator().manual_seed(1))
    responses = chat(TURNS[:2], **greedy, latent_generator=torch.Generator().manual_seed(1))
    texts = [t.strip() for t in tokenizer.batch_decode(expected, skip_special_tokens=True)]
    assert [r["generated_text"] for r in responses] == texts
    calls = []
    generate = model.generate
    model.generate = lambda **kw: calls.append(kw) or generate(**kw)
    try:
        assert len(chat("Hello .", num_return_sequences=2, max_new_tokens=3, top_k=5)) == 2
        chat([{"role": "user", "content": "Hi , how are you ?"}, {"role": "assistant", "content": "Fine ."}],
             max_new_tokens=3)
        chat([TURNS[:2], TURNS[2:]], max_new_tokens=3, turn_separator=" | ")
    finally:
        model.generate = generate
    assert calls[0]["num_return_sequences"] == 2 and calls[0]["top_k"] == 5 and calls[0]["max_new_tokens"] == 3
    decoded = [tokenizer.decode(c["input_ids"][0]) for c in calls]
    assert decoded[0] == "<s>Hello .</s>"
    assert decoded[1] == "<s>Hi , how are you ?</s>Fine .</s>"
    assert decoded[2:] == [f"<s>{TURNS[0]} | {TURNS[1]}</s>", f"<s>{TURNS[2]}</s>"]
    with pytest.raises(ValueError, match="non-empty string"):
        chat(["Hi", ""])
