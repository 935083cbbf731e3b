"""`generate()`'s inputs and decoding path: validation of its arguments, the choice between transformers' loop and
the captured step, and the captured step itself (one CUDA graph per decoding step).

transformers' sampling loop (`GenerationMixin._sample`) costs the host several milliseconds per token even when the
decoder is compiled on a static cache: preparing the inputs, updating the keyword arguments, running each logits
processor and the stopping criteria as separate eager kernels, where the GPU work of a small model's step is a
fraction of that (docs/performance.md). Here the whole step — the decoder on transformers' static cache, the logits
processors, the token choice and the end-of-sequence bookkeeping — is one function compiled with
`mode="reduce-overhead"` (one CUDA-graph replay per token), and the host reads the result back only every
`SYNC_EVERY` steps, to stop once every row has ended (the steps run past the end are cut from the output and their
random draws undone: see `decode`).

It serves greedy search and multinomial sampling with the processors listed in `processor_specs` (temperature,
top-k, top-p, min-p, forced EOS, minimum lengths: those of the default generation config and of the paper's
top-k / top-p sampling) and the max-length / EOS stopping criteria. Anything else — streamers, `output_scores`,
repetition penalties, `synced_gpus`, custom criteria, a cache passed in — goes through transformers' own loop as
transformers sets it up. The processors below are transformers' arithmetic and the token choice is the same
`torch.multinomial` / `argmax`, drawing the same random numbers; what that guarantees: in float32, with given
latents and the same seed, the tokens equal transformers' loop's (tested on the CPU, eager and compiled, and on
CUDA by tests/test_cuda.py), and so does the global RNG state after the call. In bf16 the compiled kernels round
differently from eager ones, and a sampled row parts from transformers' loop after a near tie: equal tokens are not
guaranteed there (docs/performance.md gives the share of equal rows).
"""

import copy
import functools
import math

