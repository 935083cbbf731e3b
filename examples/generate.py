"""Generate responses with a trained Dior-CVAE (or any seq2seq) checkpoint.

Writes one JSON line per context::

    {"context": [turns], "reference": str | [str] (if known), "samples": [k strings]}

Samples are decoded with ``skip_special_tokens=True`` and whitespace-collapsed, so the
file can be scored directly with ``examples/score.py`` (or ``--score`` here).

Usage:
    python examples/generate.py --model_name_or_path DIR --output generations.jsonl \\
        (--dataset_dir data/dailydialog_sample --split test | --input_file contexts.jsonl) \\
        [--decoding sampling|beam|greedy] [--num_samples 5] [--seed 42] [--score [--semantic]]

Input:
    ``--dataset_dir``: a DailyDialog folder (ijcnlp ``dialogues_{split}.txt[.gz]`` or ``{split}.txt[.gz]``),
    paired as in training (``dior_cvae.training.data.load_dailydialog_dir``).
    ``--input_file``: JSON Lines (``.gz`` ok), one object per line with ``"context"`` (a string = one turn,
    or a list of turns, oldest first) and optionally ``"reference"`` or ``"response"`` (the gold response;
    a string or a list of strings) and ``"persona"`` (string or list, prepended to the context as in training).

Decoding presets (the paper's settings; every knob can be overridden):
    sampling: do_sample, top_k 50, top_p 0.9, temperature 1.0
    beam:     num_beams 5
    greedy:   num_beams 1, no sampling
``--num_samples k`` is ``num_return_sequences``: k independent prior draws per context (with ``beam``, each
draw is beam-searched and its best beam kept). ``--seed`` seeds the global RNGs (token sampling) and a
``torch.Generator`` passed to ``generate(latent_generator=...)`` (prior sampling), so a run is reproducible
for a given seed, batch size, device and dtype.

Context formatting and truncation are those of training: turns joined with the tokenizer's eos token
(``--turn_separator`` to change it), wrapped in ``<s> ... </s>``, left-truncated to ``--max_source_length``
(capped at the model's ``max_position_embeddings``).

The progress bar and the one-line summary go to stderr; with ``--score`` the metrics JSON
(``dior_cvae.training.metrics.score_generations``) is printed to stdout.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import sys
import time
from pathlib import Path

import torch

from dior_cvae.training.data import DataFormatError, encode_examples, load_dailydialog_dir, load_jsonl
from dior_cvae.training.outputs import atomic_file, check_output_file, interrupted_save

logger = logging.getLogger("generate")

PRESETS: dict[str, dict] = {
    "sampling": {"do_sample": True, "num_beams": 1, "top_k": 50, "top_p": 0.9, "temperature": 1.0},
    "beam": {"do_sample": False, "num_beams": 5},
    "greedy": {"do_sample": False, "num_beams": 1},
}
SAMPLING_ONLY = ("top_k", "top_p", "temperature")
OVERRIDABLE = (
    "num_beams",
    "top_k",
    "top_p",
    "temperature",
    "max_new_tokens",
    "repetition_penalty",
    "no_repeat_ngram_size",
)
MAX_NUM_SAMPLES = 1000  # responses per context
MAX_INFERENCE_STEPS = 10_000  # the prior's solver steps (as DiorCVAEConfig's bound)
DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", required=True,
                   help="local folder or hub id; a Dior-CVAE loads with this package's code")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="let the model / tokenizer folder run its own Python code (other architectures)")
    p.add_argument("--tokenizer_name_or_path", help="default: --model_name_or_path")
    p.add_argument("--output", required=True,
                   help="generations JSON Lines file to write (atomically); an existing file needs --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset_dir", help="DailyDialog folder (ijcnlp files or data/dailydialog_sample)")
    src.add_argument("--input_file", help="JSON Lines with 'context' and optional 'reference'/'response'")
    p.add_argument("--split", default="test", choices=["test", "validation", "train"])
    p.add_argument("--max_samples", type=int, help="use only the first N contexts")

    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    p.add_argument("--batch_size", type=int, default=32, help="contexts per batch (each gives num_samples rows)")

    p.add_argument("--decoding", default="sampling", choices=sorted(PRESETS))
    p.add_argument("--num_samples", type=int, default=1, help="responses (prior draws) per context")
    p.add_argument("--num_beams", type=int)
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--disable_compile", action="store_true",
                   help="compile nothing (generation config disable_compile): on CUDA, transformers' decoding loop "
                        "and the prior's eager loop instead of the captured step, which compiles once per batch size "
                        "and memory bucket (about a minute each): faster for a one-off run over many shapes")
    p.add_argument("--repetition_penalty", type=float)
    p.add_argument("--no_repeat_ngram_size", type=int)
    p.add_argument("--num_inference_steps", type=int, help="prior denoising steps (default: the config's)")
    p.add_argument("--prior_guidance_scale", type=float, help="prior guidance weight (default: the config's)")
    p.add_argument("--prior_temperature", type=float,
                   help="scale of the prior's noise, 1 = the prior itself (default: the config's)")
    p.add_argument("--prior_sampler", choices=["dpmsolver++", "ddim", "ddpm"], help="prior sampler (default: the config's)")
    p.add_argument("--latents", default="prior", choices=["prior", "posterior"],
                   help="prior: sample the latents from p(z | c) (generation proper). posterior: an oracle diagnostic, "
                        "z ~ q(z | c, r) with r the reference response: how good the responses are when the latent is "
                        "right; its gap to the prior's rows is what the prior loses")
    p.add_argument("--max_target_length", type=int, default=64,
                   help="with --latents posterior: tokens of the reference kept, as in training")
    p.add_argument("--seed", type=int, default=42)

    p.add_argument("--turn_separator", help="default: the tokenizer's eos token, as in training")
    p.add_argument("--max_source_length", type=int, default=512)

    p.add_argument("--score", action="store_true", help="score the output and print the metrics JSON")
    p.add_argument("--semantic", action="store_true", help="with --score: also the embedding sample_cosine")
    p.add_argument("--embedding_model", help="with --semantic: sentence-transformers path (default: bundled)")
    args = p.parse_args(argv)

    for name in ("batch_size", "num_samples", "max_new_tokens", "max_source_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        p.error("--max_samples must be >= 1")
    if args.num_beams is not None and args.num_beams < 1:
        p.error("--num_beams must be >= 1")
    if args.semantic and not args.score:
        p.error("--semantic needs --score")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        p.error(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    if args.prior_guidance_scale is not None and not 0 <= args.prior_guidance_scale < float("inf"):
        p.error(f"--prior_guidance_scale must be a finite number >= 0, got {args.prior_guidance_scale}")
    if args.prior_temperature is not None and not 0 <= args.prior_temperature < float("inf"):
        p.error(f"--prior_temperature must be a finite number >= 0, got {args.prior_temperature}")
    if args.max_target_length < 3:
        p.error(f"--max_target_length must be >= 3 (<s>, a token, </s>), got {args.max_target_length}")
    if args.latents == "posterior" and args.prior_temperature is not None:
        p.error("--prior_temperature is a setting of the prior: --latents posterior does not sample it")
    if args.num_samples > MAX_NUM_SAMPLES:
        p.error(f"--num_samples must be <= {MAX_NUM_SAMPLES}, got {args.num_samples}")
    if args.num_inference_steps is not None and args.num_inference_steps > MAX_INFERENCE_STEPS:
        p.error(f"--num_inference_steps must be <= {MAX_INFERENCE_STEPS}, got {args.num_inference_steps}")
    if args.max_source_length < 3:
        p.error(f"--max_source_length must be >= 3 (<s>, a token, </s>), got {args.max_source_length}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.temperature is not None and not 0 < args.temperature < float("inf"):
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        p.error(f"--top_k must be >= 0 (0: no top-k filter), got {args.top_k}")
    if args.repetition_penalty is not None and not 0 < args.repetition_penalty < float("inf"):
        p.error(f"--repetition_penalty must be a finite number > 0, got {args.repetition_penalty}")
    if args.no_repeat_ngram_size is not None and args.no_repeat_ngram_size < 0:
        p.error(f"--no_repeat_ngram_size must be >= 0, got {args.no_repeat_ngram_size}")
    if args.turn_separator == "":
        p.error("--turn_separator must not be empty: the context's turns would run together")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError as exc:
            p.error(f"--device {args.device}: {exc}")
    if args.model_name_or_path.startswith((".", "/", "~")) and not Path(args.model_name_or_path).expanduser().exists():
        p.error(f"--model_name_or_path: no such folder: {args.model_name_or_path}")
    try:
        check_output_file("generate.py", "--output", args.output, args.overwrite, [("--input_file", args.input_file)])
    except SystemExit as exc:
        p.error(str(exc).removeprefix("generate.py: error: "))
    return args


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------


def _string_list(value, field: str, allow_empty_items: bool = False) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError(f'"{field}" must be a string or a list of strings')
    items = [x.strip() for x in items]
    if not allow_empty_items and (not items or not all(items)):
        raise ValueError(f'"{field}" is empty or has an empty entry')
    return items


def parse_context_record(obj) -> dict:
    """One --input_file row: "context" required; "reference" (else "response") and "persona" optional."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "context" not in obj:
        raise ValueError('missing field "context"')
    example = {"context": _string_list(obj["context"], "context")}
    persona = obj.get("persona")
    if persona:
        example["persona"] = [s for s in _string_list(persona, "persona", True) if s]
    key = "reference" if obj.get("reference") is not None else "response"
    if obj.get(key) is not None:
        refs = _string_list(obj[key], key)
        example["reference"] = refs[0] if isinstance(obj[key], str) else refs
    return example


