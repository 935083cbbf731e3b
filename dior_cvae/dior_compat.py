"""The one place that knows which transformers version runs this model.

A model pushed to the Hub freezes its code, so the remote code must keep working on every transformers version
its users may have. Tested range: `TESTED_TRANSFORMERS` (both ends in CI). What moved inside it:

- transformers 5.23 stopped drawing `torch.rand([])` for layerdrop in BART's encoder and decoder layers when layerdrop
  is 0. Before, every layer of a training forward branched on that tensor, which breaks a `torch.compile` graph at
  every layer: `COMPILED_TRAINING_MIN_TRANSFORMERS` (see `compiled_training_problem`).
- transformers 5.24 renamed `past_key_values` to `cache`: the keyword BART's decoder layers pass to their attention
  modules, the keyword `generate` passes to `forward`, and the field of `ModelOutput`s. `CACHE_NAME` is the
  installed version's name; `pop_cache` reads a cache passed under either name.

Outside the tested range importing the model raises one `ImportError` naming the range (set the environment
variable `DIOR_CVAE_ALLOW_UNTESTED_TRANSFORMERS=1` to try anyway, with a warning).
"""

import inspect
import os
import warnings

import transformers
from packaging.version import Version
from transformers.models.bart.modeling_bart import BartAttention

TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")  # [lowest tested, first untested)


def check_transformers_version(version: str = transformers.__version__) -> None:
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    if low <= Version(Version(version).base_version) < high:
        return
    message = (
        f"Dior-CVAE is tested with transformers >= {low}, < {high}; this environment has transformers {version}. "
        f'Install a tested version: pip install "transformers>={low},<{high}"'
    )
    if os.environ.get("DIOR_CVAE_ALLOW_UNTESTED_TRANSFORMERS") == "1":
        warnings.warn(message + " (DIOR_CVAE_ALLOW_UNTESTED_TRANSFORMERS=1: continuing)", stacklevel=2)
        return
    raise ImportError(message)


COMPILED_TRAINING_MIN_TRANSFORMERS = "5.23.0"


def compiled_training_problem(version: str = transformers.__version__) -> str | None:
    """Why a compiled training step cannot work with this transformers version, or None."""
    if Version(Version(version).base_version) >= Version(COMPILED_TRAINING_MIN_TRANSFORMERS):
        return None
    return (f"a compiled training step needs transformers >= {COMPILED_TRAINING_MIN_TRANSFORMERS}, this environment has "
            f"{version}: its BART layers branch on a random tensor (layerdrop) in training, which breaks the graph at "
            "every layer (on an H200 with 5.17: recompiled per layer up to dynamo's limit, 25 updates in 170 s). "
            f'pip install "transformers>={COMPILED_TRAINING_MIN_TRANSFORMERS}"')


CACHE_NAME = "cache" if "cache" in inspect.signature(BartAttention.forward).parameters else "past_key_values"


def pop_cache(kwargs: dict):
    """Remove and return the decoder cache from an attention module's keyword arguments, under either name."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


__all__ = ["CACHE_NAME", "COMPILED_TRAINING_MIN_TRANSFORMERS", "TESTED_TRANSFORMERS", "check_transformers_version",
           "compiled_training_problem", "pop_cache"]
