"""The Hub side of a saved model: the Dior-CVAE model card (README.md, rendered with huggingface_hub's `ModelCard` /
`ModelCardData`), saving with the card and the pipeline, and uploading.

`save_pretrained` (`save_with_card`) writes `model_card(config)` into every folder that has no README.md yet and
names the `dialog-generation` pipeline in config.json; `push_to_hub` (`push_model`) uploads that card instead of
transformers' generic one; `examples/train.py` writes the full card (data, training procedure, results, samples)
through `model_card` and uploads through `upload_model_folder`. Imports only transformers' own dependencies
(huggingface_hub).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError

from .pipeline_dior import CUSTOM_PIPELINES, HUB_TASK

TAGS = ["dior-cvae", "dialog", "cvae", "diffusion", "dialog-generation"]

#: Hub task of the card: config.json names the model's own pipeline (pipeline_dior.py) under this task as well as
#: under "dialog-generation", so the Hub's snippet `pipeline("text-generation", model=repo, trust_remote_code=True)`
#: builds it.
PIPELINE_TAG = HUB_TASK

#: result key -> (metric type, metric name in the card's model-index).
METRIC_NAMES = {
    "bleu1": ("bleu", "BLEU-1, paper protocol (nltk method7)"),
    "bleu2": ("bleu", "BLEU-2, paper protocol (nltk method7)"),
    "distinct1": ("distinct-1", "Distinct-1"),
    "distinct2": ("distinct-2", "Distinct-2"),
    "entropy1": ("entropy-1", "Entropy-1"),
    "entropy2": ("entropy-2", "Entropy-2"),
    "entropy3": ("entropy-3", "Entropy-3"),
    "loss": ("loss", "Loss (rc + KL, per example)"),
    "rc_loss": ("loss", "Reconstruction loss (per example)"),
    "kl_loss": ("kl", "KL term (per example)"),
}

CITATION = """```bibtex
@inproceedings{yang-etal-2023-dior,
    title = "{D}ior-{CVAE}: Pre-trained Language Models and Diffusion Priors for Variational Dialog Generation",
    author = "Yang, Tianyu and Tran, Thy Thy and Gurevych, Iryna",
    booktitle = "Findings of the Association for Computational Linguistics: EMNLP 2023",
    year = "2023",
    address = "Singapore",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2023.findings-emnlp.313",
    doi = "10.18653/v1/2023.findings-emnlp.313",
    pages = "4718--4735",
}
```"""


def eval_results(results: Mapping[str, float], dataset_type: str, dataset_name: str, split: str) -> list[EvalResult]:
    """The finite metrics of `results` (keys of `METRIC_NAMES`) as `EvalResult`s for the model-index."""
    return [
        EvalResult(task_type="text-generation", task_name="Dialogue response generation", dataset_type=dataset_type,
                   dataset_name=dataset_name, dataset_split=split, metric_type=METRIC_NAMES[key][0],
                   metric_name=METRIC_NAMES[key][1], metric_value=round(float(results[key]), 4))
        for key in METRIC_NAMES if results.get(key) is not None and math.isfinite(float(results[key]))
    ]


def model_card(
    config,
    repo_id: str | None = None,
    *,
    license: str | None = None,
    datasets: Sequence[str] = (),
    base_model: str | None = None,
    results: Sequence[EvalResult] = (),
    turn_separator: str | None = None,
    max_source_length: int | None = None,
    sections: str = "",
) -> ModelCard:
    """The card of a Dior-CVAE model: YAML metadata + usage, `sections` (markdown, e.g. training and evaluation),
    limitations and citation. `base_model` only for a model initialised from a pretrained checkpoint (a Hub id)."""
    repo = repo_id or "path/to/this/model"
    name = repo_id.rstrip("/").split("/")[-1] if repo_id else "Dior-CVAE dialog model"
    data = ModelCardData(
        language=["en"], license=license, library_name="transformers", pipeline_tag=PIPELINE_TAG, tags=list(TAGS),
        datasets=list(datasets) or None, base_model=base_model, model_name=name if results else None,
        eval_results=list(results) or None,
    )
    separator = json.dumps(turn_separator or "</s>")
    length = f"the model was trained on at most {max_source_length} context tokens, and " if max_source_length else ""
    body = f"""# {name}

A **Dior-CVAE** dialog response generator: a BART encoder-decoder turned into a hierarchical conditional VAE, with one
latent variable per layer infused into the decoder's self- and cross-attention, memory dropout, and a conditional
latent **diffusion prior** (Yang et al., Findings of EMNLP 2023). Every sampled response starts from its own draw of
the prior p(z | context), so several samples for one context differ in content, not just in wording.
This one has {config.encoder_layers} + {config.decoder_layers} layers, d_model {config.d_model}, latent size \
{config.latent_size} and a `{config.prior_type}` prior.

## How to use

The model code and a `dialog-generation` pipeline ship with the weights (`trust_remote_code=True`). A conversation is
a list of turns, oldest first ({length}the tokenizer truncates from the left, keeping the
latest turns):