def read_input_file(path: str | Path) -> list[dict]:
    """Contexts from JSON Lines; unlike training data, rows need no response. A bad line raises
    ``DataFormatError`` (``path:lineno: reason``)."""
    return load_jsonl(path, parse=parse_context_record)[0]


def load_examples(args: argparse.Namespace) -> list[dict]:
    if args.input_file:
        if not Path(args.input_file).is_file():
            raise SystemExit(f"generate.py: error: --input_file: no such file: {args.input_file}")
        try:
            examples = read_input_file(args.input_file)
        except DataFormatError as exc:
            raise SystemExit(f"generate.py: error: {exc}") from None
    else:
        pairs = load_dailydialog_dir(args.dataset_dir, splits=[args.split])[args.split]
        examples = [{"context": ex["context"], "persona": ex["persona"], "reference": ex["response"]} for ex in pairs]
    if args.max_samples is not None:
        examples = examples[: args.max_samples]
    if not examples:
        raise SystemExit("no contexts to generate for")
    return examples


# ---------------------------------------------------------------------------
# Model and decoding settings
# ---------------------------------------------------------------------------


def load_model_and_tokenizer(args: argparse.Namespace, device: torch.device):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    # `dior_cvae` is imported (dior_cvae.training.data), so its Auto classes are registered: a Dior-CVAE folder loads with
    # this package's code; the folder's own .py files run only with --trust_remote_code.
    staged = interrupted_save(args.model_name_or_path)
    if staged is not None:
        raise SystemExit(f"generate.py: error: --model_name_or_path {args.model_name_or_path}: its final save was "
                         f"interrupted ({staged} holds the rest of the new files): the folder mixes two models. Run "
                         f"train.py on it again (e.g. with --resume_from_checkpoint latest) to complete the save")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or args.model_name_or_path,
                                                  trust_remote_code=args.trust_remote_code)
        model = AutoModelForSeq2SeqLM.from_pretrained(
            args.model_name_or_path, trust_remote_code=args.trust_remote_code, dtype=DTYPES[args.dtype]
        )
    except Exception as exc:  # e.g. a truncated model.safetensors, whose own error names no file
        raise SystemExit(f"generate.py: error: cannot load {args.model_name_or_path}: {type(exc).__name__}: {exc}") from None
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        raise SystemExit("the tokenizer has no pad token")
    return model, tokenizer


