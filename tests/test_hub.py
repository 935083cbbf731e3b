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
from conftest import SUBPROCESS_HANG_S, tiny_config_kwargs

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
from dior_cvae.training.data import train_tokenizer

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
    # the snippet the Hub shows for the card's pipeline_tag (+ chat messages, as for a "conversational" tag)
    from huggingface_hub import ModelCard
    tag = ModelCard.load(sys.argv[1] + "/README.md").data.pipeline_tag
    pipe = pipeline(tag, model=sys.argv[1], trust_remote_code=True)
    hub = {"tag": tag, "class": type(pipe).__module__ + "." + type(pipe).__name__,
           "text": pipe("Hi , how are you ?", max_new_tokens=4),
           "messages": pipe([{"role": "user", "content": "Who are you?"}], max_new_tokens=4)}
    json.dump({"one": one, "batch": batch, "hub": hub}, open(sys.argv[2], "w"))
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
    entry = {"impl": "pipeline_dior.DialogGenerationPipeline", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}
    # the card's pipeline_tag names the same pipeline, for the Hub's snippet
    assert config["custom_pipelines"] == {"dialog-generation": entry, "text-generation": entry}
    assert {"pipeline_dior.py", "hub_dior.py", "README.md"} <= set(os.listdir(folder))


def test_pipeline_from_a_saved_folder_in_a_fresh_process(saved, tmp_path):
    folder, model, tokenizer = saved
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run([sys.executable, "-I", "-c", PIPELINE_IN_FRESH_PROCESS, str(folder), str(tmp_path / "o")],
                            cwd="/", env=env, capture_output=True, text=True, timeout=SUBPROCESS_HANG_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "o").read_text())
    hub = out["hub"]
    assert hub["tag"] == "text-generation"
    assert hub["class"].startswith("transformers_modules") and hub["class"].endswith("DialogGenerationPipeline")
    assert all(len(hub[k]) == 1 and set(hub[k][0]) == {"generated_text"} for k in ("text", "messages"))
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


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub patched at class level (hf-v5-notes §4): repos are folders under tmp_path/hub."""
    import huggingface_hub
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    root, calls, load = tmp_path / "hub", [], ModelCard.load.__func__

    class RepoUrl(str):
        repo_id = property(lambda self: self.split("huggingface.co/")[-1])

    def create_repo(self, repo_id, *args, **kwargs):
        (root / repo_id).mkdir(parents=True, exist_ok=True)
        return RepoUrl("https://huggingface.co/" + repo_id)

    def put(repo_id, rel, source):
        calls.append((repo_id, rel))
        (root / repo_id / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / repo_id / rel)

    def create_commit(self, repo_id, operations, *args, **kwargs):  # transformers' own push (the tokenizer's)
        for op in operations:
            put(repo_id, op.path_in_repo, op.path_or_fileobj)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            put(repo_id, rel, Path(folder_path) / rel)

    def card_load(cls, repo_id_or_path, *args, **kwargs):
        if Path(repo_id_or_path).is_file():
            return load(cls, repo_id_or_path, *args, **kwargs)
        if not (root / repo_id_or_path / "README.md").is_file():
            raise EntryNotFoundError("no README.md")
        return load(cls, root / repo_id_or_path / "README.md")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(card_load))
    return root, calls


def test_push_to_hub_publishes_the_dior_card_and_the_tokenizer_push_keeps_it(saved, fake_hub, tmp_path):
    from huggingface_hub import ModelCard

    root, calls = fake_hub
    _, model, tokenizer = saved
    model.push_to_hub("someone/dior", tags=["my-tag"])
    repo = root / "someone" / "dior"
    assert {"config.json", "model.safetensors", "modeling_dior.py", "pipeline_dior.py", "README.md"} <= set(
        os.listdir(repo))
    card = (repo / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"dior-cvae", "dialog", "my-tag"} <= set(meta["tags"]) and "text2text-generation" not in meta["tags"]
    assert "automatically generated" not in card and "## Citation" in card

    tokenizer.push_to_hub("someone/dior")  # transformers re-uploads the repo's card: unchanged
    assert ("someone/dior", "tokenizer.json") in calls
    assert (repo / "README.md").read_text() == card

    # a Dior card already on the Hub (e.g. train.py's, with results) is kept by a later model push
    rich = ModelCard(card.replace("## How to use", "## Results\n\nBLEU-1 99\n\n## How to use"))
    rich.save(repo / "README.md")
    model.push_to_hub("someone/dior")
    assert "BLEU-1 99" in (repo / "README.md").read_text()

    # ... but transformers' generic card (a tokenizer pushed first) is replaced
    tokenizer.push_to_hub("someone/other")
    assert "automatically generated" in (root / "someone" / "other" / "README.md").read_text()
    model.push_to_hub("someone/other")
    assert "dior-cvae" in ModelCard.load(root / "someone" / "other" / "README.md").data.tags

    # save_pretrained(push_to_hub=True) uploads the folder's own card
    folder = tmp_path / "local"
    folder.mkdir()
    ModelCard(card.replace("## How to use", "## Local notes\n\n## How to use")).save(folder / "README.md")
    model.save_pretrained(folder, push_to_hub=True, repo_id="someone/third")
    assert "## Local notes" in (root / "someone" / "third" / "README.md").read_text()


def test_model_card_yaml(saved):
    from huggingface_hub import ModelCard

    from dior_cvae.hub_dior import eval_results, model_card

    _, model, _ = saved
    results = eval_results({"bleu1": 23.14159, "distinct2": 34.5, "loss": float("nan")}, "li2017dailydialog/daily_dialog",
                           "DailyDialog", "test")
    card = model_card(model.config, "someone/dior-bart", license="cc-by-nc-sa-4.0", base_model="facebook/bart-base",
                      datasets=["li2017dailydialog/daily_dialog"], results=results, max_source_length=256,
                      sections="## Training data\n\nSome dialogs.")
    meta = yaml.safe_load(str(card).split("---\n")[1])
    assert meta["base_model"] == "facebook/bart-base" and meta["license"] == "cc-by-nc-sa-4.0"
    assert meta["datasets"] == ["li2017dailydialog/daily_dialog"] and meta["language"] == ["en"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [(m["name"], m["value"]) for m in metrics] == [("BLEU-1, paper protocol (nltk method7)", 23.1416),
                                                          ("Distinct-2", 34.5)]  # the NaN loss is left out
    assert meta["model-index"][0]["results"][0]["task"]["type"] == "text-generation"
    assert "## Training data\n\nSome dialogs." in card.text and "at most 256 context tokens" in card.text
    assert str(ModelCard(str(card))) == str(card)  # loads back unchanged (what a tokenizer push re-uploads)
