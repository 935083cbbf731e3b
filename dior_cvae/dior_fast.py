"""Opt-in fast paths for Dior-CVAE generation. Nothing here changes the default (eager, dynamic-cache) tokens.

Usage (CUDA; the defaults stay the eager path)::

    from dior_cvae.dior_fast import enable_fast_prior, graphed_decoding
    enable_fast_prior(model)                                    # prior loop: one CUDA graph
    out = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=40,
                         custom_generate=graphed_decoding)      # decoding: one CUDA graph per position
    # add compile_step=True / enable_fast_prior(model, compile=True) to torch.compile the steps before recording

1. Latent slot with any cache. A latent-infused cross-attention layer caches [slot; encoder states], one position
   more than transformers sizes a `StaticCache` for; `LatentSlotAttention` calls `fit_static_cross_cache` before
   the first write, so `generate(..., cache_implementation="static")` works, and so does transformers' automatic
   `torch.compile` of the decoding step (CUDA + static cache; `GenerationConfig.compile_config`). The self-attention
   slot's key/value is projected once per cache and kept beside it (`slot_stash`), like the cross-attention slot;
   `latent_memory_needed(past_key_values)` tells `forward` when it may skip `_latent_memory` as well.

2. `graphed_decoding`: a drop-in decoding loop for `generate(custom_generate=graphed_decoding)` (greedy and
   multinomial sampling). It runs the steps of transformers' `_sample` (same model inputs, the very logits
   processor and stopping criteria objects, the same random draws) on a static cache and, on CUDA, records the
   prefill and every decoding position once as CUDA graphs (one per position: the processors look at the current
   length), then replays them: one host call per token, no host sync before the end (or, with EOS possible, one
   per step). Elsewhere (or `use_cuda_graph=False`) the same step functions run eagerly, which the CPU tests
   compare with `generate()`. Token selection uses the identity behind `torch.multinomial(probs, 1)`
   (`argmax(probs / Exp(1))`, the draws multinomial itself makes) without its host-side validity checks, which a
   graph cannot contain.

3. `FastPriorSampler` / `enable_fast_prior(model)`: a drop-in for `DiffusionPrior.sample` that hoists everything that
   does not depend on z_t out of the step loop (time MLP of every timestep, condition MLP, their input projection;
   the z_t projection serves the guided and unguided branches), with the same random draws as the eager loop; on
   CUDA the whole loop (noise draws included, global CUDA generator) is recorded once per (batch, dtype, steps,
   guidance) as one CUDA graph and replayed. Equal to `DiffusionPrior.sample` up to float rounding (the hoisted
   matmuls sum in a different order).

This module imports nothing from the package at import time (modeling files import it).
"""

import torch
import torch.nn.functional as F

# ---- 1. static cache ----------------------------------------------------------------------------------------------


def fit_static_cross_cache(cache, layer_idx: int, length: int) -> None:
    """Let a not yet allocated static cache layer hold `length` positions (no-op for dynamic caches).

    `StaticLayer` allocates `max_cache_len` positions lazily on its first `update`; transformers sizes the cross
    attention one to the encoder length, but a latent-infused layer stores the slot in front of it.
    """
    layers = getattr(cache, "layers", ())
    if layer_idx >= len(layers):
        return
    layer = layers[layer_idx]
    if getattr(layer, "is_initialized", True):
        return
    max_cache_len = getattr(layer, "max_cache_len", None)
    if max_cache_len is not None and max_cache_len < length:
        layer.max_cache_len = length


def slot_stash(past_key_values) -> dict:
    """Per-cache store of what the latent slot contributes, filled at the first step (when the cross-attention
    cache is filled) and reused by every later step of the same cache:
    ("self", layer) -> (key, value) of the self-attention slot, (B, heads, 1, head_dim) each;
    ("cross", layer) -> whether that layer's cross-attention cache starts with the slot."""
    stash = getattr(past_key_values, "_dior_slots", None)
    if stash is None:
        stash = {}
        past_key_values._dior_slots = stash
    return stash


def store_slot(stash: dict, key, tensors):
    """Keep `tensors` under `key`, writing into the stored tensors when their shapes match, so that their addresses
    (which a recorded CUDA graph reads) survive a cache reset."""
    old = stash.get(key)
    if (old is not None and not torch.is_grad_enabled()
            and all(o.shape == t.shape and o.dtype == t.dtype and o.device == t.device for o, t in zip(old, tensors))):
        for o, t in zip(old, tensors):
            o.copy_(t)
        return old
    stash[key] = tensors
    return tensors