def build_generation_config(args: argparse.Namespace, model):
    """The model's generation defaults, then the preset, then the explicit overrides."""
    config = copy.deepcopy(model.generation_config)
    params = dict(PRESETS[args.decoding])
    if not params["do_sample"]:
        params.update(dict.fromkeys(SAMPLING_ONLY))  # drop checkpoint sampling knobs: unused, and HF warns
        ignored = [f"--{k}" for k in SAMPLING_ONLY if getattr(args, k) is not None]
        if ignored:
            logger.warning("%s ignored: --decoding %s does not sample", ", ".join(ignored), args.decoding)
    for name in OVERRIDABLE:
        value = getattr(args, name)
        if value is not None and not (name in SAMPLING_ONLY and not params["do_sample"]):
            params[name] = value

    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and params["max_new_tokens"] > limit - 2:
        # decoder positions: decoder start token + generated tokens
        logger.warning("--max_new_tokens %d capped at %d (max_position_embeddings)", params["max_new_tokens"], limit - 2)
        params["max_new_tokens"] = limit - 2
    params["num_return_sequences"] = args.num_samples
    if args.disable_compile:
        params["disable_compile"] = True
    unused = config.update(**params)
    if unused:  # pragma: no cover - a transformers rename
        raise RuntimeError(f"not generation settings: {sorted(unused)}")
    return config


