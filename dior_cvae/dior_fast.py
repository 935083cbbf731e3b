"""Opt-in fast paths for generation: static-cache support for the latent slot, and a CUDA-graph replay of the
diffusion prior's sampling loop.

Nothing here changes the default (eager, dynamic-cache) behaviour. Two independent pieces:

* `fit_static_cross_cache`: the cross-attention cache of a latent-infused layer holds [slot; encoder states], one
  position more than transformers sizes a `StaticCache` for (`encoder_outputs[0].shape[1]`). `LatentSlotAttention`
  calls this before the first write so the layer allocates one position more. With it,
  `model.generate(..., cache_implementation="static")` works, and so does transformers' automatic `torch.compile` of
  the decoding step (on CUDA with a static cache; see `GenerationConfig.compile_config`).
* `GraphedPriorSampler` / `enable_graphed_prior`: records `DiffusionPrior.sample` (all steps, noise draws included)
  in one CUDA graph per (batch size, dtype, steps, guidance) and replays it. The random draws use the global CUDA
  generator, whose philox offsets graphs advance exactly as the eager loop does, so a replay after
  `torch.manual_seed(s)` draws the same latents as the eager loop after `torch.manual_seed(s)`.

This module imports nothing from the package at import time (modeling files import it).
"""

import torch


def fit_static_cross_cache(cache, layer_idx: int, length: int) -> None:
    """Let a not yet allocated static cache layer hold `length` positions (no-op for dynamic caches).

    `StaticLayer` allocates `max_cache_len` positions lazily on its first `update`; transformers sizes the cross
    attention one to the encoder length, but a latent-infused layer stores the slot in front of it.
    """
    layer = cache.layers[layer_idx] if layer_idx < len(getattr(cache, "layers", ())) else None
    if layer is None or getattr(layer, "is_initialized", True):
        return
    max_cache_len = getattr(layer, "max_cache_len", None)
    if max_cache_len is not None and max_cache_len < length:
        layer.max_cache_len = length