def shared_slot_mask(stash, build, attention_mask, query_length: int, key_length: int, causal: bool, reference):
    """`build(attention_mask, ...)` (the mask with the slot's column), once per forward instead of once per layer:
    every layer gets the same mask object from the decoder, so the result is kept in the stash keyed by it."""
    if stash is None or attention_mask is None or torch.compiler.is_compiling():
        return build(attention_mask, query_length, key_length, causal, reference)
    entry = stash.get(("mask", causal))
    if entry is not None and entry[0] is attention_mask and entry[1] == (query_length, key_length):
        return entry[2]
    mask = build(attention_mask, query_length, key_length, causal, reference)
    stash[("mask", causal)] = (attention_mask, (query_length, key_length), mask)
    return mask


def latent_memory_needed(past_key_values) -> bool:
    """False once a cache holds the slot of every layer (after the first step): `forward` may then skip projecting
    the latents (`latent_memory=None`) at every later step."""
    updated = getattr(past_key_values, "is_updated", None)
    return not updated or not all(updated.values()) or getattr(past_key_values, "_dior_slots", None) is None


def _make_static_cache(model, max_cache_len: int, encoder_length: int):
    from transformers import EncoderDecoderCache, StaticCache

    config = model.config.get_text_config(decoder=True)
    return EncoderDecoderCache(
        StaticCache(config=config, max_cache_len=max_cache_len),
        StaticCache(config=config, max_cache_len=encoder_length),  # + 1 for the slot: `fit_static_cross_cache`
    )


def _reset_static_cache(cache):
    """Rewind a static `EncoderDecoderCache` without touching its buffers (their addresses are baked into graphs).

    Stale self-attention entries are masked by position; the cross-attention entries are rewritten by the prefill."""
    for sub in (cache.self_attention_cache, cache.cross_attention_cache):
        for layer in sub.layers:
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()
    for layer_idx in cache.is_updated:
        cache.is_updated[layer_idx] = False


# ---- 2. graphed decoding ------------------------------------------------------------------------------------------


def _signature(obj):
    """A hashable description of a logits processor / stopping criterion (its type and scalar settings)."""
    items = []
    for name, value in sorted(vars(obj).items()):
        if isinstance(value, torch.Tensor):
            value = ("tensor", str(value.dtype), tuple(value.flatten().tolist())) if value.numel() <= 64 else id(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, bool, str)) for v in value):
            value = tuple(value)
        elif not isinstance(value, (int, float, bool, str, type(None))):
            value = ("object", type(value).__qualname__)
        items.append((name, value))
    return type(obj).__qualname__, tuple(items)


