"""Version checks and small helpers shared by the shipped modules.

A model pushed to the Hub freezes its code, so the remote code must keep working on every transformers version its
users may have. Tested range: `TESTED_TRANSFORMERS` (both ends in CI). What moved inside it:

- transformers 5.23 stopped drawing `torch.rand([])` for layerdrop in BART's encoder and decoder layers when layerdrop
  is 0. Before, every layer of a training forward branched on that tensor, which breaks a `torch.compile` graph at
  every layer: `COMPILED_TRAINING_MIN_TRANSFORMERS` (see `compiled_training_problem`).
- transformers 5.24 renamed `past_key_values` to `cache`: the keyword BART's decoder layers pass to their attention
  modules, the keyword `generate` passes to `forward`, and the field of `ModelOutput`s. `CACHE_NAME` is the
  installed version's name; `pop_cache` reads a cache passed under either name, `accepts_past_key_values` lets a
  method with a `cache` argument take it under the old name.

A checkpoint's code must keep loading on transformers versions newer than the tested range: there importing the
model warns once and carries on. Only versions older than `TESTED_TRANSFORMERS[0]` are refused (one `ImportError`
with the reason): the model relies on transformers 5's BART, attention-interface and cache APIs.
"""

import inspect
import math
import warnings

import torch
import transformers
from packaging.version import Version
from transformers.models.bart.modeling_bart import BartAttention
from transformers.utils.deprecation import deprecate_kwarg

TESTED_TRANSFORMERS = ("5.17.0", "5.26.0")  # [lowest tested, first untested)
COMPILED_TRAINING_MIN_TRANSFORMERS = "5.23.0"
CACHE_NAME = "cache" if "cache" in inspect.signature(BartAttention.forward).parameters else "past_key_values"

_warned_untested = False


def check_transformers_version(version: str | None = None) -> None:
    """Refuse a transformers older than the supported minimum; warn once for one newer than the tested range."""
    global _warned_untested
    version = version or transformers.__version__
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    installed = Version(Version(version).base_version)
    if installed < low:
        raise ImportError(
            f"Dior-CVAE needs transformers >= {low} (its BART layers, attention interface and cache API); this "
            f'environment has transformers {version}: pip install "transformers>={low}"'
        )
    if installed >= high and not _warned_untested:
        _warned_untested = True
        warnings.warn(
            f"Dior-CVAE is tested with transformers >= {low}, < {high}; this environment has transformers {version}. "
            "Continuing: newer versions are expected to work; report a failure with the version to the model's "
            "authors.",
            UserWarning, stacklevel=2,
        )


def compiled_training_problem(version: str = transformers.__version__) -> str | None:
    """Why a compiled training step cannot work with this transformers version, or None."""
    if Version(Version(version).base_version) >= Version(COMPILED_TRAINING_MIN_TRANSFORMERS):
        return None
    return (f"a compiled training step needs transformers >= {COMPILED_TRAINING_MIN_TRANSFORMERS}, this environment has "
            f"{version}: its BART layers branch on a random tensor (layerdrop) in training, which breaks the graph at "
            "every layer (torch.compile recompiles per layer until it reaches its recompile limit). "
            f'pip install "transformers>={COMPILED_TRAINING_MIN_TRANSFORMERS}"')


def accepts_past_key_values(method):
    """`method` (which has a `cache` argument) also takes the decoder cache as `past_key_values`, through
    transformers' `deprecate_kwarg`: with a FutureWarning where `cache` is the installed name (transformers >= 5.24),
    silently where `past_key_values` is (older `generate` passes it under that name)."""
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", version="5.24.0", new_name="cache",
                               warn_if_greater_or_equal_version=True)(method)
    # "deprecated since the installed version", without a warning: a silent rename
    return deprecate_kwarg("past_key_values", version=transformers.__version__, new_name="cache")(method)


def pop_cache(kwargs: dict):
    """Remove and return the decoder cache from an attention module's keyword arguments, under either name."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def generator_kwargs(generator: torch.Generator | None) -> dict:
    """`{"generator": generator}` for torch.rand / randn, or `{}` for the global RNG: torch.compile cannot trace an
    explicit `generator=None` with dynamic sizes."""
    return {} if generator is None else {"generator": generator}


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


#: the most solver steps the prior takes (`num_inference_steps`, in the config and in `generate()`): the solvers
#: converge in tens of steps; a larger number is a typo that would run for hours or allocate gigabytes
MAX_INFERENCE_STEPS = 10_000


def check_inference_steps(name: str, value) -> None:
    """A `ValueError` naming `name` unless `value` is an integer in [1, MAX_INFERENCE_STEPS]."""
    if not (is_int(value) and 1 <= value <= MAX_INFERENCE_STEPS):
        raise ValueError(f"`{name}` must be an integer in [1, {MAX_INFERENCE_STEPS}], got {value!r}")


def check_nonnegative_number(name: str, value) -> None:
    """A `ValueError` naming `name` unless `value` is a finite int or float >= 0 (bools and NaN refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")


__all__ = ["CACHE_NAME", "COMPILED_TRAINING_MIN_TRANSFORMERS", "MAX_INFERENCE_STEPS", "TESTED_TRANSFORMERS",
           "accepts_past_key_values", "check_inference_steps", "check_nonnegative_number", "check_transformers_version", "compiled_training_problem", "generator_kwargs",
           "is_int", "pop_cache"]