def prior_kwargs(args: argparse.Namespace, model, generator: torch.Generator) -> dict:
    """The prior settings, passed only to models whose generate() takes them (Dior-CVAE does)."""
    accepted = inspect.signature(model.generate).parameters
    if args.prior_sampler is not None:
        if getattr(model.config, "sampler", None) is None:
            raise SystemExit("--prior_sampler needs a Dior-CVAE model with a diffusion prior")
        model.config.sampler = args.prior_sampler  # the prior rebuilds its scheduler on the next sample
    kwargs = {"latent_generator": generator}
    if args.num_inference_steps is not None:
        kwargs["num_inference_steps"] = args.num_inference_steps
    if args.prior_guidance_scale is not None:
        kwargs["prior_guidance_scale"] = args.prior_guidance_scale
    if args.prior_temperature is not None:
        if not getattr(model.config, "has_latent", False):
            raise SystemExit("--prior_temperature needs a Dior-CVAE model with a latent (this one has none)")
        kwargs["prior_temperature"] = args.prior_temperature
    unsupported = [k for k in kwargs if k not in accepted]
    if unsupported:
        logger.warning("%s: not a Dior-CVAE generate(); ignoring %s", type(model).__name__, ", ".join(unsupported))
    return {k: v for k, v in kwargs.items() if k in accepted}


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------


def clean(text: str) -> str:
    return " ".join(text.split())


def first_reference(example: dict) -> str:
    reference = example["reference"]
    return reference if isinstance(reference, str) else reference[0]