import torch
from transformers.generation.logits_process import (
    ForcedEOSTokenLogitsProcessor,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from .utils_dior import CACHE_NAME, check_inference_steps, check_nonnegative_number, is_int

SYNC_EVERY = 8  # decoding steps between two looks of the host at "has every row ended?"

# generation modes that run a second model or re-feed drafted tokens: their candidates would need the same latent
UNSUPPORTED_GENERATE_ARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")

# The prior's sampling settings, read by `generate()` from its keywords, else from the `GenerationConfig` (passed, or
# the model's: generation_config.json), else from the model's config.
PRIOR_GENERATION_SETTINGS = ("num_inference_steps", "prior_guidance_scale", "prior_temperature")

# the model keyword arguments `generate()` hands its decoding loop that the captured step knows
CAPTURED_STEP_KWARGS = {"encoder_outputs", "attention_mask", "latent_slots", CACHE_NAME, "use_cache"}


def prior_settings(model, generation_config, **values) -> tuple:
    """`PRIOR_GENERATION_SETTINGS` in that order: each keyword's value, else the attribute of `generation_config`,
    else of `model.generation_config`, else None (the prior then reads `model.config`)."""
    resolved = []
    for name in PRIOR_GENERATION_SETTINGS:
        value = values[name]
        for source in (generation_config, model.generation_config):
            if value is None and source is not None:
                value = getattr(source, name, None)
        resolved.append(value)
    return tuple(resolved)


def override_generation(generation_config, kwargs, **overrides):
    """Settings `generate()` imposes on transformers' loop: in `kwargs` when no `generation_config` was passed (or the
    caller passed that keyword too), otherwise on a copy of `generation_config`, since transformers deprecates a
    `generation_config` together with generation keywords. Returns the config to pass on."""
    if generation_config is not None and any(name not in kwargs for name in overrides):
        generation_config = copy.deepcopy(generation_config)
    for name, value in overrides.items():
        if generation_config is None or name in kwargs:
            kwargs[name] = value
        else:
            setattr(generation_config, name, value)
    return generation_config


def repeat_rows(tensors, repeats: int):
    """Each row `repeats` times in a row (`repeat_interleave`), for a tensor or a tuple of tensors (None stays)."""
    if tensors is None:
        return None
    if isinstance(tensors, torch.Tensor):
        return tensors.repeat_interleave(repeats, dim=0)
    return tuple(repeat_rows(t, repeats) for t in tensors)


def validate_generate_inputs(model, input_ids, attention_mask, latents, generation_config, num_inference_steps,
                             prior_guidance_scale, prior_temperature, kwargs) -> None:
    """`generate()`'s own arguments: a `ValueError` that names the argument and the value, not a silent default or a
    bare `IndexError` deep in the model."""
    config = model.config
    for name in UNSUPPORTED_GENERATE_ARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"`{name}` is not supported by Dior-CVAE: assisted and lookup decoding verify drafted "
                             "tokens with a second forward that would need the draft's latent")
    if input_ids is None and kwargs.get("encoder_outputs") is None:
        raise ValueError("`generate` needs `input_ids` (the context) or `encoder_outputs`")
    if input_ids is None and attention_mask is None:
        raise ValueError("pass `attention_mask` together with `encoder_outputs`")
    if num_inference_steps is not None:
        check_inference_steps("num_inference_steps", num_inference_steps)
    if prior_guidance_scale is not None:
        check_nonnegative_number("prior_guidance_scale", prior_guidance_scale)
    if prior_temperature is not None:
        check_nonnegative_number("prior_temperature", prior_temperature)
        if not config.has_latent:
            raise ValueError('`prior_temperature` was given, but this model has no latent (`prior_type="none"`)')
    if latents is not None and not config.has_latent:
        raise ValueError('`latents` were given, but this model has no latent (`prior_type="none"`)')
    settings = generation_config or model.generation_config
    for name in ("num_return_sequences", "max_new_tokens", "max_length"):
        value = kwargs.get(name, getattr(settings, name, None))
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    max_new_tokens = kwargs.get("max_new_tokens", getattr(settings, "max_new_tokens", None))
    if max_new_tokens is not None and max_new_tokens + 1 > config.max_position_embeddings:
        raise ValueError(f"`max_new_tokens` ({max_new_tokens}) + the decoder start token exceeds "
                         f"`max_position_embeddings` ({config.max_position_embeddings})")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int, torch.int16):
            raise ValueError(f"`input_ids` must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}")
        vocab = model.get_input_embeddings().num_embeddings
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(f"`input_ids` must lie in [0, {vocab}) (the vocabulary), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        check_length("context", "input_ids", input_ids, config.max_position_embeddings)
    if attention_mask is not None and input_ids is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"`attention_mask` shape {tuple(attention_mask.shape)} differs from `input_ids` shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask if attention_mask is not None else input_ids.ne(config.pad_token_id)
    if mask.numel():
        empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"empty context (no unmasked token) in batch row(s) {empty}")
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise ValueError(f"`latents` must be a floating-point tensor, got {getattr(latents, 'dtype', type(latents))}")
        if not torch.isfinite(latents).all():
            raise ValueError("`latents` contain NaN or infinite values")


def check_length(what: str, name: str, ids, max_length: int) -> None:
    """A `ValueError` if the (B, T) `ids` are longer than the model's position table."""
    if ids is not None and ids.shape[-1] > max_length:
        raise ValueError(f"{what} of {ids.shape[-1]} tokens (`{name}`) is longer than `max_position_embeddings` "
                         f"({max_length}); truncate it" + (" (keep the most recent turns)" if what == "context" else ""))


def check_latents(latents: torch.Tensor, batch_size: int, config) -> None:
    expected = (batch_size, config.encoder_layers, config.latent_size)
    if tuple(latents.shape) != expected:
        raise ValueError(f"`latents` must have shape {expected} (batch, layers, latent_size), got {tuple(latents.shape)}")


def captures_decoding(model, generation_config) -> bool:
    """The captured step (one CUDA graph per token) is for CUDA, unless `disable_compile`."""
    return model.device.type == "cuda" and not generation_config.disable_compile


