"""Dior-CVAE: a hierarchical conditional VAE on BART with a conditional diffusion prior and memory dropout
(Yang et al., "Dior-CVAE: Pre-trained Language Models and Diffusion Priors for Variational Dialog Generation",
Findings of EMNLP 2023).

Training forward pass (labels given), top to bottom:
    context  ─ shared BART encoder ─ per-layer attention pooling → context_vectors  (B, L, d)
    response ─ shared BART encoder ─ per-layer attention pooling → response_vectors (B, L, d)
        (both in one encoder pass, [context; response] packed in each row: `encode_with_response`)
    posterior q(z_l | z_<l, c, r) → latents (B, L, ls)
    decoder(labels shifted right, memory = context states with memory dropout, one latent slot per layer) → logits
    loss = CE + β · KL, with KL = E[log q(z)] + diffusion regression (or analytic KL for the Gaussian priors)
Generation: encode the context, draw one latent per returned sequence from the prior, project it once into every
layer's slot key/value (`latent_slots`), decode with any HF strategy.
"""

import copy
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig, GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import BartModel, BartPreTrainedModel, shift_tokens_right
from transformers.utils import can_return_tuple

from .configuration_dior import DiorCVAEConfig, check_inference_steps, check_nonnegative_number
from .dior_compat import CACHE_NAME, check_transformers_version
from .dior_latent import DiagonalGaussian, HierarchicalLatents, LatentProjection, LatentSlotAttention, LayerPooling, StackedLinear, rng
from .dior_prior import DiffusionPrior, ZeroInitLinear
from .generation_dior import decode, pad_memory_to_bucket, processor_specs, stopping_plan

check_transformers_version()

# cuDNN's fused attention failed on an H100 (torch 2.11) for our masked, eval-mode shapes
# ("mha_graph.execute(...).is_good()"); the other SDPA kernels handle them.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# the model keyword arguments `generate()` hands its decoding loop that the captured step (generation_dior.py) knows
GRAPH_DECODING_KWARGS = {"encoder_outputs", "attention_mask", "latent_slots", CACHE_NAME, "use_cache"}

# generation modes that run a second model or re-feed drafted tokens: their candidates would need the same latent
UNSUPPORTED_GENERATE_ARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
# The prior's sampling settings, read by `generate()` from its keywords, else from the `GenerationConfig` (passed, or
# the model's: generation_config.json), else from the model's config.
PRIOR_GENERATION_SETTINGS = ("num_inference_steps", "prior_guidance_scale", "prior_temperature")


@dataclass
class DiorCVAEOutput(Seq2SeqLMOutput):
    """
    [`Seq2SeqLMOutput`] (loss, logits, the decoder cache, decoder/encoder hidden states and attentions) plus:

    Args:
        loss (`torch.FloatTensor` of shape `()`): `rc_loss + kl_weight * kl_loss` when `labels` are given (in training
            the KL term has a floor, `config.kl_free_bits`; see `kl_terms`) (only
            `rc_loss` when `latents` are given too: the KL is a property of the posterior, not of given latents).
        rc_loss (`torch.FloatTensor`): reconstruction cross-entropy, summed over tokens, averaged over examples.
        kl_loss (`torch.FloatTensor`): KL term per example, averaged; for the diffusion prior it is
            `neg_entropy + prior_loss` (Eq. 16).
        neg_entropy (`torch.FloatTensor`): E[log q(z | c, r)] = −entropy of the posterior (diffusion prior only).
        prior_loss (`torch.FloatTensor`): the bound on −log p(z | c) of the posterior samples (diffusion prior only).
        latents (`torch.FloatTensor` of shape `(batch_size, num_layers, latent_size)`): the latents decoded with.
    """

    rc_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    neg_entropy: torch.FloatTensor | None = None
    prior_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None


def _latent_slot_attention(config, layer_idx: int, is_causal: bool, infuse: bool, slot_index: int) -> LatentSlotAttention:
    return LatentSlotAttention(
        config.d_model,
        config.decoder_attention_heads,
        dropout=config.attention_dropout,
        is_decoder=True,
        is_causal=is_causal,
        config=config,
        layer_idx=layer_idx,
        infuse=infuse,
        slot_index=slot_index,
    )


@torch.compiler.disable  # eager even in a compiled step: inductor (torch 2.11, dynamic shapes) failed to build the
def _above_floor(kl_loss: torch.Tensor, floor: float) -> torch.Tensor:  # kernel that fused it with the KL's mean
    """1.0 where the (0-d) KL is above the free-bits floor, else 0.0. NaN counts as above (it reaches the loss);
    with no floor (0) every value is above, so a diffusion estimate below 0 keeps its gradient."""
    if floor == 0:
        return torch.ones_like(kl_loss)
    return (~(kl_loss <= floor)).to(kl_loss.dtype)