class _DecodeState:
    """Static buffers, cache, processors and (on CUDA) graphs for one (shapes, decoding settings) combination."""

    def __init__(self, model, batch, prompt_length, max_length, encoder_states, latents, logits_processor,
                 stopping_criteria, generation_config, compile_step=False):
        device = encoder_states.device
        self.model = model
        self.prompt_length, self.max_length = prompt_length, max_length
        self.cache = _make_static_cache(model, max_length - 1, encoder_states.shape[1])
        self.encoder_states = torch.zeros_like(encoder_states)
        self.encoder_mask = torch.ones(encoder_states.shape[:2], dtype=torch.long, device=device)
        self.latents = torch.zeros_like(latents)
        self.ids = torch.zeros(batch, max_length, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # fed to a compiled step
        self.decoder_mask = torch.ones(batch, max_length, dtype=torch.long, device=device)
        self.unfinished = torch.ones(batch, dtype=torch.long, device=device)
        self.stop_length = torch.zeros((), dtype=torch.long, device=device)
        # the objects the graphs were recorded with stay alive (their tensors are read by address)
        self.logits_processor, self.stopping_criteria = logits_processor, stopping_criteria
        self.do_sample = bool(generation_config.do_sample)
        self.has_eos = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
        pad = generation_config._pad_token_tensor
        self.pad = None if pad is None else pad.to(device)
        # the last length at which no row can have stopped yet (EOS is blocked): no need to look before it
        self.first_check = prompt_length
        known = all(type(c).__name__ in ("MaxLengthCriteria", "EosTokenCriteria") for c in stopping_criteria)
        for processor in logits_processor if known else ():
            if hasattr(processor, "min_new_tokens"):
                self.first_check = max(self.first_check, processor.prompt_length_to_skip + processor.min_new_tokens)
            elif hasattr(processor, "min_length") and hasattr(processor, "eos_token_id"):
                self.first_check = max(self.first_check, processor.min_length)
        self.compiled_step = None
        if compile_step:
            backend = compile_step if isinstance(compile_step, str) else "inductor"
            self.compiled_step = torch.compile(self._step_logits, backend=backend, fullgraph=True, dynamic=False)
        self.graphs = None
        self.graph_error = None

    def load(self, input_ids, encoder_states, encoder_mask, latents):
        self.encoder_states.copy_(encoder_states)
        self.encoder_mask.copy_(encoder_mask)
        self.latents.copy_(latents)
        self.ids[:, : self.prompt_length].copy_(input_ids)
        self.unfinished.fill_(1)
        self.stop_length.zero_()
        _reset_static_cache(self.cache)

    def _forward(self, start: int, length: int):
        from transformers.modeling_outputs import BaseModelOutput

        # exactly the inputs `prepare_inputs_for_generation` gives, plus the all-ones decoder mask that BART's decoder
        # would otherwise build from the cache length (a host read, not allowed while recording a graph)
        return self.model(
            decoder_input_ids=self.ids[:, start:length],
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states),
            attention_mask=self.encoder_mask,
            decoder_attention_mask=self.decoder_mask[:, :length],
            latents=self.latents,
            past_key_values=self.cache,
            use_cache=True,
            return_dict=True,
        ).logits

    def _step_logits(self):
        """One decoding step from `self.token`, for torch.compile: shapes do not depend on the position (under
        dynamo BART builds no decoder mask; the static cache's causal mask covers it, as in transformers' own
        compiled decoding)."""
        from transformers.modeling_outputs import BaseModelOutput

        return self.model(
            decoder_input_ids=self.token,
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoder_states),
            attention_mask=self.encoder_mask,
            latents=self.latents,
            past_key_values=self.cache,
            use_cache=True,
            return_dict=True,
        ).logits

    def _select(self, logits, length: int):
        """Token `length` from the logits at position `length - 1`: transformers' `_sample` body, sync-free."""
        logits = logits[:, -1].to(copy=True, dtype=torch.float32)
        scores = self.logits_processor(self.ids[:, :length], logits)
        if self.do_sample:
            probs = F.softmax(scores, dim=-1)
            # = torch.multinomial(probs, 1): the same Exp(1) draws and arg-max, minus its host-side checks
            next_tokens = (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        if self.has_eos:
            next_tokens = next_tokens * self.unfinished + self.pad * (1 - self.unfinished)
        self.ids[:, length].copy_(next_tokens)
        done = self.stopping_criteria(self.ids[:, : length + 1], None)
        self.unfinished.copy_(self.unfinished & ~done)
        finished_now = (self.unfinished.max() == 0) & (self.stop_length == 0)
        self.stop_length.copy_(torch.where(finished_now, length + 1, self.stop_length))

    def prefill(self):
        """Feed the prompt (fills the cross-attention cache and the slot stash), write token `prompt_length`."""
        self._select(self._forward(0, self.prompt_length), self.prompt_length)

    def step(self, length: int):
        """Feed token `length - 1`, write token `length`."""
        if self.compiled_step is not None:
            self.token.copy_(self.ids[:, length - 1 : length])
            logits = self.compiled_step()
        else:
            logits = self._forward(length - 1, length)
        self._select(logits, length)

    def run(self, length: int):
        if self.graphs is not None:
            self.graphs[length].replay()
        elif length == self.prompt_length:
            self.prefill()
        else:
            self.step(length)

    def record(self, input_ids, encoder_states, encoder_mask, latents):
        """Record one CUDA graph per position: the prefill (`prompt_length`) and every decoding step."""
        self.load(input_ids, encoder_states, encoder_mask, latents)
        self.prefill()  # allocates the static cache and the slot stash, which the graphs then read
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: cuBLAS/SDPA workspaces, compilation
            for length in range(self.prompt_length + 1, min(self.prompt_length + 3, self.max_length)):
                self.step(length)
        torch.cuda.current_stream().wait_stream(stream)
        self.load(input_ids, encoder_states, encoder_mask, latents)  # is_updated = False: record the prefill path
        graphs, pool = {}, None
        for length in range(self.prompt_length, self.max_length):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                if length == self.prompt_length:
                    self.prefill()
                else:
                    self.step(length)
            pool = graph.pool()
            graphs[length] = graph
        self.graphs = graphs

    def decode(self) -> torch.LongTensor:
        for length in range(self.prompt_length, self.max_length):
            if length > self.first_check and int(self.stop_length) > 0:
                break
            self.run(length)
        stop = int(self.stop_length)
        return self.ids[:, : stop or self.max_length].clone()


def _decoder_states(model):
    states = getattr(model, "_dior_decode_states", None)
    if states is None:
        states = {}
        model._dior_decode_states = states  # not a module/parameter: plain attribute
    return states


def graphed_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config,
                     use_cuda_graph: bool | None = None, compile_step: bool | str = False, **model_kwargs):
    """Decoding loop for `model.generate(..., custom_generate=graphed_decoding)`: greedy or sampling, same tokens
    as the default loop under the same seed.

    use_cuda_graph (default: on CUDA): record one CUDA graph per position (prefill included) on the first call, and
        replay them; graphs and the static cache are kept on the model per (batch, prompt, max_length, encoder
        length, dtype, decoding settings) and reused by later calls (`clear_fast_states(model)` frees them).
    compile_step (default False): also `torch.compile` the decoding step (a backend name, or True for inductor)
        before recording; fewer, fused kernels per token, at a compile per new state. Its rounding differs from the
        eager step's, so sampled tokens can differ in low precision.
    Both are `generate` keyword arguments. Falls back to transformers' `_sample` for what it does not cover
    (`return_dict_in_generate`, a user cache, no `latents`); beams are refused.
    """
    from transformers.generation.utils import GenerationMixin

    encoder_outputs = model_kwargs.get("encoder_outputs")
    latents = model_kwargs.get("latents")
    if generation_config.num_beams > 1 or getattr(generation_config, "num_beam_groups", 1) > 1:
        raise ValueError("`graphed_decoding` does greedy search or sampling only; drop `custom_generate` for beams")
    user_cache = getattr(model_kwargs.get("past_key_values"), "_is_user_defined", False)
    if (generation_config.return_dict_in_generate or user_cache or latents is None or encoder_outputs is None
            or not model_kwargs.get("use_cache", True)):
        return GenerationMixin._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                       **model_kwargs)
    max_length = stopping_criteria.max_length
    if max_length is None:
        raise ValueError("`graphed_decoding` needs `max_length` / `max_new_tokens`")
    encoder_states = encoder_outputs[0]
    encoder_mask = model_kwargs.get("attention_mask")
    if encoder_mask is None:
        encoder_mask = torch.ones(encoder_states.shape[:2], dtype=torch.long, device=encoder_states.device)
    batch, prompt_length = input_ids.shape
    if use_cuda_graph is None:
        use_cuda_graph = input_ids.device.type == "cuda"
    if prompt_length >= max_length:
        return input_ids

    key = (
        batch, prompt_length, max_length, tuple(encoder_states.shape), encoder_states.dtype, str(input_ids.device),
        latents.dtype, bool(use_cuda_graph), compile_step, bool(generation_config.do_sample),
        tuple(_signature(p) for p in logits_processor), tuple(_signature(c) for c in stopping_criteria),
        None if generation_config._pad_token_tensor is None else int(generation_config._pad_token_tensor),
    )
    states = _decoder_states(model)
    state = states.get(key)
    if state is None:
        state = _DecodeState(model, batch, prompt_length, max_length, encoder_states, latents, logits_processor,
                             stopping_criteria, generation_config, compile_step)
        states[key] = state
        if use_cuda_graph:
            rng = torch.cuda.get_rng_state(input_ids.device)
            errors = []
            for attempt in ("as asked", "without compile"):
                try:
                    state.record(input_ids, encoder_states, encoder_mask, latents)
                    break
                except Exception as error:  # keep working (without compile, then without graphs), say why
                    errors.append(f"{attempt}: {type(error).__name__}: {error}"[:500])
                    state.graphs = None
                    torch.cuda.synchronize()
                    if state.compiled_step is None:
                        break
                    state.compiled_step = None
            state.graph_error = "; ".join(errors) or None
            torch.cuda.set_rng_state(rng, input_ids.device)
    state.load(input_ids, encoder_states, encoder_mask, latents)
    return state.decode()