def captured_step_plan(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus,
                       streamer, model_kwargs) -> tuple | None:
    """The one decision of the decoding path, taken in `_sample`: (processor specs, stopping plan) where the captured
    step serves the call (on CUDA: `captures_decoding`; the processors and criteria it knows, no streamer or per-step
    outputs, no cache passed in and no cache implementation but "static"), else None: transformers' loop, with the
    cache transformers made for it and the memory as encoded."""
    specs = processor_specs(logits_processor)
    stopping = stopping_plan(stopping_criteria)
    cache = model_kwargs.get(CACHE_NAME)
    graphable = (
        captures_decoding(model, generation_config)
        and specs is not None and stopping is not None and not synced_gpus and streamer is None
        and not generation_config.return_dict_in_generate and input_ids.shape[1] == 1
        and set(model_kwargs) <= CAPTURED_STEP_KWARGS and model_kwargs.get("use_cache", True)
        and generation_config.cache_implementation in (None, "static")
        and not getattr(cache, "_is_user_defined", False)
    )
    return (specs, stopping) if graphable else None


def captured_step_inputs(model, input_ids, generation_config, model_kwargs: dict) -> dict:
    """`model_kwargs` for the captured step: the memory padded to a length bucket (the step is compiled per memory
    length: a few buckets instead of one graph per context length) and a static cache of its own."""
    memory, memory_mask = pad_memory_to_bucket(model_kwargs["encoder_outputs"], model_kwargs["attention_mask"],
                                               model.config.max_position_embeddings)
    model_kwargs = {**model_kwargs, "encoder_outputs": memory, "attention_mask": memory_mask}
    max_cache_len = max(generation_config.max_length - 1, getattr(generation_config, "max_cache_len", None) or 0)
    model_kwargs[CACHE_NAME] = model._prepare_static_cache("static", input_ids.shape[0], max_cache_len, None,
                                                           model_kwargs)
    return model_kwargs


def _token_ids(ids) -> tuple:
    return tuple(int(i) for i in torch.as_tensor(ids).flatten().tolist())


def processor_specs(logits_processor) -> tuple | None:
    """transformers' logits processors as hashable specs the captured step applies in the same order, or None if one
    of them is not supported here (then transformers' loop decodes)."""
    specs = []
    for p in logits_processor:
        kind = type(p)
        if kind is TemperatureLogitsWarper:
            specs.append(("temperature", float(p.temperature)))
        elif kind is TopKLogitsWarper:
            specs.append(("top_k", int(p.top_k), float(p.filter_value)))
        elif kind is TopPLogitsWarper:
            specs.append(("top_p", float(p.top_p), float(p.filter_value), int(p.min_tokens_to_keep)))
        elif kind is MinPLogitsWarper:
            specs.append(("min_p", float(p.min_p), float(p.filter_value), int(p.min_tokens_to_keep)))
        elif kind is ForcedEOSTokenLogitsProcessor:
            specs.append(("forced_eos", int(p.max_length), _token_ids(p.eos_token_id)))
        elif kind is MinLengthLogitsProcessor:  # "no EOS while the sequence is shorter than min_length"
            specs.append(("no_eos_below", int(p.min_length), _token_ids(p.eos_token_id)))
        elif kind is MinNewTokensLengthLogitsProcessor:
            specs.append(("no_eos_below", int(p.prompt_length_to_skip + p.min_new_tokens), _token_ids(p.eos_token_id)))
        else:
            return None
    return tuple(specs)


def stopping_plan(stopping_criteria) -> tuple[int, tuple] | None:
    """(max_length, eos token ids) from transformers' criteria, or None if any other criterion is present."""
    max_length, eos = None, ()
    for criterion in stopping_criteria:
        if type(criterion) is MaxLengthCriteria:
            max_length = int(criterion.max_length)
        elif type(criterion) is EosTokenCriteria:
            eos = _token_ids(criterion.eos_token_id)
        else:
            return None
    return None if max_length is None else (max_length, eos)


def _is_any(ids: torch.Tensor, token_ids: tuple) -> torch.Tensor:
    """`ids` ∈ `token_ids`, elementwise, by comparisons with Python ints: no tensor is built from host data, which
    a CUDA graph could not replay."""
    hit = torch.zeros_like(ids, dtype=torch.bool)
    for token_id in token_ids:
        hit = hit | (ids == token_id)
    return hit


def _vocab_mask(scores: torch.Tensor, token_ids: tuple) -> torch.Tensor:
    return _is_any(torch.arange(scores.shape[-1], device=scores.device), token_ids)