class DiorCVAEForConditionalGeneration(BartPreTrainedModel, GenerationMixin):
    config: DiorCVAEConfig
    config_class = DiorCVAEConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing = ["final_logits_bias", "latent_layout"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _keep_in_fp32_modules_strict = ["diffusion_prior"]

    def __init__(self, config: DiorCVAEConfig):
        super().__init__(config)
        self.model = BartModel(config)
        if config.has_latent:
            for idx, layer in enumerate(self.model.decoder.layers):
                # each infusing attention's (key, value) pair in `latent_slots`: self-attention's first
                layer.self_attn = _latent_slot_attention(config, idx, True, config.self_attention_infusion, 0)
                layer.encoder_attn = _latent_slot_attention(config, idx, False, config.cross_attention_infusion,
                                                            int(config.self_attention_infusion))
        self.final_logits_bias = nn.Buffer(torch.zeros((1, self.model.shared.num_embeddings)))
        # the config fields that change what the weights mean without changing their shapes, saved with the
        # weights so that `from_pretrained` can refuse a config.json that disagrees (LAYOUT_FIELDS); a model
        # without a latent is plain BART, with BART's weights only
        if config.has_latent:
            self.latent_layout = nn.Buffer(self._config_layout(config))
        self.lm_head = nn.Linear(config.d_model, self.model.shared.num_embeddings, bias=False)

        self.layer_pooling = LayerPooling(config) if config.has_latent else None
        self.hierarchy = HierarchicalLatents(config) if config.has_latent else None
        self.latent_to_memory = None
        if config.has_latent and (config.self_attention_infusion or config.cross_attention_infusion):
            self.latent_to_memory = LatentProjection(config)
        self.diffusion_prior = DiffusionPrior(config) if config.prior_type == "diffusion" else None

        auto_map = dict(getattr(config, "auto_map", None) or {})
        if "AutoModel" not in auto_map:  # register_for_auto_class keeps one class per model; add AutoModel by hand
            config.auto_map = {**auto_map, "AutoModel": f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
        self.post_init()

    #: config fields kept in the `latent_layout` buffer (bools, as 0 / 1)
    LAYOUT_FIELDS = ("self_attention_infusion", "cross_attention_infusion")

    @classmethod
    def _config_layout(cls, config) -> torch.Tensor:
        return torch.tensor([int(bool(getattr(config, name))) for name in cls.LAYOUT_FIELDS], dtype=torch.uint8)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DiorCVAEForConditionalGeneration):
            init.zeros_(module.final_logits_bias)
            if hasattr(module, "latent_layout"):
                init.copy_(module.latent_layout, self._config_layout(self.config))
        if isinstance(module, ZeroInitLinear):  # the denoiser's v̂ = 0 at the start: the prior is exactly N(0, I)
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, StackedLinear):  # L stacked nn.Linear: BART's init of each
            init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                init.zeros_(module.bias)

    @staticmethod
    def _refuse_reentrant_checkpointing(checkpointing_kwargs):
        if (checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError(
                "gradient checkpointing with use_reentrant=True is not supported: the latents reach every decoder "
                "layer as a keyword argument, which reentrant checkpointing cannot differentiate. Use the default "
                "use_reentrant=False."
            )

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self._refuse_reentrant_checkpointing(gradient_checkpointing_kwargs)
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        """transformers >= 5.24's name of `gradient_checkpointing_enable`."""
        self._refuse_reentrant_checkpointing(activation_checkpointing_kwargs)
        return super().activation_checkpointing_enable(activation_checkpointing_kwargs, *args, **kwargs)

    @classmethod
    def from_bart(cls, pretrained_model_name_or_path, **kwargs) -> "DiorCVAEForConditionalGeneration":
        """Dior-CVAE initialised from a pretrained BART checkpoint (hub id or local folder).

        Every backbone weight is copied; the latent modules are initialised by `_init_weights`. Keyword arguments
        that are `DiorCVAEConfig` fields (`latent_size=64`, `prior_type="gaussian"`, ...) set the configuration;
        the others go to `from_pretrained` (`dtype`, `revision`, `token`, ...). The generation defaults are reset
        to the plain ones of the configuration: BART checkpoints carry summarisation settings (beam 4, 3-gram
        blocking) that would silently change dialog decoding.
        """
        hub_keys = ("revision", "token", "cache_dir", "local_files_only", "force_download")
        config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in DiorCVAEConfig.__dataclass_fields__}
        config_kwargs.update({k: kwargs[k] for k in hub_keys if k in kwargs})
        config = DiorCVAEConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        for key in ("num_beams", "no_repeat_ngram_size", "early_stopping", "length_penalty", "min_length",
                    "max_length", "forced_bos_token_id", "task_specific_params"):
            if hasattr(config, key):
                delattr(config, key)
        model = cls.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
        model.generation_config = GenerationConfig.from_model_config(config)
        return model

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        old_bias, new_size = self.final_logits_bias, embeddings.weight.shape[0]
        new_bias = torch.zeros((1, new_size), device=old_bias.device, dtype=old_bias.dtype)
        new_bias[:, : min(new_size, old_bias.shape[1])] = old_bias[:, :new_size]
        self.final_logits_bias = nn.Buffer(new_bias)
        return embeddings

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    # ---- latent machinery -------------------------------------------------------------------------------------

    def encode(self, input_ids, attention_mask, **kwargs):
        """Run the shared encoder; returns its output (with every layer's states) and the pooled vectors (B, L, d)
        (None for `prior_type="none"`). `kwargs` (e.g. `output_attentions`) go to the encoder."""
        with sdpa_kernel(SDPA_BACKENDS):
            outputs = self.model.encoder(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs
            )
        pooled = self.pool_layers(outputs, attention_mask) if self.config.has_latent else None
        return outputs, pooled

    def encode_with_response(self, input_ids, attention_mask, labels, **kwargs):
        """`encode` of the context and of the response (`labels`, padding = -100) in one encoder pass: each row packs
        [context; response], each segment attends only to itself and has its own positions from 0, so the states are
        those of two separate passes (up to float rounding) for half the kernel launches (the step is launch-bound
        on a GPU; the linear layers' FLOPs are the same). Two passes when S + T exceeds `max_position_embeddings`.
        Returns (the context's encoder output, context vectors (B, L, d), response vectors (B, L, d))."""
        encoder = self.model.encoder
        response_ids = labels.masked_fill(labels == -100, self.config.pad_token_id)
        response_mask = labels.ne(-100).to(attention_mask.dtype)
        context_length, response_length = input_ids.shape[1], labels.shape[1]
        if context_length + response_length > self.config.max_position_embeddings:
            # the encoder adds the positions 0 .. S+T-1, past its table here: two passes
            outputs, context_vectors = self.encode(input_ids, attention_mask, **kwargs)
            return outputs, context_vectors, self.encode(response_ids, response_mask, **kwargs)[1]
        packed_ids = torch.cat([input_ids, response_ids], dim=1)  # (B, S + T)
        packed_mask = torch.cat([attention_mask, response_mask], dim=1)
        device = packed_ids.device
        segment = torch.cat([torch.zeros(context_length, dtype=torch.long, device=device),
                             torch.ones(response_length, dtype=torch.long, device=device)])
        packed_positions = torch.arange(len(segment), device=device)
        # the encoder adds the positions 0 .. S+T-1; the response's restart at 0
        inputs_embeds = encoder.embed_tokens(packed_ids) + (
            encoder.embed_positions(packed_ids, position_ids=packed_positions - context_length * segment)
            - encoder.embed_positions(packed_ids, position_ids=packed_positions)
        ).to(encoder.embed_tokens.weight.dtype)

        # (B, 1, S+T, S+T): a token sees the unpadded tokens of its own segment. Built here, in the two formats of the
        # attention implementations this model supports (sdpa: boolean, eager: additive), because masking_utils'
        # `and_mask_function` evaluates the segment test for every (query, key) pair on the host: 13 ms per call.
        visible = (segment[:, None] == segment[None, :]) & packed_mask.bool()[:, None, None, :]
        if self.config._attn_implementation == "eager":
            dtype = inputs_embeds.dtype
            block_mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(
                ~visible, torch.finfo(dtype).min)
        else:
            block_mask = visible
        with sdpa_kernel(SDPA_BACKENDS):
            packed = self.model.encoder(inputs_embeds=inputs_embeds, attention_mask=block_mask,
                                        output_hidden_states=True, **kwargs)
        segment_masks = torch.stack([packed_mask * (segment == 0), packed_mask * (segment == 1)], dim=1)  # (B, 2, S+T)
        pooled = self.layer_pooling(packed.hidden_states[-self.config.encoder_layers :], segment_masks)
        context = slice(0, context_length)
        outputs = BaseModelOutput(
            last_hidden_state=packed.last_hidden_state[:, context],
            hidden_states=tuple(h[:, context] for h in packed.hidden_states),
            attentions=None if packed.attentions is None else tuple(a[..., context, context] for a in packed.attentions),
        )
        return outputs, pooled[:, 0], pooled[:, 1]

    def pool_layers(self, encoder_outputs: BaseModelOutput, attention_mask) -> torch.Tensor:
        """Attention-pooled vector of each encoder layer's output, (B, L, d): the prior's condition."""
        if encoder_outputs.hidden_states is None:
            raise ValueError(
                "`encoder_outputs` without `hidden_states`: pass the encoder's output with output_hidden_states=True "
                "(or `latents`), since the latents are computed from every encoder layer"
            )
        return self.layer_pooling(encoder_outputs.hidden_states[-self.config.encoder_layers :], attention_mask)

    @torch.no_grad()
    def sample_latents(self, context_vectors, num_inference_steps=None, prior_guidance_scale=None, generator=None,
                       prior_temperature=None, compile: bool = True):
        """Draw latents (B, L, ls) from the prior p(z | c) given pooled context vectors (B, L, d), its noise scaled by
        `prior_temperature`; `None`s take the config's values. `compile=False`: the diffusion prior's eager loop
        (see `DiffusionPrior.sample`)."""
        if self.diffusion_prior is None:
            temperature = self.config.prior_temperature if prior_temperature is None else prior_temperature
            return self.hierarchy.prior_sample(context_vectors, generator, temperature)
        flat = self.diffusion_prior.sample(
            context_vectors.flatten(1), num_inference_steps, prior_guidance_scale, generator=generator,
            temperature=prior_temperature, compile=compile,
        )
        return flat.view(context_vectors.shape[0], self.config.encoder_layers, self.config.latent_size)

    def posterior(self, context_vectors, labels, generator=None):
        """The posterior q(z | c, r) given the pooled context (B, L, d) and the responses `labels` (as in `forward`,
        padding = -100): (latents (B, L, ls), its DiagonalGaussian over (B, L, ls), layer summaries)."""
        return self.hierarchy.posterior_sample(context_vectors, self.encode_response(labels), generator)

    def encode_response(self, labels):
        """The pooled response vectors (B, L, d) of `labels` (padding = -100): the posterior's other condition."""
        response_ids = labels.masked_fill(labels == -100, self.config.pad_token_id)
        return self.encode(response_ids, labels.ne(-100).long())[1]

    def kl_divergence(self, latents, posterior, summaries, context_vectors, generator=None):
        """Per-example KL(q(z | c, r) ‖ p(z | c)) of posterior samples `latents` (B, L, ls): `(kl, neg_entropy,
        prior_bound)`, each (B,). For the diffusion prior kl = E[log q] + the bound on −log p (Eq. 16), whose two
        parts are the other two; for the Gaussian priors kl is analytic and the other two are None."""
        if self.diffusion_prior is None:
            return self.hierarchy.prior_kl(posterior, summaries, context_vectors), None, None
        # E_q[log q] = -Σ_l H(q_l(· | z_<l)): exact given the sampled z_<l, so it adds no sampling noise
        neg_entropy = -posterior.entropy().sum(-1)
        prior_bound = self.diffusion_prior.nll_bound(latents.flatten(1), context_vectors.flatten(1), generator)
        return neg_entropy + prior_bound, neg_entropy, prior_bound

    def kl_terms(self, latents, posterior, summaries, context_vectors, kl_weight: float):
        """The KL term of the ELBO for posterior samples `latents` (B, L, ls) of `posterior`.

        Returns `(kl_loss, kl_objective, neg_entropy, prior_loss)`: batch means of `kl_divergence`'s three terms
        (the last two None for the Gaussian priors), and what the loss adds to the reconstruction loss.

        In evaluation `kl_objective = kl_weight · kl_loss`: the negative ELBO at β = 1. In training its value is
        `kl_weight · max(kl_loss, config.kl_free_bits · L · ls)` and its gradient is split between the KL's sides:
          - the posterior (and the response encoding) gets β times the floored KL's gradient: below the floor the
            latent carries information for free (Kingma et al. 2016's free bits), so the decoder learns to use it
            before the KL pressure closes it;
          - the prior (its weights) gets the KL's gradient at weight 1, always: maximum likelihood on the posterior
            samples, so that the prior keeps following the posterior while β is annealed or the floor holds (β only
            sets how hard the posterior is pulled towards the prior).
        At β = 1 above the floor this is the ELBO's exact gradient.
        """
        fit_prior = self.training and (self.diffusion_prior is not None or self.hierarchy.prior is not None)
        if fit_prior:
            # the prior's side alone (the posterior's samples as fixed data) is a second KL evaluation on detached
            # copies; both run as one batch of 2B rows, interleaved (row 2i: example i, row 2i+1: its detached copy)
            # so that the diffusion bound's λ, stratified over consecutive rows, stays stratified within each half
            def with_copy(tensor):
                return torch.stack([tensor, tensor.detach()], dim=1).flatten(0, 1)

            both = DiagonalGaussian(with_copy(posterior.mean), with_copy(posterior.log_std))
            kl_pairs, neg_entropy, prior_bound = self.kl_divergence(
                with_copy(latents), both, with_copy(summaries), with_copy(context_vectors)
            )
            kl, prior_fit = kl_pairs.view(-1, 2).unbind(1)
            if neg_entropy is not None:
                neg_entropy, prior_bound = neg_entropy[0::2], prior_bound[0::2]
        else:
            kl, neg_entropy, prior_bound = self.kl_divergence(latents, posterior, summaries, context_vectors)
        kl_loss = kl.mean()
        neg_entropy, prior_loss = (None, None) if neg_entropy is None else (neg_entropy.mean(), prior_bound.mean())
        if not self.training:
            return kl_loss, kl_weight * kl_loss, neg_entropy, prior_loss

        floor = self.config.kl_free_bits * self.config.total_latent_size
        above = _above_floor(kl_loss.detach(), floor)
        kl_objective = kl_weight * (above * kl_loss + (1 - above) * floor)  # no gradient below the floor
        if not fit_prior:  # N(0, I) has nothing to fit
            return kl_loss, kl_objective, neg_entropy, prior_loss
        # the prior fit's gradient, at weight 1 in total with the prior's part of kl_objective
        prior_fit = prior_fit.mean()
        prior_share = 1 - kl_weight * above  # what kl_objective left to give the prior
        kl_objective = kl_objective + prior_share * (prior_fit - prior_fit.detach())  # gradient only
        return kl_loss, kl_objective, neg_entropy, prior_loss

    def memory_dropout_mask(self, attention_mask: torch.Tensor, generator=None) -> torch.Tensor:
        """Hide each memory token with probability `config.memory_dropout` (the latent slot is not part of it)."""
        keep = torch.rand(attention_mask.shape, device=attention_mask.device, **rng(generator))
        dropped = attention_mask * (keep >= self.config.memory_dropout).to(attention_mask.dtype)
        if not self.config.cross_attention_infusion:  # a row with nothing left would attend to nothing
            dropped = torch.where(dropped.sum(-1, keepdim=True) == 0, attention_mask, dropped)
        return dropped

    def latent_slots(self, latents: torch.Tensor) -> torch.Tensor | None:
        """(B, L, ls) → (B, L, 2·A, heads, head_dim): for each decoder layer, the key and the value of its latent slot
        in each of the A attentions that infuse it (self-attention's pair first): k_proj / v_proj of Linear_l(z_l).
        All layers and projections in one batched matmul (their weights stacked); `generate()` computes them once per
        call, so that a decoding step only concatenates them with its cache. None when no attention infuses."""
        if self.latent_to_memory is None:
            return None
        config = self.config
        latent_memory = self.latent_to_memory(latents)  # (B, L, d): Linear_l(z_l)
        projections = [projection for layer in self.model.decoder.layers
                       for attention in (layer.self_attn, layer.encoder_attn) if attention.infuse
                       for projection in (attention.k_proj, attention.v_proj)]  # layer-major: L · 2A of them
        weight = torch.stack([p.weight for p in projections]).view(config.decoder_layers, -1, config.d_model)
        bias = torch.stack([p.bias for p in projections]).view(config.decoder_layers, 1, -1)
        slots = torch.baddbmm(bias, latent_memory.transpose(0, 1), weight.transpose(1, 2))  # (L, B, 2A·d)
        heads = config.decoder_attention_heads
        return slots.transpose(0, 1).reshape(latents.shape[0], config.decoder_layers, -1, heads, config.d_model // heads)

    def _check_latents(self, latents: torch.Tensor, batch_size: int):
        expected = (batch_size, self.config.encoder_layers, self.config.latent_size)
        if tuple(latents.shape) != expected:
            raise ValueError(f"`latents` must have shape {expected} (batch, layers, latent_size), got {tuple(latents.shape)}")

    def _check_context(self, input_ids):
        if input_ids is not None and input_ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(
                f"context of {input_ids.shape[-1]} tokens is longer than `max_position_embeddings` "
                f"({self.config.max_position_embeddings}); truncate it (keep the most recent turns)"
            )

    def _prepare_static_cache(self, *args, **kwargs):
        """transformers' static cache, with one more cross-attention position where that cache holds the slot."""
        cache = super()._prepare_static_cache(*args, **kwargs)
        if self.config.has_latent and self.config.cross_attention_infusion:
            for layer in cache.cross_attention_cache.layers:
                layer.max_cache_len += 1
        return cache

    # ---- forward ------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values=None,
        cache=None,
        labels: torch.LongTensor | None = None,
        latents: torch.FloatTensor | None = None,
        latent_slots: torch.FloatTensor | None = None,
        kl_weight: float | torch.Tensor = 1.0,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> DiorCVAEOutput:
        r"""
        input_ids / attention_mask: the dialog context (B, S).
        labels (`torch.LongTensor` of shape `(B, T)`): the response `<s> r </s>`, padding = -100. It is both the
            reconstruction target and, through the shared encoder, the input of the posterior.
        latents (`torch.FloatTensor` of shape `(B, L, latent_size)`, *optional*): decode with these latents instead
            of posterior (with labels) or prior (without) samples; with `labels`, `loss` is then `rc_loss`.
        latent_slots (`torch.FloatTensor`, *optional*): `latent_slots(latents)`, computed once by the caller (as
            `generate()` does for its decoding steps); instead of `latents`, which the output then does not hold.
        kl_weight (`float` or 0-d `torch.Tensor`): β multiplying the KL term, for annealing by the training loop (a
            tensor under torch.compile, where each new float would recompile).
        past_key_values / cache: the decoder cache (transformers < 5.24 / ≥ 5.24 name).
        """
        self._check_context(input_ids)
        # outside training (where the check would wait for the device on every step; the collator never pads a
        # whole row): a response with no token to reconstruct would add a silent zero to the loss
        if labels is not None and not self.training and not bool((labels != -100).any(-1).all()):
            raise ValueError("`labels` has a row that is all -100 (padding): no response token to reconstruct")
        if not isinstance(kl_weight, torch.Tensor):  # a tensor (compiled training) is the loop's own, unchecked
            check_nonnegative_number("kl_weight", kl_weight)
        if latents is not None and not torch.compiler.is_compiling() and not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` contain NaN or infinite values")
        if labels is not None and labels.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(
                f"response of {labels.shape[-1]} tokens (`labels`) is longer than `max_position_embeddings` "
                f"({self.config.max_position_embeddings}); truncate it"
            )
        if past_key_values is not None and CACHE_NAME == "cache":
            warnings.warn("`past_key_values` is deprecated since transformers 5.24: use `cache`", FutureWarning)
        cache = cache if cache is not None else past_key_values
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if attention_mask is None and input_ids is not None:
            attention_mask = input_ids.ne(self.config.pad_token_id).long()
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None:
                response_ids = labels.masked_fill(labels == -100, self.config.pad_token_id)  # `<s> r </s>`, padded
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(response_ids)

        # encode → latents
        context_vectors = response_vectors = None
        if encoder_outputs is None and labels is not None and latents is None and self.config.has_latent:
            encoder_outputs, context_vectors, response_vectors = self.encode_with_response(
                input_ids, attention_mask, labels, **kwargs
            )
        elif encoder_outputs is None:
            encoder_outputs, context_vectors = self.encode(input_ids, attention_mask, **kwargs)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        memory = encoder_outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)

        kl_loss = kl_objective = neg_entropy = prior_loss = None
        if latent_slots is not None:
            if latents is not None or not self.config.has_latent:
                raise ValueError("`latent_slots` were given together with `latents`, or to a model without a latent")
            expected = (memory.shape[0], self.config.decoder_layers)
            if tuple(latent_slots.shape[:2]) != expected:
                raise ValueError(f"`latent_slots` must start with (batch, layers) = {expected}, got "
                                 f"{tuple(latent_slots.shape)}: pass `latent_slots(latents)`")
        elif self.config.has_latent:
            if context_vectors is None and latents is None:
                context_vectors = self.pool_layers(encoder_outputs, attention_mask)
            if latents is None and labels is not None:
                if response_vectors is None:  # the caller encoded the context
                    latents, posterior, summaries = self.posterior(context_vectors, labels)
                else:
                    latents, posterior, summaries = self.hierarchy.posterior_sample(context_vectors, response_vectors)
                kl_loss, kl_objective, neg_entropy, prior_loss = self.kl_terms(
                    latents, posterior, summaries, context_vectors, kl_weight
                )
            elif latents is None:
                latents = self.sample_latents(context_vectors)
            self._check_latents(latents, memory.shape[0])
            latent_slots = self.latent_slots(latents.to(memory.dtype))
        elif latents is not None:
            raise ValueError('`latents` were given, but this model has no latent (`prior_type="none"`)')

        # infuse → decode
        memory_mask = attention_mask
        if self.training and self.config.has_latent and self.config.memory_dropout > 0:
            memory_mask = self.memory_dropout_mask(attention_mask)
        if latent_slots is not None and self.config.cross_attention_infusion:  # the slot's key: visible to every query
            memory_mask = torch.cat([memory_mask.new_ones(memory_mask.shape[0], 1), memory_mask], dim=1)
        with sdpa_kernel(SDPA_BACKENDS):
            decoder_outputs = self.model.decoder(
                input_ids=decoder_input_ids,
                attention_mask=decoder_attention_mask,
                encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                latent_slots=latent_slots,
                **{CACHE_NAME: cache},
                **kwargs,
            )
        logits = self.lm_head(decoder_outputs.last_hidden_state) + self.final_logits_bias.to(memory.dtype)

        # ELBO
        loss = rc_loss = None
        if labels is not None:
            token_losses = F.cross_entropy(
                logits.float().flatten(0, 1),
                labels.flatten(),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
                reduction="none",
            )
            rc_loss = token_losses.view(labels.shape).sum(-1).mean()
            loss = rc_loss if kl_objective is None else rc_loss + kl_objective
        return DiorCVAEOutput(
            loss=loss,
            logits=logits,
            rc_loss=rc_loss,
            kl_loss=kl_loss,
            neg_entropy=neg_entropy,
            prior_loss=prior_loss,
            latents=latents,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=memory,
            encoder_hidden_states=encoder_outputs.hidden_states if output_hidden_states else None,
            encoder_attentions=encoder_outputs.attentions,
            **{CACHE_NAME: getattr(decoder_outputs, CACHE_NAME)},
        )

    # ---- generation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        latents: torch.FloatTensor | None = None,
        generation_config: GenerationConfig | None = None,
        num_inference_steps: int | None = None,
        prior_guidance_scale: float | None = None,
        latent_generator: torch.Generator | None = None,
        prior_temperature: float | None = None,
        **kwargs,
    ):
        r"""
        Encode the context once, draw one latent per returned sequence from the prior, then decode with any HF
        strategy (greedy, beam, sampling, streamers, static cache, ...). With `num_return_sequences=k` every input
        gets k independent prior draws, returned as `(B·k, T)` in `repeat_interleave` order; with `num_beams=n` each
        draw is beam-searched and its best beam returned (the beams of one draw share its latent).

        latents (`torch.FloatTensor`, *optional*): decode with these instead of prior samples, shaped
            `(B, L, latent_size)` (reused by the k sequences of an input) or `(B·k, L, latent_size)`.
        num_inference_steps / prior_guidance_scale / prior_temperature (*optional*): the prior's sampling settings
            for this call (`prior_temperature` τ scales the prior's noise: see `DiorCVAEConfig`). Each is taken from
            this keyword, else from `generation_config` (as an attribute: `GenerationConfig(prior_temperature=0.5)`),
            else from `model.generation_config` (saved in generation_config.json), else from `model.config`.
        latent_generator (`torch.Generator`, *optional*): the random source of the prior sample (and of memory
            dropout, if on at inference); token sampling follows the global RNG as usual in HF.

        Every call draws new latents, so `do_sample=False` (greedy or beam search) answers two identical calls
        differently. Repeatable answers: a seeded `latent_generator=torch.Generator().manual_seed(s)` (the same
        latents for the same seed), `latents=` (decode given latents), or `prior_temperature=0` (the prior's mode:
        one latent per context, no randomness).
        Every other argument goes to transformers' `generate` unchanged (so explicit `None`s keep their meaning).

        On CUDA, greedy search and sampling decode through `_sample`'s captured step (one CUDA graph per token,
        generation_dior.py, on a static cache with the memory padded to a length bucket) wherever it serves the call
        (see `_sample`); otherwise transformers' own loop runs as transformers sets it up. The first call per batch
        size, bucket and setting compiles, and the prior's noise-free solvers run as one CUDA graph per batch size.
        `disable_compile=True` compiles nothing: transformers' own loop and the prior's eager loop (for a one-off
        run over many shapes, where compiling costs more than it saves).
        """
        num_inference_steps, prior_guidance_scale, prior_temperature = self._prior_settings(
            generation_config, num_inference_steps=num_inference_steps, prior_guidance_scale=prior_guidance_scale,
            prior_temperature=prior_temperature)
        self._validate_generate_inputs(input_ids, attention_mask, latents, generation_config, num_inference_steps,
                                       prior_guidance_scale, prior_temperature, kwargs)
        for name in UNSUPPORTED_GENERATE_ARGS:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"`{name}` is not supported by Dior-CVAE: assisted and lookup decoding verify drafted tokens "
                    "with a second forward that would need the draft's latent"
                )
        settings = generation_config or self.generation_config
        num_sequences = kwargs.get("num_return_sequences")
        if num_sequences is None:
            num_sequences = settings.num_return_sequences or 1
        # k sequences per input = k prior draws, expanded here; transformers decodes one sequence per row
        generation_config = self._override_generation(generation_config, kwargs, num_return_sequences=1)

        encoder_outputs = kwargs.pop("encoder_outputs", None)
        if encoder_outputs is None and input_ids is None:
            raise ValueError("`generate` needs `input_ids` (the context) or `encoder_outputs`")
        self._check_context(input_ids)
        if attention_mask is None:
            if input_ids is None:
                raise ValueError("pass `attention_mask` together with `encoder_outputs`")
            attention_mask = input_ids.ne(self.config.pad_token_id).long()
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"empty context (no unmasked token) in batch row(s) {empty}")

        context_vectors = None
        if encoder_outputs is None:
            encoder_outputs, context_vectors = self.encode(
                input_ids, attention_mask, output_attentions=kwargs.get("output_attentions")
            )
        batch_size = attention_mask.shape[0]

        def expand(tensors):
            if tensors is None:
                return None
            if isinstance(tensors, torch.Tensor):
                return tensors.repeat_interleave(num_sequences, dim=0)
            return tuple(expand(t) for t in tensors)

        memory = BaseModelOutput(
            last_hidden_state=expand(encoder_outputs.last_hidden_state),
            hidden_states=expand(encoder_outputs.hidden_states) if kwargs.get("output_hidden_states") else None,
            attentions=expand(encoder_outputs.attentions),
        )
        memory_mask = expand(attention_mask)

        if self.config.has_latent:
            if latents is None:
                if context_vectors is None:
                    context_vectors = self.pool_layers(encoder_outputs, attention_mask)
                latents = self.sample_latents(
                    expand(context_vectors), num_inference_steps, prior_guidance_scale, latent_generator,
                    prior_temperature, compile=not kwargs.get("disable_compile", settings.disable_compile),
                )
            elif latents.shape[0] == batch_size and num_sequences > 1:
                latents = expand(latents)
            self._check_latents(latents, batch_size * num_sequences)
            latent_slots = self.latent_slots(latents.to(memory.last_hidden_state.dtype))  # once, for every step
            if self.config.memory_dropout_at_inference and self.config.memory_dropout > 0:
                memory_mask = self.memory_dropout_mask(memory_mask, latent_generator)
        elif latents is not None:
            raise ValueError('`latents` were given, but this model has no latent (`prior_type="none"`)')
        else:
            latent_slots = None
        return super().generate(
            encoder_outputs=memory,
            attention_mask=memory_mask,
            latent_slots=latent_slots,
            generation_config=generation_config,
            **kwargs,
        )

    def _prior_settings(self, generation_config, **values) -> tuple:
        """`PRIOR_GENERATION_SETTINGS` in that order: each keyword's value, else the attribute of `generation_config`,
        else of `self.generation_config`, else None (the prior then reads `self.config`)."""
        resolved = []
        for name in PRIOR_GENERATION_SETTINGS:
            value = values[name]
            for source in (generation_config, self.generation_config):
                if value is None and source is not None:
                    value = getattr(source, name, None)
            resolved.append(value)
        return tuple(resolved)

    @staticmethod
    def _override_generation(generation_config, kwargs, **overrides):
        """Settings `generate()` imposes on transformers' loop: in `kwargs` when no `generation_config` was passed (or
        the caller passed that keyword too), otherwise on a copy of `generation_config`, since transformers
        deprecates a `generation_config` together with generation keywords. Returns the config to pass on."""
        if generation_config is not None and any(name not in kwargs for name in overrides):
            generation_config = copy.deepcopy(generation_config)
        for name, value in overrides.items():
            if generation_config is None or name in kwargs:
                kwargs[name] = value
            else:
                setattr(generation_config, name, value)
        return generation_config

    def _captures_decoding(self, generation_config) -> bool:
        """The captured step (one CUDA graph per token) is for CUDA, unless `disable_compile`."""
        return self.device.type == "cuda" and not generation_config.disable_compile

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """Greedy search and sampling. On CUDA each step runs as one captured CUDA graph (generation_dior.py) on a
        static cache of its own, the memory padded to a length bucket, where the captured step serves the call: the
        processors and criteria it knows, no streamer or per-step outputs, no cache passed in and no cache
        implementation but "static". Everything else is transformers' loop, with the cache transformers made for it
        and the memory as encoded. `disable_compile=True` opts out."""
        specs = processor_specs(logits_processor)
        stopping = stopping_plan(stopping_criteria)
        cache = model_kwargs.get(CACHE_NAME)
        graphable = (
            self._captures_decoding(generation_config)
            and specs is not None and stopping is not None and not synced_gpus and streamer is None
            and not generation_config.return_dict_in_generate and input_ids.shape[1] == 1
            and set(model_kwargs) <= GRAPH_DECODING_KWARGS and model_kwargs.get("use_cache", True)
            and generation_config.cache_implementation in (None, "static")
            and not getattr(cache, "_is_user_defined", False)
        )
        if not graphable:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        # compiled per memory length: a few buckets instead of one graph per context length
        memory, memory_mask = pad_memory_to_bucket(model_kwargs["encoder_outputs"], model_kwargs["attention_mask"],
                                                   self.config.max_position_embeddings)
        model_kwargs = {**model_kwargs, "encoder_outputs": memory, "attention_mask": memory_mask}
        max_cache_len = max(generation_config.max_length - 1, getattr(generation_config, "max_cache_len", None) or 0)
        model_kwargs[CACHE_NAME] = self._prepare_static_cache("static", input_ids.shape[0], max_cache_len, None,
                                                              model_kwargs)
        pad = generation_config._pad_token_tensor
        return decode(self, input_ids, model_kwargs, specs, stopping, bool(generation_config.do_sample),
                      0 if pad is None else int(pad))

    def _validate_generate_inputs(self, input_ids, attention_mask, latents, generation_config, num_inference_steps,
                                  prior_guidance_scale, prior_temperature, kwargs) -> None:
        """`generate()`'s own arguments: a `ValueError` that names the argument and the value, not a silent default
        or a bare `IndexError` deep in the model."""

        def is_int(value):
            return isinstance(value, int) and not isinstance(value, bool)

        config = self.config
        if num_inference_steps is not None:
            check_inference_steps("num_inference_steps", num_inference_steps)
        if prior_guidance_scale is not None:
            check_nonnegative_number("prior_guidance_scale", prior_guidance_scale)
        if prior_temperature is not None:
            check_nonnegative_number("prior_temperature", prior_temperature)
            if not config.has_latent:
                raise ValueError('`prior_temperature` was given, but this model has no latent (`prior_type="none"`)')
        settings = generation_config or self.generation_config
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
            vocab = self.get_input_embeddings().num_embeddings
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
                raise ValueError(f"`input_ids` must lie in [0, {vocab}) (the vocabulary), got values in "
                                 f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if attention_mask is not None and input_ids is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"`attention_mask` shape {tuple(attention_mask.shape)} differs from `input_ids` shape "
                             f"{tuple(input_ids.shape)}")
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
                raise ValueError(f"`latents` must be a floating-point tensor, got {getattr(latents, 'dtype', type(latents))}")
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` contain NaN or infinite values")

    # ---- Hub: the dialog pipeline and the model card travel with every saved folder -----------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, plus checks of the config against the weights: weights of latent modules
        that the config does not build (a `prior_type` changed in config.json) and non-finite weights raise a
        `ValueError` naming the field or the tensor; an unreadable weights file is named."""
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except Exception as exc:
            if "safetensors" in type(exc).__module__ or "deserializ" in str(exc) or "header" in str(exc).lower():
                raise ValueError(f"{pretrained_model_name_or_path}: cannot read the weights (model.safetensors): "
                                 f"{type(exc).__name__}: {exc}") from exc
            raise
        source = pretrained_model_name_or_path
        latent_prefixes = ("diffusion_prior.", "hierarchy.", "latent_to_memory.")
        foreign = [k for k in info.get("unexpected_keys") or () if k.startswith(latent_prefixes)]
        if foreign:
            raise ValueError(
                f"{source}: the weights hold {', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}, "
                f"which the config does not build: config.json's `prior_type` ({model.config.prior_type!r}), "
                "`latent_size` or the layer counts are not those the weights were trained with")
        if hasattr(model, "latent_layout") and not model.latent_layout.is_meta:
            saved, expected = model.latent_layout.tolist(), model._config_layout(model.config).tolist()
            for name, old, new in zip(model.LAYOUT_FIELDS, saved, expected):
                if old != new:
                    raise ValueError(f"{source}: config.json's `{name}` is {bool(new)}, but the weights were trained "
                                     f"with {name}={bool(old)}")
        bad = [name for name, tensor in model.state_dict().items()
               if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all())]
        if bad:
            raise ValueError(f"{source}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
                             f"{', ...' if len(bad) > 3 else ''}")
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """transformers' `save_pretrained`, plus: config.json names the `dialog-generation` pipeline
        (pipeline_dior.py is copied with the code) and README.md gets the Dior model card unless the folder already
        has one. With `push_to_hub=True` the folder, card included, is then uploaded (`repo_id`, `token`, ...)."""
        self.config.custom_pipelines = {**(getattr(self.config, "custom_pipelines", None) or {}), **CUSTOM_PIPELINES}
        if any(getattr(self.generation_config, name, None) is not None for name in PRIOR_GENERATION_SETTINGS):
            # a generation config marked as derived from the model config drops its custom entries on loading
            self.generation_config._from_model_config = False
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "token", "commit_message", "private", "create_pr")
                      if k in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        write_model_card_if_missing(self.config, save_directory)
        if push_to_hub:
            return upload_model_folder(save_directory, **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, max_shard_size="50GB", tags=None, **hub_kwargs):
        """Upload `save_pretrained`'s folder. Unlike transformers' default, which puts the Hub repo's card or a
        generic one in README.md, this publishes the Dior model card, and keeps a Dior card already on the Hub (e.g.
        the one `examples/train.py` wrote). `hub_kwargs`: token, private, commit_message, commit_description,
        revision, create_pr."""
        return push_model(self, repo_id, max_shard_size=max_shard_size, tags=tags, **hub_kwargs)


# Shipped with the code (remote-code rule: sibling files imported as `from .module import`).
from .modelcard_dior import push_model, upload_model_folder, write_model_card_if_missing  # noqa: E402
from .pipeline_dior import CUSTOM_PIPELINES  # noqa: E402

DiorCVAEConfig.register_for_auto_class()
DiorCVAEForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = ["DiorCVAEForConditionalGeneration", "DiorCVAEOutput"]