def graph_status(model) -> dict:
    """For benchmarks: how many decoding states are cached and why recording failed, if it did."""
    states = getattr(model, "_dior_decode_states", {}) or {}
    return {
        "decode_states": len(states),
        "decode_graphs": sum(len(s.graphs or ()) for s in states.values()),
        "decode_compiled_states": sum(s.compiled_step is not None for s in states.values()),
        "decode_graph_errors": sorted({s.graph_error for s in states.values() if s.graph_error}),
    }


# ---- 3. prior sampling --------------------------------------------------------------------------------------------


class FastPriorSampler:
    """Drop-in replacement for `DiffusionPrior.sample(condition, num_inference_steps, prior_guidance_scale,
    generator, initial_noise)`; see the module docstring.

    use_cuda_graph (default: on CUDA): record the whole loop as one CUDA graph per (batch, dtype, steps, guidance,
        sampler) and replay it, when no `generator`/`initial_noise` is given (the graph draws from the global CUDA
        generator, as the eager loop would).
    compile (default False): run each denoising step (denoiser + scheduler update; the noise is drawn outside it,
        eagerly, so the draws do not change) through torch.compile (a backend name, or True for inductor): one
        compilation, reused by every step; fewer, fused kernels per step.
    """

    def __init__(self, prior, use_cuda_graph: bool | None = None, compile: bool | str = False):
        self.prior = prior
        self.use_cuda_graph = use_cuda_graph
        self.compile = compile
        self._compiled_step = None
        self.graphs = {}
        self.graph_error = None
        self.compiled = False  # whether the recorded graphs run the compiled step
        self.record_errors = []

    # the loop, graph-agnostic ------------------------------------------------------------------------------------

    def _coefficients(self, dtype):
        """Per-step scheduler coefficients as host floats, rounded to `dtype` as the eager `step` rounds them."""
        return self.prior.scheduler._table.to(dtype).float().cpu().tolist()

    def _features(self, condition, guidance: float):
        """What does not depend on z_t, for every step at once: the time and condition features through the
        input projection, (S, branches, B, h); branch 0 conditional, branch 1 unconditional (with guidance)."""
        from .dior_prior import timestep_embedding

        prior = self.prior
        scheduler, denoiser = prior.scheduler, prior.denoiser
        batch, dtype, device = condition.shape[0], condition.dtype, condition.device
        latent_size, hidden_size = prior.config.total_latent_size, denoiser.time_mlp[0].in_features
        timesteps = scheduler.timesteps.to(device=device, dtype=dtype)  # no host-to-device copy: graph-safe
        time_features = timestep_embedding(timesteps * denoiser.time_scale, hidden_size).to(dtype)
        time_hidden = denoiser.time_mlp(time_features)  # (S, h)
        conditions = torch.cat([condition, torch.zeros_like(condition)]) if guidance else condition
        condition_hidden = denoiser.condition_mlp(conditions)  # (R, h), R = 2B with guidance
        weight, bias = denoiser.input_proj.weight, denoiser.input_proj.bias
        features = F.linear(time_hidden[:, None] + condition_hidden[None], weight[:, latent_size:], bias)
        return features.view(len(timesteps), 2 if guidance else 1, batch, -1)

    def _denoise(self, latents, features, guidance: float):
        """f(z_t, t, c) for one step from its precomputed features, guided: (B, E)."""
        denoiser = self.prior.denoiser
        latent_weight = denoiser.input_proj.weight[:, : latents.shape[-1]]
        hidden = (features + F.linear(latents, latent_weight)).flatten(0, 1)  # the z_t part serves both branches
        for block in denoiser.blocks:
            hidden = block(hidden)
        output = denoiser.output(hidden)
        if guidance:
            conditional, unconditional = output.chunk(2)
            output = torch.lerp(unconditional, conditional, 1 + guidance)  # (1 + w)·c − w·u
        return output

    def _needs_noise(self, index: int) -> bool:
        scheduler = self.prior.scheduler
        if scheduler.sampler == "ddpm":
            return index != scheduler.num_inference_steps - 1
        return scheduler.eta != 0

    @torch.no_grad()
    def loop(self, condition, steps: int, guidance: float, generator=None, initial_noise=None, coefficients=None):
        """The reverse process with host-float coefficients (fewest eager kernels); `steps` must be the scheduler's
        current `num_inference_steps`."""
        batch, dtype, device = condition.shape[0], condition.dtype, condition.device
        if coefficients is None:
            coefficients = self._coefficients(dtype)
        features = self._features(condition, guidance)
        latents = initial_noise
        if latents is None:
            shape = (batch, self.prior.config.total_latent_size)
            latents = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        for index, row in enumerate(coefficients):
            output = self._denoise(latents, features[index], guidance)
            latents = self._update(output, latents, row)
            if self._needs_noise(index):
                noise = torch.randn(latents.shape, generator=generator, device=device, dtype=dtype)
                latents = latents.add_(noise, alpha=row[5])
        return latents

    def _update(self, model_output, sample, row):
        """`DiorScheduler.step` without the noise, with host floats."""
        scheduler = self.prior.scheduler
        sqrt_alpha_bar, sqrt_beta_bar, coef_x0, coef_xt, coef_eps, _ = row
        if scheduler.prediction_type == "epsilon":
            pred_eps = model_output
            pred_x0 = torch.sub(sample, pred_eps, alpha=sqrt_beta_bar).div_(sqrt_alpha_bar)
        else:
            pred_x0 = model_output
            pred_eps = torch.sub(sample, pred_x0, alpha=sqrt_alpha_bar).div_(sqrt_beta_bar)
        if scheduler.clip_sample:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            pred_eps = torch.sub(sample, pred_x0, alpha=sqrt_alpha_bar).div_(sqrt_beta_bar)
        prev = pred_x0 * coef_x0
        if coef_xt:
            prev.add_(sample, alpha=coef_xt)
        if coef_eps:
            prev.add_(pred_eps, alpha=coef_eps)
        return prev

    def _tensor_step(self, latents, features, row, noise, guidance: float):
        """One whole step with the coefficients as a device tensor row (what gets compiled, once for all steps)."""
        scheduler = self.prior.scheduler
        output = self._denoise(latents, features, guidance)
        sqrt_alpha_bar, sqrt_beta_bar, coef_x0, coef_xt, coef_eps, std = row.unbind(0)
        if scheduler.prediction_type == "epsilon":
            pred_eps, pred_x0 = output, (latents - sqrt_beta_bar * output) / sqrt_alpha_bar
        else:
            pred_x0, pred_eps = output, (latents - sqrt_alpha_bar * output) / sqrt_beta_bar
        if scheduler.clip_sample:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            pred_eps = (latents - sqrt_alpha_bar * pred_x0) / sqrt_beta_bar
        prev = coef_x0 * pred_x0 + coef_xt * latents + coef_eps * pred_eps
        return prev if noise is None else prev + std * noise

    def compiled_step(self):
        if self._compiled_step is None:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            self._compiled_step = torch.compile(self._tensor_step, backend=backend, fullgraph=True, dynamic=False)
        return self._compiled_step

    @torch.no_grad()
    def compiled_loop(self, condition, steps: int, guidance: float, coefficients=None):
        """`loop` with each step through `compiled_step()`; the same random draws."""
        batch, dtype, device = condition.shape[0], condition.dtype, condition.device
        step = self.compiled_step()
        table = self.prior.scheduler._table.to(device=device, dtype=dtype)
        features = self._features(condition, guidance)
        latents = torch.randn((batch, self.prior.config.total_latent_size), device=device, dtype=dtype)
        for index in range(table.shape[0]):
            noise = torch.randn(latents.shape, device=device, dtype=dtype) if self._needs_noise(index) else None
            latents = step(latents, features[index], table[index], noise, guidance)
        return latents

    # the drop-in ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, condition, num_inference_steps=None, prior_guidance_scale=None, generator=None,
                 initial_noise=None):
        prior, config = self.prior, self.prior.config
        steps = num_inference_steps or config.num_inference_steps
        guidance = float(config.prior_guidance_scale if prior_guidance_scale is None else prior_guidance_scale)
        scheduler = prior.scheduler
        if (scheduler.sampler, scheduler.eta, scheduler.clip_sample, scheduler.prediction_type) != (
            config.sampler, config.ddim_eta, config.clip_sample, config.prediction_type
        ):  # the sampler settings were changed on the config, as `DiffusionPrior.sample` handles it
            from .scheduling_dior import DiorScheduler

            scheduler = prior.scheduler = DiorScheduler(config)
        if scheduler.num_inference_steps != steps or scheduler.timesteps.device != condition.device:
            scheduler.set_timesteps(steps, condition.device)
        use_graph = self.use_cuda_graph
        if use_graph is None:
            use_graph = condition.device.type == "cuda"
        if generator is not None or initial_noise is not None:
            return self.loop(condition, steps, guidance, generator, initial_noise)
        if use_graph and not self.graph_error:
            return self._replay(condition, steps, guidance)
        if self.compile:
            return self.compiled_loop(condition, steps, guidance)
        return self.loop(condition, steps, guidance)

    def _replay(self, condition, steps, guidance):
        scheduler = self.prior.scheduler
        key = (tuple(condition.shape), condition.dtype, str(condition.device), steps, guidance, scheduler.sampler,
               scheduler.eta, scheduler.clip_sample, scheduler.prediction_type,
               self.prior.denoiser.input_proj.weight.data_ptr())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._record(condition, steps, guidance)
            except Exception as error:
                self.graph_error = f"{type(error).__name__}: {error}"[:1000]
                torch.cuda.synchronize()
                return self.loop(condition, steps, guidance)
            self.graphs[key] = entry
        graph, static_condition, static_output = entry
        static_condition.copy_(condition)
        graph.replay()
        return static_output.clone()

    def _record(self, condition, steps, guidance):
        coefficients = self._coefficients(condition.dtype)
        static_condition = condition.clone()
        rng = torch.cuda.get_rng_state(condition.device)
        loops = ([self.compiled_loop] if self.compile else []) + [self.loop]
        errors = []
        try:
            for loop in loops:
                try:
                    stream = torch.cuda.Stream()
                    stream.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(stream):  # warm-up (and compilation) outside the graph
                        loop(static_condition, steps, guidance, coefficients=coefficients)
                    torch.cuda.current_stream().wait_stream(stream)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_output = loop(static_condition, steps, guidance, coefficients=coefficients)
                    self.compiled = loop != self.loop
                    self.record_errors = errors
                    return graph, static_condition, static_output
                except Exception as error:  # compiled first, then plain
                    errors.append(f"{type(error).__name__}: {error}"[:500])
                    torch.cuda.synchronize()
            raise RuntimeError("; ".join(errors))
        finally:
            torch.cuda.set_rng_state(rng, condition.device)


