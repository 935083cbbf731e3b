"""Dior-CVAE: a hierarchical conditional VAE on BART with a conditional diffusion prior and memory dropout
(Yang et al., "Dior-CVAE: Pre-trained Language Models and Diffusion Priors for Variational Dialog Generation",
Findings of EMNLP 2023).

Training forward pass (labels given), top to bottom:
    context  ─ shared BART encoder ─ per-layer attention pooling → context_vectors  (B, L, d)
    response ─ shared BART encoder ─ per-layer attention pooling → response_vectors (B, L, d)
        (both in one encoder pass, [context; response] packed in each row: `encode_with_response`)
    posterior q(z_l | z_<l, c, r) → latents (B, L, ls)                                      latent_dior.py
    KL(q ‖ p(z | c)) from the prior, whatever its type                                      prior_dior.py
    decoder(labels shifted right, memory = context states with memory dropout, one latent slot per layer) → logits
                                                                                            attention_dior.py
    loss = CE + β · KL
Generation: encode the context, draw one latent per returned sequence from the prior, project it once into every
layer's slot key/value (`project_latent_slots`), decode with any HF strategy (generation_dior.py).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import sdpa_kernel
from transformers import GenerationConfig, GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import BartModel, BartPreTrainedModel, shift_tokens_right
from transformers.utils import can_return_tuple

from .attention_dior import (
    SDPA_BACKENDS,
    LatentProjection,
    latent_slot_attention,
    memory_dropout_mask,
    project_latent_slots,
    with_slot_column,
)
from .configuration_dior import DiorCVAEConfig
from .generation_dior import (
    PRIOR_GENERATION_SETTINGS,
    captured_step_inputs,
    captured_step_plan,
    check_latents,
    check_length,
    decode,
    override_generation,
    prior_settings,
    repeat_rows,
    validate_generate_inputs,
)
from .hub_dior import push_model, save_with_card
from .latent_dior import HierarchicalLatents, KLLoss, LayerPooling, PosteriorSample, StackedLinear, kl_loss
from .prior_dior import DiffusionPrior, GaussianPrior, LatentPrior, StandardPrior, ZeroInitLinear
from .utils_dior import CACHE_NAME, accepts_past_key_values, check_nonnegative_number, check_transformers_version

check_transformers_version()


@dataclass
class DiorCVAEOutput(Seq2SeqLMOutput):
    """
    [`Seq2SeqLMOutput`] (loss, logits, the decoder cache, decoder/encoder hidden states and attentions) plus:

    Args:
        loss (`torch.FloatTensor` of shape `()`): `rc_loss + kl_weight * kl_loss` when `labels` are given (in training
            the KL term has a floor, `config.kl_free_bits`; see `latent_dior.kl_loss`) (only `rc_loss` when
            `latents` are given too: the KL is a property of the posterior, not of given latents).
        rc_loss (`torch.FloatTensor`): reconstruction cross-entropy, summed over tokens, averaged over examples.
        kl_loss (`torch.FloatTensor`): KL term per example, averaged; for the diffusion prior it is
            `neg_entropy + prior_loss` (Eq. 16), a one-sample Monte-Carlo estimate (one posterior sample, one noise
            level and noise draw per example): its expectation is the KL, ≥ 0, but one example's value, and so a
            single example's `loss`, can be negative. Average over many examples (an evaluation set) to read it.
        neg_entropy (`torch.FloatTensor`): E[log q(z | c, r)] = −entropy of the posterior (diffusion prior only).
        prior_loss (`torch.FloatTensor`): the bound on −log p(z | c) of the posterior samples (diffusion prior only).
        latents (`torch.FloatTensor` of shape `(batch_size, num_layers, latent_size)`): the latents decoded with.
    """

    rc_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    neg_entropy: torch.FloatTensor | None = None
    prior_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None


@dataclass
class Encoded:
    """`forward`'s encoding: the context's encoder output and mask, and the pooled vectors (B, L, d) of the context
    and (when the posterior needs them and they came from the same encoder pass) of the response."""

    outputs: BaseModelOutput
    attention_mask: torch.Tensor
    context_vectors: torch.Tensor | None = None
    response_vectors: torch.Tensor | None = None


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
                layer.self_attn = latent_slot_attention(config, idx, True, config.self_attention_infusion, 0)
                layer.encoder_attn = latent_slot_attention(config, idx, False, config.cross_attention_infusion,
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
        # the prior's weights are named `hierarchy.prior.*` for the learned Gaussian, `diffusion_prior.*` below
        if config.prior_type == "gaussian":
            self.hierarchy.prior = GaussianPrior(config, self.hierarchy.ancestral)
        elif config.prior_type == "standard":
            self.hierarchy.prior = StandardPrior(config)
        self.latent_to_memory = None
        if config.has_latent and (config.self_attention_infusion or config.cross_attention_infusion):
            self.latent_to_memory = LatentProjection(config)
        self.diffusion_prior = DiffusionPrior(config) if config.prior_type == "diffusion" else None

        auto_map = dict(getattr(config, "auto_map", None) or {})
        if "AutoModel" not in auto_map:  # register_for_auto_class keeps one class per model; add AutoModel by hand
            config.auto_map = {**auto_map, "AutoModel": f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
        self.post_init()

    #: config fields kept in the `latent_layout` buffer (bools, as 0. / 1.: a float buffer follows the model's dtype
    #: like every other one, and 0 and 1 are exact in every float dtype)
    LAYOUT_FIELDS = ("self_attention_infusion", "cross_attention_infusion")

    @classmethod
    def _config_layout(cls, config) -> torch.Tensor:
        return torch.tensor([float(bool(getattr(config, name))) for name in cls.LAYOUT_FIELDS])

    @property
    def prior(self) -> LatentPrior | None:
        """p(z | c) behind prior_dior's interface (`kl`, `sample`), whatever its type; None without a latent."""
        if self.diffusion_prior is not None:
            return self.diffusion_prior
        return None if self.hierarchy is None else self.hierarchy.prior

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

    def _response_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """`labels` (padding = -100) as token ids, padded with the pad token: `<s> r </s>`."""
        return labels.masked_fill(labels == -100, self.config.pad_token_id)

    # ---- encoding ------------------------------------------------------------------------------------------------

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
        response_ids = self._response_ids(labels)
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
        # `and_mask_function` evaluates the segment test for every (query, key) pair on the host.
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

    def _encode_inputs(self, input_ids, attention_mask, encoder_outputs, labels, needs_posterior, **kwargs) -> Encoded:
        """`forward`'s encoding: context and response in one pass when the posterior needs the response, else the
        context alone (unless the caller encoded it: `encoder_outputs`)."""
        context_vectors = response_vectors = None
        if encoder_outputs is None and needs_posterior:
            encoder_outputs, context_vectors, response_vectors = self.encode_with_response(
                input_ids, attention_mask, labels, **kwargs)
        elif encoder_outputs is None:
            encoder_outputs, context_vectors = self.encode(input_ids, attention_mask, **kwargs)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        memory = encoder_outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)
        return Encoded(encoder_outputs, attention_mask, context_vectors, response_vectors)

    # ---- latents -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(self, context_vectors, num_inference_steps=None, prior_guidance_scale=None, generator=None,
                       prior_temperature=None, compile: bool = True):
        """Draw latents (B, L, ls) from the prior p(z | c) given pooled context vectors (B, L, d), its noise scaled by
        `prior_temperature`; `None`s take the config's values. `compile=False`: the diffusion prior's eager loop
        (see `DiffusionPrior.sample`)."""
        return self.prior.sample(context_vectors, generator=generator, temperature=prior_temperature,
                                 num_inference_steps=num_inference_steps, guidance_scale=prior_guidance_scale,
                                 compile=compile)

    def posterior(self, context_vectors, labels, generator=None) -> PosteriorSample:
        """A draw of the posterior q(z | c, r) given the pooled context (B, L, d) and the responses `labels` (as in
        `forward`, padding = -100): (latents (B, L, ls), its DiagonalGaussian over (B, L, ls), layer summaries)."""
        return self.hierarchy.posterior_sample(context_vectors, self.encode_response(labels), generator)

    def encode_response(self, labels):
        """The pooled response vectors (B, L, d) of `labels` (padding = -100): the posterior's other condition."""
        return self.encode(self._response_ids(labels), labels.ne(-100).long())[1]

    def _latents_and_kl(self, encoded: Encoded, labels, latents, kl_weight) -> tuple[torch.Tensor, KLLoss | None]:
        """`forward`'s latents: given, or a posterior draw with its KL term (with `labels`), or a prior draw."""
        if latents is not None:
            return latents, None
        context_vectors = encoded.context_vectors
        if context_vectors is None:
            context_vectors = self.pool_layers(encoded.outputs, encoded.attention_mask)
        if labels is None:
            return self.sample_latents(context_vectors), None
        if encoded.response_vectors is None:  # the caller encoded the context
            posterior = self.posterior(context_vectors, labels)
        else:
            posterior = self.hierarchy.posterior_sample(context_vectors, encoded.response_vectors)
        kl = kl_loss(self.prior, posterior, context_vectors, kl_weight,
                     self.config.kl_free_bits * self.config.total_latent_size, self.training)
        return posterior.latents, kl

    def project_latent_slots(self, latents: torch.Tensor) -> torch.Tensor | None:
        """Latents (B, L, ls) → `latent_slots` (B, L, 2·A, heads, head_dim): for each decoder layer, the key and the
        value of its latent slot in each of the A attentions that infuse it (attention_dior.project_latent_slots).
        `generate()` computes them once per call, so that a decoding step only concatenates them with its cache. None
        when no attention infuses."""
        if self.latent_to_memory is None:
            return None
        return project_latent_slots(self.latent_to_memory, self.model.decoder.layers, latents,
                                    self.config.decoder_attention_heads)

    def memory_dropout_mask(self, attention_mask: torch.Tensor, generator=None) -> torch.Tensor:
        """Hide each memory token with probability `config.memory_dropout` (the latent slot is not part of it)."""
        return memory_dropout_mask(attention_mask, self.config.memory_dropout,
                                   keep_one=not self.config.cross_attention_infusion, generator=generator)

    # ---- forward ------------------------------------------------------------------------------------------------

    def _validate_forward_inputs(self, input_ids, labels, latents, latent_slots, encoder_outputs, kl_weight):
        check_length("context", "input_ids", input_ids, self.config.max_position_embeddings)
        check_length("response", "labels", labels, self.config.max_position_embeddings)
        # outside training (where the check would wait for the device on every step; the collator never pads a
        # whole row): a response with no token to reconstruct would add a silent zero to the loss
        if labels is not None and not self.training and not bool((labels != -100).any(-1).all()):
            raise ValueError("`labels` has a row that is all -100 (padding): no response token to reconstruct")
        if not isinstance(kl_weight, torch.Tensor):  # a tensor (compiled training) is the loop's own, unchecked
            check_nonnegative_number("kl_weight", kl_weight)
        if latents is not None and not torch.compiler.is_compiling() and not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` contain NaN or infinite values")
        if latents is not None and not self.config.has_latent:
            raise ValueError('`latents` were given, but this model has no latent (`prior_type="none"`)')
        if latent_slots is None:
            return
        if latents is not None or not self.config.has_latent:
            raise ValueError("`latent_slots` were given together with `latents`, or to a model without a latent")
        batch = input_ids.shape[0] if input_ids is not None else encoder_outputs[0].shape[0]  # one of them is given
        if tuple(latent_slots.shape[:2]) != (batch, self.config.decoder_layers):
            raise ValueError(f"`latent_slots` must start with (batch, layers) = {(batch, self.config.decoder_layers)}, "
                             f"got {tuple(latent_slots.shape)}: pass `project_latent_slots(latents)`")

    def _decode(self, decoder_input_ids, decoder_attention_mask, encoded: Encoded, latent_slots, cache, use_cache,
                output_hidden_states, **kwargs):
        """The decoder over the context memory, each layer's attentions with their latent slot: (outputs, logits)."""
        memory, memory_mask = encoded.outputs.last_hidden_state, encoded.attention_mask
        if self.training and self.config.has_latent and self.config.memory_dropout > 0:
            memory_mask = self.memory_dropout_mask(memory_mask)
        if latent_slots is not None and self.config.cross_attention_infusion:
            memory_mask = with_slot_column(memory_mask)
        with sdpa_kernel(SDPA_BACKENDS):
            outputs = self.model.decoder(
                input_ids=decoder_input_ids, attention_mask=decoder_attention_mask, encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask, use_cache=use_cache, output_hidden_states=output_hidden_states,
                latent_slots=latent_slots, **{CACHE_NAME: cache}, **kwargs,
            )
        return outputs, self.lm_head(outputs.last_hidden_state) + self.final_logits_bias.to(memory.dtype)

    def reconstruction_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Label-smoothed cross-entropy of the response, summed over tokens (padding = -100), averaged over examples."""
        token_losses = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       label_smoothing=self.config.label_smoothing, reduction="none")
        return token_losses.view(labels.shape).sum(-1).mean()

    @can_return_tuple
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
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
        latent_slots (`torch.FloatTensor`, *optional*): `project_latent_slots(latents)`, computed once by the caller
            (as `generate()` does for its decoding steps); instead of `latents`, which the output then does not hold.
        kl_weight (`float` or 0-d `torch.Tensor`): β multiplying the KL term, for annealing by the training loop (a
            tensor under torch.compile, where each new float would recompile).
        cache: the decoder cache (also accepted as `past_key_values`, transformers < 5.24's name).
        """
        self._validate_forward_inputs(input_ids, labels, latents, latent_slots, encoder_outputs, kl_weight)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if attention_mask is None and input_ids is not None:
            attention_mask = input_ids.ne(self.config.pad_token_id).long()
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(self._response_ids(labels))

        needs_posterior = labels is not None and latents is None and self.config.has_latent
        encoded = self._encode_inputs(input_ids, attention_mask, encoder_outputs, labels, needs_posterior, **kwargs)
        kl = None
        if self.config.has_latent and latent_slots is None:
            latents, kl = self._latents_and_kl(encoded, labels, latents, kl_weight)
            check_latents(latents, encoded.outputs.last_hidden_state.shape[0], self.config)
            latent_slots = self.project_latent_slots(latents.to(encoded.outputs.last_hidden_state.dtype))
        decoder_outputs, logits = self._decode(decoder_input_ids, decoder_attention_mask, encoded, latent_slots,
                                               cache, use_cache, output_hidden_states, **kwargs)

        loss = rc_loss = None
        if labels is not None:
            rc_loss = self.reconstruction_loss(logits, labels)
            loss = rc_loss if kl is None else rc_loss + kl.objective
        encoder_outputs = encoded.outputs
        return DiorCVAEOutput(
            loss=loss,
            logits=logits,
            rc_loss=rc_loss,
            kl_loss=None if kl is None else kl.kl,
            neg_entropy=None if kl is None else kl.neg_entropy,
            prior_loss=None if kl is None else kl.prior_loss,
            latents=latents,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
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
        num_inference_steps, prior_guidance_scale, prior_temperature = prior_settings(
            self, generation_config, num_inference_steps=num_inference_steps,
            prior_guidance_scale=prior_guidance_scale, prior_temperature=prior_temperature)
        validate_generate_inputs(self, input_ids, attention_mask, latents, generation_config, num_inference_steps,
                                 prior_guidance_scale, prior_temperature, kwargs)
        settings = generation_config or self.generation_config
        num_sequences = kwargs.get("num_return_sequences")
        if num_sequences is None:
            num_sequences = settings.num_return_sequences or 1
        # k sequences per input = k prior draws, expanded here; transformers decodes one sequence per row
        generation_config = override_generation(generation_config, kwargs, num_return_sequences=1)

        encoder_outputs = kwargs.pop("encoder_outputs", None)
        if attention_mask is None:
            attention_mask = input_ids.ne(self.config.pad_token_id).long()
        context_vectors = None
        if encoder_outputs is None:
            encoder_outputs, context_vectors = self.encode(
                input_ids, attention_mask, output_attentions=kwargs.get("output_attentions")
            )
        batch_size = attention_mask.shape[0]
        memory = BaseModelOutput(
            last_hidden_state=repeat_rows(encoder_outputs.last_hidden_state, num_sequences),
            hidden_states=repeat_rows(encoder_outputs.hidden_states, num_sequences)
            if kwargs.get("output_hidden_states") else None,
            attentions=repeat_rows(encoder_outputs.attentions, num_sequences),
        )
        memory_mask = repeat_rows(attention_mask, num_sequences)

        latent_slots = None
        if self.config.has_latent:
            if latents is None:
                if context_vectors is None:
                    context_vectors = self.pool_layers(encoder_outputs, attention_mask)
                latents = self.sample_latents(
                    repeat_rows(context_vectors, num_sequences), num_inference_steps, prior_guidance_scale,
                    latent_generator, prior_temperature,
                    compile=not kwargs.get("disable_compile", settings.disable_compile),
                )
            elif latents.shape[0] == batch_size and num_sequences > 1:
                latents = repeat_rows(latents, num_sequences)
            check_latents(latents, batch_size * num_sequences, self.config)
            latent_slots = self.project_latent_slots(latents.to(memory.last_hidden_state.dtype))  # once, for every step
            if self.config.memory_dropout_at_inference and self.config.memory_dropout > 0:
                memory_mask = self.memory_dropout_mask(memory_mask, latent_generator)
        return super().generate(
            encoder_outputs=memory,
            attention_mask=memory_mask,
            latent_slots=latent_slots,
            generation_config=generation_config,
            **kwargs,
        )

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        """Greedy search and sampling: on CUDA the captured step (generation_dior.py), one CUDA graph per token on a
        static cache of its own, where `captured_step_plan` says it serves this call; else transformers' loop, as
        transformers set it up. `disable_compile=True` opts out."""
        plan = captured_step_plan(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                  synced_gpus, streamer, model_kwargs)
        if plan is None:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        model_kwargs = captured_step_inputs(self, input_ids, generation_config, model_kwargs)
        pad = generation_config._pad_token_tensor
        return decode(self, input_ids, model_kwargs, *plan, bool(generation_config.do_sample),
                      0 if pad is None else int(pad))

    def _prepare_static_cache(self, *args, **kwargs):
        """transformers' static cache, with one more cross-attention position where that cache holds the slot."""
        cache = super()._prepare_static_cache(*args, **kwargs)
        if self.config.has_latent and self.config.cross_attention_infusion:
            for layer in cache.cross_attention_cache.layers:
                layer.max_cache_len += 1
        return cache

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
            saved = [bool(v) for v in model.latent_layout.tolist()]
            expected = [bool(v) for v in model._config_layout(model.config).tolist()]
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
        if any(getattr(self.generation_config, name, None) is not None for name in PRIOR_GENERATION_SETTINGS):
            # a generation config marked as derived from the model config drops its custom entries on loading
            self.generation_config._from_model_config = False
        return save_with_card(super().save_pretrained, self.config, save_directory, *args, push_to_hub=push_to_hub,
                              **kwargs)

    def push_to_hub(self, repo_id: str, *, max_shard_size="50GB", tags=None, **hub_kwargs):
        """Upload `save_pretrained`'s folder. Unlike transformers' default, which puts the Hub repo's card or a
        generic one in README.md, this publishes the Dior model card, and keeps a Dior card already on the Hub (e.g.
        the one `examples/train.py` wrote). `hub_kwargs`: token, private, commit_message, commit_description,
        revision, create_pr."""
        return push_model(self, repo_id, max_shard_size=max_shard_size, tags=tags, **hub_kwargs)


DiorCVAEConfig.register_for_auto_class()
DiorCVAEForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = ["DiorCVAEForConditionalGeneration", "DiorCVAEOutput"]
