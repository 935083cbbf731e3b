"""The model a training run trains: `DiorCVAEConfig`'s hyper-parameters as command-line arguments (generated from
the config's fields, with their documentation as help), and the model built from a BART checkpoint, a Dior-CVAE
folder, or from scratch (a config file and/or those arguments)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import textwrap

from transformers import BartConfig, PreTrainedConfig

from ..configuration_dior import PRIOR_TYPES, DiorCVAEConfig
from ..modeling_dior import DiorCVAEForConditionalGeneration
from ..scheduling_dior import PREDICTION_TYPES, SAMPLERS

logger = logging.getLogger(__name__)

#: BART and Dior fields that are not hyper-parameters to choose: set from the tokenizer, or fixed by the model.
NOT_ARGUMENTS = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                 "forced_eos_token_id", "is_encoder_decoder", "is_decoder", "use_cache", "tie_word_embeddings"}

#: The values a string field takes.
CHOICES = {"prior_type": PRIOR_TYPES, "prediction_type": PREDICTION_TYPES, "sampler": SAMPLERS}


def _documented_fields(*classes) -> dict[str, str]:
    """{field: its description} from the `name (`type`, defaults to x): text` entries of the classes' docstrings
    (the first class that documents a field wins)."""
    docs: dict[str, str] = {}
    for cls in classes:
        found: dict[str, str] = {}
        current: list[str] = []
        for line in textwrap.dedent(cls.__doc__ or "").splitlines():
            entries = list(re.finditer(r"(\w+) \(`[^`]*`[^)]*\)", line))
            if entries and re.match(r"\s*\w+ \(`", line):  # "name (`type`, defaults to x): text"
                current = [m.group(1) for m in entries]
                for name in current:
                    found[name] = line[entries[-1].end():].lstrip(":, ").strip()
            elif current and line.startswith(" ") and line.strip():  # its continuation lines
                for name in current:
                    found[name] = f"{found[name]} {line.strip()}".strip()
            else:
                current = []
        for name, text in found.items():
            docs.setdefault(name, text)
    return docs


def config_fields() -> list[dataclasses.Field]:
    """The fields of `DiorCVAEConfig` offered as arguments: BART's architecture and Dior's own (scalars only)."""
    own = set(BartConfig.__annotations__) | set(DiorCVAEConfig.__annotations__)
    return [f for f in dataclasses.fields(DiorCVAEConfig)
            if f.name in own and f.name not in NOT_ARGUMENTS and isinstance(f.default, (bool, int, float, str))]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--FIELD` argument per `config_fields()` entry, typed by its default, documented by the config's
    docstring. Their default is None (not given): the model's own value is kept unless the flag is given."""
    group = parser.add_argument_group(
        "model configuration", "DiorCVAEConfig fields. Given ones override --model_name_or_path's or --config_name's "
        "values; from scratch, one of --encoder_layers / --decoder_layers sets both, and --d_model sets the heads to "
        "d_model // 64 and the FFN sizes to 4 * d_model unless given.")
    docs = _documented_fields(DiorCVAEConfig, BartConfig)
    for field in config_fields():
        kind = type(field.default)
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        if field.name in CHOICES:
            extra["choices"] = CHOICES[field.name]
        text = docs.get(field.name, "").replace("%", "%%")
        # "%(default).0s" prints nothing: it keeps an ArgumentDefaultsHelpFormatter from adding "(default: None)"
        group.add_argument(f"--{field.name}", default=None, **extra,
                           help=f"{text} (default: the loaded config's; {field.default} from scratch)%(default).0s")


def given_config_fields(args: argparse.Namespace) -> dict:
    """The config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}


def config_problem(args: argparse.Namespace) -> str | None:
    """Why the config of a model from scratch (`--config_name` and the fields given) is invalid, or None; a model
    loaded with --model_name_or_path is checked when it loads."""
    if args.model_name_or_path:
        return None
    try:
        config_dict = PreTrainedConfig.get_config_dict(args.config_name)[0] if args.config_name else {}
        DiorCVAEConfig.from_dict({**config_dict, **complete_from_scratch(given_config_fields(args))[0]})
    except (ValueError, OSError) as exc:
        return str(exc)
    return None


def complete_from_scratch(fields: dict) -> tuple[dict, list[str]]:
    """Fill in the fields that must follow the ones given, for a model built from scratch.

    - `encoder_layers` and `decoder_layers` must be equal (one latent per layer): one given sets the other.
    - `d_model` given: attention heads default to d_model // 64 (BART's 768 / 12) and FFN sizes to 4·d_model,
      unless given too.
    Returns the completed dict and a list of human-readable notes about what was derived.
    """
    out, notes = dict(fields), []
    for given, other in (("encoder_layers", "decoder_layers"), ("decoder_layers", "encoder_layers")):
        if given in out and other not in out:
            out[other] = out[given]
            notes.append(f"{other}={out[given]} (= {given})")
    if out.get("d_model"):
        d_model = out["d_model"]
        heads = max(1, d_model // 64)
        while d_model % heads:
            heads -= 1
        for key in ("encoder_attention_heads", "decoder_attention_heads"):
            if key not in out:
                out[key] = heads
                notes.append(f"{key}={heads} (d_model // 64)")
        for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
            if key not in out:
                out[key] = 4 * d_model
                notes.append(f"{key}={4 * d_model} (4 * d_model)")
    return out, notes


def build_model(args, tokenizer) -> DiorCVAEForConditionalGeneration:
    """The model of train.py's `args`: `--model_name_or_path` (a BART checkpoint through `from_bart`, or a Dior-CVAE
    folder), else from scratch (`--config_name`, a config.json file or folder, if given); the config fields given as
    arguments override the loaded ones. Generation defaults: nucleus sampling, one prior draw per sequence."""
    overrides = given_config_fields(args)
    if args.model_name_or_path:
        config_dict, _ = PreTrainedConfig.get_config_dict(args.model_name_or_path)
        if config_dict.get("model_type") == DiorCVAEConfig.model_type:
            config = DiorCVAEConfig.from_dict({**config_dict, **overrides})
            loader = lambda: DiorCVAEForConditionalGeneration.from_pretrained(args.model_name_or_path, config=config)  # noqa: E731
        else:
            loader = lambda: DiorCVAEForConditionalGeneration.from_bart(args.model_name_or_path, **overrides)  # noqa: E731
        try:
            model = loader()
        except Exception as exc:  # e.g. a truncated safetensors file: name the folder
            raise ValueError(f"--model_name_or_path {args.model_name_or_path}: cannot load the weights "
                             f"({type(exc).__name__}: {exc})") from exc
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config_dict = PreTrainedConfig.get_config_dict(args.config_name)[0] if args.config_name else {}
        overrides, derived = complete_from_scratch(overrides)
        if derived:
            logger.info("Derived config fields: " + ", ".join(derived))
        specials = dict(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id,
        )
        model = DiorCVAEForConditionalGeneration(DiorCVAEConfig.from_dict({**config_dict, **overrides, **specials}))
    for flag in ("max_source_length", "max_target_length"):
        if getattr(args, flag) > model.config.max_position_embeddings:
            raise ValueError(f"--{flag} {getattr(args, flag)} > the model's max_position_embeddings "
                             f"{model.config.max_position_embeddings}")
    model.generation_config.update(do_sample=True, top_k=50, top_p=0.9, max_new_tokens=args.max_target_length)
    return model