def posterior_latents(model, encoded, idx, context_vectors, k: int, extra_kwargs) -> torch.Tensor:
    """k draws of z ~ q(z | c, r) per context of the batch, r its (first) reference: (len(idx)·k, L, ls), given the
    pooled contexts `context_vectors` (len(idx), L, d) of `model.encode`."""
    labels = torch.full((len(idx), max(len(encoded[i]["labels"]) for i in idx)), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        labels[row, : len(encoded[i]["labels"])] = torch.tensor(encoded[i]["labels"])
    labels = labels.to(context_vectors.device).repeat_interleave(k, 0)
    return model.posterior(context_vectors.repeat_interleave(k, 0), labels,
                           generator=extra_kwargs.get("latent_generator"))[0]


def generate_all(args, model, tokenizer, examples, generation_config, extra_kwargs) -> tuple[list[list[str]], int]:
    """Samples per example (in input order) and the number of generated tokens."""
    from tqdm.auto import tqdm

    max_source = args.max_source_length
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_source > limit:
        logger.info("--max_source_length %d capped at max_position_embeddings %d", max_source, limit)
        max_source = limit
    posterior = args.latents == "posterior"
    encoded = encode_examples(
        tokenizer,
        [{"context": ex["context"], "persona": ex.get("persona") or [],
          **({"response": first_reference(ex)} if posterior else {})} for ex in examples],
        max_source_length=max_source,
        max_target_length=args.max_target_length,
        turn_separator=args.turn_separator,
        show_progress=False,
    )
    # longest first: less padding, and an out-of-memory batch fails at once
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
    pad_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    k = args.num_samples
    results: list[list[str] | None] = [None] * len(encoded)
    new_tokens = 0
    with tqdm(total=len(order), desc="Generating", unit="ctx", file=sys.stderr) as bar:
        for start in range(0, len(order), args.batch_size):
            idx = order[start : start + args.batch_size]
            width = max(len(encoded[i]["input_ids"]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(idx):
                ids = encoded[i]["input_ids"]
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            with torch.inference_mode():
                oracle = {}
                if posterior:  # one encoding of the context: for the posterior, and reused by generate()
                    encoder_outputs, context_vectors = model.encode(input_ids, attention_mask)
                    oracle = {"encoder_outputs": encoder_outputs,
                              "latents": posterior_latents(model, encoded, idx, context_vectors, k, extra_kwargs)}
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=generation_config,
                    **oracle,
                    **extra_kwargs,
                )
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            new_tokens += int(sequences[:, 1:].ne(pad_id).sum())
            texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
            if len(texts) != len(idx) * k:
                raise RuntimeError(f"generate returned {len(texts)} sequences for {len(idx)} contexts x {k} samples")
            for row, i in enumerate(idx):
                results[i] = [clean(t) for t in texts[row * k : (row + 1) * k]]
            bar.update(len(idx))
    return results, new_tokens  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from transformers import set_seed

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    examples = load_examples(args)
    missing = [i for i, ex in enumerate(examples) if ex.get("reference") is None] if args.latents == "posterior" else []
    if missing:
        raise SystemExit(f"generate.py: error: --latents posterior needs a reference response for every context; "
                         f"{len(missing)} have none (the first: row {missing[0]} of the input)")
    model, tokenizer = load_model_and_tokenizer(args, device)
    generation_config = build_generation_config(args, model)

    set_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    extra = prior_kwargs(args, model, generator)
    if args.latents == "posterior" and not getattr(model.config, "has_latent", False):
        raise SystemExit("--latents posterior needs a Dior-CVAE model with a latent (this one has none)")

    started = time.perf_counter()
    samples, new_tokens = generate_all(args, model, tokenizer, examples, generation_config, extra)
    seconds = time.perf_counter() - started

    rows = []
    for example, texts in zip(examples, samples):
        row = {"context": list(example["context"])}
        if example.get("persona"):
            row["persona"] = list(example["persona"])
        if example.get("reference") is not None:
            row["reference"] = example["reference"]
        row["samples"] = texts
        rows.append(row)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    check_output_file("generate.py", "--output", output, args.overwrite, [("--input_file", args.input_file)])  # again
    try:
        with atomic_file(output) as f:  # a full disk or a kill leaves the old file
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise SystemExit(f"generate.py: error: --output {output}: cannot write: {exc}") from None

    n_samples = sum(len(r["samples"]) for r in rows)
    print(
        f"wrote {len(rows)} rows, {n_samples} samples to {output} in {seconds:.1f} s "
        f"({new_tokens / max(seconds, 1e-9):.1f} tokens/s, {args.decoding}, device {device})",
        file=sys.stderr,
    )

    if args.score:
        from dior_cvae.training.metrics import load_embedding_model, score_generations

        missing = sum("reference" not in r for r in rows)
        if missing:
            raise SystemExit(f"--score: {missing} row(s) have no reference")
        embedding_model = load_embedding_model(args.embedding_model) if args.semantic else None
        print(json.dumps(score_generations(rows, embedding_model=embedding_model, semantic=args.semantic), indent=2))


if __name__ == "__main__":
    main()