```python
from transformers import pipeline

chat = pipeline("dialog-generation", model="{repo}", trust_remote_code=True)
chat(["Hi , how are you doing today ?", "Not bad . I just got back from the gym ."],
     do_sample=True, top_k=50, top_p=0.9, num_return_sequences=5, max_new_tokens=40)
# [{{"generated_text": ...}}, ...]: 5 responses, each from its own prior draw; a list of conversations is a batch
```

`pipeline("{HUB_TASK}", model="{repo}", trust_remote_code=True)` (the Hub's snippet for this card's task) builds the
same pipeline; it also takes chat messages (`[{{"role": "user", "content": "Hi !"}}]`).

Or with `generate()`, joining the turns with {separator} yourself:

```python
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForSeq2SeqLM.from_pretrained("{repo}", trust_remote_code=True)
context = ["Hi , how are you doing today ?", "Not bad . I just got back from the gym ."]
inputs = tokenizer({separator}.join(context), return_tensors="pt", truncation=True)
outputs = model.generate(**inputs, do_sample=True, top_k=50, top_p=0.9, num_return_sequences=5, max_new_tokens=40)
print(tokenizer.batch_decode(outputs, skip_special_tokens=True))
```

`num_return_sequences=k` draws k latents from the prior per context (outputs are `(batch·k, length)`, grouped by
context). Beam search works too (`num_beams=5, do_sample=False`): each latent draw is beam-searched. Extra
`generate()` arguments: `num_inference_steps` (denoising steps of the prior), `prior_guidance_scale` (classifier-free
guidance weight), `prior_temperature` (scale of the prior's noise: 1 samples the prior, 0 gives one latent per
context) and `latent_generator` (a `torch.Generator` for reproducible latents).

{sections}

## Limitations

- Open-domain chit-chat model: responses can be generic, inconsistent with the context, factually wrong or
  inappropriate, and reflect the biases of the training dialogs. Do not use it where such output can cause harm.
- Sensitive to the input format above (turn separator; DailyDialog-trained models expect pre-tokenised spacing like
  "Hi , there ?").
- Sampling is stochastic by design; fix `latent_generator` and the torch seed for reproducible outputs.

## Citation

{CITATION}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + body.replace("\n\n\n\n", "\n\n"))


def write_model_card_if_missing(config, folder) -> None:
    """`model_card(config)` as folder/README.md, unless the folder already has a README.md (e.g. train.py's card)."""
    readme = os.path.join(folder, "README.md")
    if not os.path.isfile(readme):
        model_card(config).save(readme)


def save_with_card(save_pretrained, config, save_directory, *args, push_to_hub: bool = False, **kwargs):
    """`save_pretrained` (transformers') into `save_directory` with config.json naming the `dialog-generation`
    pipeline and README.md the Dior card (unless the folder has one); with `push_to_hub`, then uploaded
    (`repo_id`, `token`, `commit_message`, `private`, `create_pr`)."""
    config.custom_pipelines = {**(getattr(config, "custom_pipelines", None) or {}), **CUSTOM_PIPELINES}
    hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "commit_message", "private", "create_pr")
                  if k in kwargs}
    save_pretrained(save_directory, *args, **kwargs)
    give_weights_umask_permissions(save_directory)
    write_model_card_if_missing(config, save_directory)
    if push_to_hub:
        return upload_model_folder(save_directory, **hub_kwargs)
    return None


def give_weights_umask_permissions(folder) -> None:
    """The safetensors files `save_pretrained` just wrote get the permissions of any new file (0o666 less the umask):
    safetensors writes them through a private temporary file, mode 0o600, which other users could not read."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = set(json.load(f)["weight_map"].values())
    else:
        names = {"model.safetensors"}
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask)


def upload_model_folder(folder, repo_id: str | None = None, *, keep_hub_card: bool = False, token=None, private=None,
                        commit_message=None, commit_description=None, revision=None, create_pr: bool = False,
                        ignore_patterns=None):
    """Create the Hub repo if needed (default name: the folder's) and upload `folder` with its README.md; with
    `keep_hub_card`, a Dior card already in the repo (tag "dior-cvae") is kept and the folder's is not uploaded.
    `ignore_patterns`: files of `folder` not to upload (e.g. a training run's checkpoints)."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id or os.path.basename(os.path.abspath(folder)), private=private,
                              exist_ok=True).repo_id
    ignore = list(ignore_patterns or [])
    if keep_hub_card:
        try:
            ignore += ["README.md"] if "dior-cvae" in (ModelCard.load(repo_id, token=token).data.tags or []) else []
        except EntryNotFoundError:
            pass
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=ignore or None, revision=revision,
                             commit_message=commit_message or "Upload Dior-CVAE model", create_pr=create_pr,
                             commit_description=commit_description)


def push_model(model, repo_id: str, *, max_shard_size="50GB", tags=None, **hub_kwargs):
    """`model.push_to_hub`: save_pretrained into a temporary folder (with the Dior card, plus `tags`) and upload it,
    keeping a Dior card already in the repo."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tags:
            card = ModelCard.load(os.path.join(folder, "README.md"))
            card.data.tags = list(dict.fromkeys([*card.data.tags, *tags]))
            card.save(os.path.join(folder, "README.md"))
        return upload_model_folder(folder, repo_id, keep_hub_card=True, **hub_kwargs)