def enable_fast_prior(model, use_cuda_graph: bool | None = None, compile: bool | str = False):
    """Route `model.sample_latents` (and so `generate`) through a `FastPriorSampler` (instance attribute over
    `DiffusionPrior.sample`). No-op for Gaussian priors (returns None). Undo with `disable_fast_prior(model)`."""
    prior = getattr(model, "diffusion_prior", None)
    if prior is None:
        return None
    sampler = FastPriorSampler(prior, use_cuda_graph, compile)
    prior.sample = sampler
    return sampler


def disable_fast_prior(model) -> None:
    prior = getattr(model, "diffusion_prior", None)
    if prior is not None and "sample" in vars(prior):
        del prior.sample


def clear_fast_states(model) -> None:
    """Drop the cached static caches and decoding graphs (and the prior's graphs) to free their memory."""
    getattr(model, "_dior_decode_states", {}).clear()
    sampler = vars(getattr(model, "diffusion_prior", None) or object()).get("sample")
    if isinstance(sampler, FastPriorSampler):
        sampler.graphs.clear()


def fast_generate_kwargs() -> dict:
    """What to add to `model.generate(...)` for the graphed decoding loop."""
    return {"custom_generate": graphed_decoding}


__all__ = [
    "FastPriorSampler",
    "clear_fast_states",
    "disable_fast_prior",
    "enable_fast_prior",
    "fast_generate_kwargs",
    "fit_static_cross_cache",
    "graph_status",
    "graphed_decoding",
    "latent_memory_needed",
    "shared_slot_mask",
    "slot_stash",
    "store_slot",
]