def _cumsum(values: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """`values.cumsum(-1)` for (B, V) as a scan within chunks of `chunk` plus a scan of the chunk totals: inductor
    cannot generate code for its one-pass split scan over a 50 k vocabulary at large batch sizes. Equal to the direct
    scan up to float rounding (the order of the additions)."""
    batch, vocab = values.shape
    chunks = -(-vocab // chunk)
    within = torch.nn.functional.pad(values, (0, chunks * chunk - vocab)).view(batch, chunks, chunk).cumsum(-1)
    totals = within[..., -1]
    offsets = totals.cumsum(-1) - totals  # the sum of the chunks before each one
    return (within + offsets[..., None]).view(batch, chunks * chunk)[:, :vocab]


def apply_processors(specs: tuple, scores: torch.Tensor, cur_len: torch.Tensor) -> torch.Tensor:
    """transformers' processors on (B, V) float32 scores; `cur_len` is the 0-d length of the decoder ids so far (the
    `input_ids.shape[-1]` the length-dependent processors read), a tensor so that one graph serves every step."""
    for spec in specs:
        kind = spec[0]
        if kind == "temperature":
            scores = scores / spec[1]
        elif kind == "top_k":
            top_k = min(spec[1], scores.size(-1))
            scores = scores.masked_fill(scores < torch.topk(scores, top_k)[0][..., -1, None], spec[2])
        elif kind == "top_p":
            _, top_p, filter_value, keep = spec
            sorted_logits, sorted_indices = torch.sort(scores, descending=False)
            cumulative_probs = _cumsum(sorted_logits.softmax(dim=-1))
            sorted_to_remove = cumulative_probs <= (1 - top_p)
            sorted_to_remove[..., -keep:] = 0
            scores = scores.masked_fill(sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove), filter_value)
        elif kind == "min_p":
            _, min_p, filter_value, keep = spec
            probs = torch.softmax(scores, dim=-1)
            to_remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
            to_remove.scatter_(-1, torch.topk(probs, min(keep, probs.shape[-1]), dim=-1).indices, False)
            scores = scores.masked_fill(to_remove, filter_value)
        elif kind == "forced_eos":  # at length max_length - 1 only EOS may follow
            forced = torch.where(_vocab_mask(scores, spec[2]), 0.0, -math.inf).to(scores.dtype).expand_as(scores)
            scores = torch.where(cur_len == spec[1] - 1, forced, scores)
        elif kind == "no_eos_below":
            scores = torch.where(_vocab_mask(scores, spec[2]) & (cur_len < spec[1]), -math.inf, scores)
        else:  # pragma: no cover - processor_specs only makes the kinds above
            raise ValueError(f"unknown processor spec {spec!r}")
    return scores


def decoding_step(model, tokens, memory, memory_mask, latent_slots, cache, unfinished, specs: tuple,
                  do_sample: bool, pad_token_id: int, eos: tuple):
    """One step for every row: the decoder reads `tokens` (B,) at the static cache's current position, writes its
    keys / values there, and the next tokens (B,) and the rows still unfinished (B,) come back."""
    self_cache = cache.self_attention_cache.layers[0]
    position = self_cache.cumulative_length.to(tokens.device, copy=True)  # tokens cached so far (0-d; the forward adds 1)
    max_cache_len = self_cache.max_cache_len
    visible = torch.arange(max_cache_len, device=tokens.device) <= position  # causal mask over the static cache
    outputs = model(
        decoder_input_ids=tokens[:, None],
        encoder_outputs=(memory,),
        attention_mask=memory_mask,
        latent_slots=latent_slots,
        decoder_attention_mask=visible.expand(tokens.shape[0], 1, 1, max_cache_len),
        use_cache=True,
        **{CACHE_NAME: cache},
    )
    scores = apply_processors(specs, outputs.logits[:, -1].float(), position + 1)
    if do_sample:
        next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    else:
        next_tokens = torch.argmax(scores, dim=-1)
    next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
    if eos:
        unfinished = unfinished & ~_is_any(next_tokens, eos)
    return next_tokens, unfinished


def length_bucket(length: int, max_length: int, minimum: int = 32) -> int:
    """The padded length of a compiled shape: the next power of two ≥ `length` (at least `minimum`, at most
    `max_length`), so that sequences of every length share a few graphs."""
    return min(max(minimum, 1 << (length - 1).bit_length()), max_length)


def pad_memory_to_bucket(memory, memory_mask, max_length: int):
    """Pad the encoder memory (a `BaseModelOutput`) and its mask (B, S) with masked positions to the next power of two
    ≥ 32 (at most `max_length`): the captured step is compiled per memory length, and contexts of every length would
    otherwise each compile their own graph. Masked positions get zero attention weight."""
    states = memory.last_hidden_state
    length = states.shape[1]
    bucket = length_bucket(length, max(length, max_length))
    if bucket == length:
        return memory, memory_mask
    padding = bucket - length
    memory = type(memory)(**{**memory, "last_hidden_state": torch.nn.functional.pad(states, (0, 0, 0, padding))})
    return memory, torch.nn.functional.pad(memory_mask, (0, padding))


@functools.cache
def compiled_decoding_step():
    """`decoding_step` compiled once per process (torch.compile keeps one graph per model, shape and setting), as
    `mode="reduce-overhead"` (CUDA graphs) with inductor emulating every low-precision cast: fused kernels otherwise
    keep float32 intermediates where eager rounds to bf16 (the logits above all), and in a bf16 model sampled tokens
    then part from transformers' loop (docs/performance.md)."""
    return torch.compile(decoding_step, fullgraph=False, dynamic=False,
                         options={"triton.cudagraphs": True, "emulate_precision_casts": True})


def _rng_state(device: torch.device) -> torch.Tensor:
    """The global RNG state of `device` (host-side: no synchronisation on CUDA)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def decode(model, input_ids, model_kwargs: dict, specs: tuple, stopping: tuple, do_sample: bool, pad_token_id: int,
           step=None) -> torch.LongTensor:
    """Decode from `input_ids` (B, 1: the decoder start) to at most `max_length` tokens with the static cache in
    `model_kwargs`; returns (B, T) like transformers' loop: rows that ended are padded, and the sequences stop after
    the first step at which every row has ended. `step`: the step function for steps after the first (default: the
    compiled one); the first step, which fills the cross-attention cache, runs eagerly.

    The host looks at "has every row ended?" only every `SYNC_EVERY` steps, so up to `SYNC_EVERY - 1` steps run
    after the last row ended; when sampling, the global RNG is then set back to its state after the step that ended
    the last row, so that it has drawn exactly what transformers' loop draws (the next call, and any later draw,
    sees the same random numbers under either loop)."""
    max_length, eos = stopping
    step = compiled_decoding_step() if step is None else step
    cache = model_kwargs[CACHE_NAME]
    memory = model_kwargs["encoder_outputs"][0]
    memory_mask, latent_slots = model_kwargs.get("attention_mask"), model_kwargs.get("latent_slots")
    tokens = input_ids[:, -1]
    unfinished = torch.ones_like(tokens, dtype=torch.bool)
    generated, alive, rng_states = [], [], []
    for index in range(max_length - input_ids.shape[1]):
        run = decoding_step if index == 0 else step
        tokens, unfinished = run(model, tokens, memory, memory_mask, latent_slots, cache, unfinished, specs,
                                 do_sample, pad_token_id, eos)
        tokens, unfinished = tokens.clone(), unfinished.clone()  # a graph's outputs are overwritten by its next replay
        generated.append(tokens)
        alive.append(unfinished)
        if do_sample:
            rng_states.append(_rng_state(tokens.device))
        if (index + 1) % SYNC_EVERY == 0 and not bool(unfinished.any()):
            break
    ended = (~torch.stack(alive)).all(dim=1).nonzero()  # steps after which every row had ended
    steps = int(ended[0]) + 1 if ended.numel() else len(generated)
    if do_sample and steps < len(generated):
        _set_rng_state(rng_states[steps - 1], tokens.device)
    return torch.cat([input_ids, torch.stack(generated[:steps], dim=1)], dim=1)


__all__ = ["PRIOR_GENERATION_SETTINGS", "SYNC_EVERY", "apply_processors", "captured_step_inputs", "captured_step_plan", "captures_decoding",
           "check_latents",
           "check_length", "compiled_decoding_step", "decode", "decoding_step",
           "override_generation", "pad_memory_to_bucket", "prior_settings", "processor_specs", "repeat_rows",
           "stopping_plan", "validate_generate_inputs"]
