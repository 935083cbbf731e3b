"""Dior-CVAE: a hierarchical conditional VAE on BART with a conditional diffusion prior and memory dropout
(Yang et al., "Dior-CVAE: Pre-trained Language Models and Diffusion Priors for Variational Dialog Generation",
Findings of EMNLP 2023).

Training forward pass (labels given), top to bottom:
    context  ─ shared BART encoder ─ per-layer attention pooling → context_vectors  (B, L, d)
    response ─ shared BART encoder ─ per-layer attention pooling → response_vectors (B, L, d)
    posterior q(z_l | z_<l, c, r) → latents (B, L, ls)
    decoder(labels shifted right, memory = context states with memory dropout, one latent slot per layer) → logits
    loss = CE + β · KL, with KL = E[log q(z)] + diffusion regression (or analytic KL for the Gaussian priors)
Generation: encode the context, draw one latent per returned sequence from the prior, decode with any HF strategy.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig, GenerationMixin
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, ModelOutput
from transformers.models.bart.modeling_bart import BartModel, BartPreTrainedModel, shift_tokens_right

from .configuration_dior import DiorCVAEConfig
from .dior_latent import HierarchicalLatents, LatentProjection, LatentSlotAttention, LayerPooling, StackedLinear
from .dior_prior import DiffusionPrior


# cuDNN's fused attention failed on an H100 (torch 2.11) for our masked, eval-mode shapes
# ("mha_graph.execute(...).is_good()"); the other SDPA kernels handle them.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class DiorCVAEOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): `rc_loss + kl_weight * kl_loss`, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, target_length, vocab_size)`).
        rc_loss (`torch.FloatTensor`): reconstruction cross-entropy, summed over tokens, averaged over examples.
        kl_loss (`torch.FloatTensor`): KL term per example, averaged; for the diffusion prior it is
            `neg_entropy + prior_loss` (Eq. 16).
        neg_entropy (`torch.FloatTensor`): E[log q(z | c, r)] (diffusion prior only).
        prior_loss (`torch.FloatTensor`): the denoiser's regression loss (diffusion prior only).
        latents (`torch.FloatTensor` of shape `(batch_size, num_layers, latent_size)`): the latents decoded with.
        past_key_values (`EncoderDecoderCache`): decoder cache, when `use_cache`.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, source_length, d_model)`).
        decoder_hidden_states, decoder_attentions, cross_attentions: as in [`Seq2SeqLMOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    rc_loss: torch.FloatTensor | None = None
    kl_loss: torch.FloatTensor | None = None
    neg_entropy: torch.FloatTensor | None = None
    prior_loss: torch.FloatTensor | None = None
    latents: torch.FloatTensor | None = None
    past_key_values: object | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    decoder_hidden_states: tuple | None = None
    decoder_attentions: tuple | None = None
    cross_attentions: tuple | None = None


def _latent_slot_attention(config, layer_idx: int, is_causal: bool, infuse: bool) -> LatentSlotAttention:
    return LatentSlotAttention(
        config.d_model,
        config.decoder_attention_heads,
        dropout=config.attention_dropout,
        is_decoder=True,
        is_causal=is_causal,
        config=config,
        layer_idx=layer_idx,
        infuse=infuse,
    )


class DiorCVAEForConditionalGeneration(BartPreTrainedModel, GenerationMixin):
    config: DiorCVAEConfig
    config_class = DiorCVAEConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing = ["final_logits_bias"]
    _supports_flash_attn = False
    _supports_flex_attn = False

    def __init__(self, config: DiorCVAEConfig):
        super().__init__(config)
        self.model = BartModel(config)
        for idx, layer in enumerate(self.model.decoder.layers):
            layer.self_attn = _latent_slot_attention(config, idx, True, config.self_attention_infusion)
            layer.encoder_attn = _latent_slot_attention(config, idx, False, config.cross_attention_infusion)
        self.final_logits_bias = nn.Buffer(torch.zeros((1, self.model.shared.num_embeddings)))
        self.lm_head = nn.Linear(config.d_model, self.model.shared.num_embeddings, bias=False)

        self.layer_pooling = LayerPooling(config)
        self.hierarchy = HierarchicalLatents(config)
        self.latent_to_memory = None
        if config.self_attention_infusion or config.cross_attention_infusion:
            self.latent_to_memory = LatentProjection(config)
        self.diffusion_prior = DiffusionPrior(config) if config.prior_type == "diffusion" else None

        auto_map = dict(getattr(config, "auto_map", None) or {})
        if "AutoModel" not in auto_map:  # register_for_auto_class keeps one class per model; add AutoModel by hand
            config.auto_map = {**auto_map, "AutoModel": f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"}
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DiorCVAEForConditionalGeneration):
            init.zeros_(module.final_logits_bias)
        elif isinstance(module, StackedLinear):  # L stacked nn.Linear: BART's init of each
            init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                init.zeros_(module.bias)

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

    def encode(self, input_ids, attention_mask):
        """Run the shared encoder; returns its output (with every layer's states) and the pooled vectors (B, L, d)."""
        with sdpa_kernel(SDPA_BACKENDS):
            outputs = self.model.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return outputs, self.pool_layers(outputs, attention_mask)

    def pool_layers(self, encoder_outputs: BaseModelOutput, attention_mask) -> torch.Tensor:
        """Attention-pooled vector of each encoder layer's output, (B, L, d): the prior's condition."""
        if encoder_outputs.hidden_states is None:
            raise ValueError(
                "`encoder_outputs` without `hidden_states`: pass the encoder's output with output_hidden_states=True "
                "(or `latents`), since the latents are computed from every encoder layer"
            )
        return self.layer_pooling(encoder_outputs.hidden_states[-self.config.encoder_layers :], attention_mask)

    @torch.no_grad()
    def sample_latents(self, context_vectors, num_inference_steps=None, prior_guidance_scale=None, generator=None):
        """Draw latents (B, L, ls) from the prior p(z | c) given pooled context vectors (B, L, d)."""
        if self.diffusion_prior is None:
            return self.hierarchy.prior_sample(context_vectors, generator)
        flat = self.diffusion_prior.sample(
            context_vectors.flatten(1), num_inference_steps, prior_guidance_scale, generator=generator
        )
        return flat.view(context_vectors.shape[0], self.config.encoder_layers, self.config.latent_size)

    def memory_dropout_mask(self, attention_mask: torch.Tensor, generator=None) -> torch.Tensor:
        """Hide each memory token with probability `config.memory_dropout` (the latent slot is not part of it)."""
        keep = torch.rand(attention_mask.shape, generator=generator, device=attention_mask.device)
        dropped = attention_mask * (keep >= self.config.memory_dropout).to(attention_mask.dtype)
        if not self.config.cross_attention_infusion:  # a row with nothing left would attend to nothing
            dropped = torch.where(dropped.sum(-1, keepdim=True) == 0, attention_mask, dropped)
        return dropped

    def _latent_memory(self, latents: torch.Tensor):
        """(B, L, ls) → (B, L, d): Linear_l(z_l), the key/value source of each decoder layer's latent slot."""
        if self.latent_to_memory is None:
            return None
        return self.latent_to_memory(latents)

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

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        past_key_values=None,
        labels: torch.LongTensor | None = None,
        latents: torch.FloatTensor | None = None,
        kl_weight: float = 1.0,
        use_cache: bool | None = None,
        **kwargs,
    ) -> DiorCVAEOutput:
        r"""
        input_ids / attention_mask: the dialog context (B, S).
        labels (`torch.LongTensor` of shape `(B, T)`): the response `<s> r </s>`, padding = -100. It is both the
            reconstruction target and, through the shared encoder, the input of the posterior.
        latents (`torch.FloatTensor` of shape `(B, L, latent_size)`, *optional*): decode with these latents instead
            of posterior (with labels) or prior (without) samples.
        kl_weight (`float`): β multiplying the KL term, for annealing by the training loop.
        """
        self._check_context(input_ids)
        if attention_mask is None and input_ids is not None:
            attention_mask = input_ids.ne(self.config.pad_token_id).long()
        if labels is not None:
            use_cache = False
            response_ids = labels.masked_fill(labels == -100, self.config.pad_token_id)  # `<s> r </s>`, padded
            if decoder_input_ids is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(response_ids)

        rc_loss = kl_loss = neg_entropy = prior_loss = None
        if encoder_outputs is None:
            encoder_outputs, context_vectors = self.encode(input_ids, attention_mask)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
            context_vectors = None
        else:
            context_vectors = None
        memory = encoder_outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(memory.shape[:2], dtype=torch.long, device=memory.device)

        if latents is None:
            if context_vectors is None:
                context_vectors = self.pool_layers(encoder_outputs, attention_mask)
            if labels is not None:
                _, response_vectors = self.encode(response_ids, labels.ne(-100).long())
                latents, posterior, summaries = self.hierarchy.posterior_sample(context_vectors, response_vectors)
                if self.diffusion_prior is None:
                    kl = self.hierarchy.prior_kl(posterior, summaries, context_vectors)
                else:
                    entropy_term = posterior.log_prob(latents).sum(-1)
                    regression = self.diffusion_prior.loss(latents.flatten(1), context_vectors.flatten(1))
                    kl = entropy_term + regression
                    neg_entropy, prior_loss = entropy_term.mean(), regression.mean()
                kl_loss = kl.mean()
            else:
                latents = self.sample_latents(context_vectors)
        else:
            self._check_latents(latents, memory.shape[0])

        memory_mask = attention_mask
        if self.training and self.config.memory_dropout > 0:
            memory_mask = self.memory_dropout_mask(attention_mask)

        with sdpa_kernel(SDPA_BACKENDS):
            decoder_outputs = self.model.decoder(
                input_ids=decoder_input_ids,
                attention_mask=decoder_attention_mask,
                encoder_hidden_states=memory,
                encoder_attention_mask=memory_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                latent_memory=self._latent_memory(latents.to(memory.dtype)),
                **kwargs,
            )
        logits = self.lm_head(decoder_outputs.last_hidden_state) + self.final_logits_bias.to(memory.dtype)

        loss = None
        if labels is not None:
            token_losses = F.cross_entropy(
                logits.float().flatten(0, 1),
                labels.flatten(),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
                reduction="none",
            )
            rc_loss = token_losses.view(labels.shape).sum(-1).mean()
            loss = rc_loss + kl_weight * kl_loss
        return DiorCVAEOutput(
            loss=loss,
            logits=logits,
            rc_loss=rc_loss,
            kl_loss=kl_loss,
            neg_entropy=neg_entropy,
            prior_loss=prior_loss,
            latents=latents,
            past_key_values=decoder_outputs.past_key_values,
            encoder_last_hidden_state=memory,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
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
        **kwargs,
    ):
        r"""
        Encode the context once, draw one latent per returned sequence from the prior, then decode with any HF
        strategy (greedy, beam, sampling, streamers, ...). With `num_return_sequences=k` every input gets k
        independent prior draws, returned as `(B·k, T)` in `repeat_interleave` order; with `num_beams=n` each draw
        is beam-searched and its best beam returned (the beams of one draw share its latent).

        latents (`torch.FloatTensor`, *optional*): decode with these instead of prior samples, shaped
            `(B, L, latent_size)` (reused by the k sequences of an input) or `(B·k, L, latent_size)`.
        num_inference_steps / prior_guidance_scale (*optional*): override the configuration for this call.
        latent_generator (`torch.Generator`, *optional*): the random source of the prior sample (and of memory
            dropout, if on at inference); token sampling follows the global RNG as usual in HF.
        """
        generation_config = copy.deepcopy(generation_config or self.generation_config)
        # k sequences per input = k prior draws; HF itself then returns one sequence per draw
        num_sequences = kwargs.pop("num_return_sequences", None) or generation_config.num_return_sequences or 1
        generation_config.num_return_sequences = 1
        model_kwargs = generation_config.update(**kwargs)

        encoder_outputs = model_kwargs.pop("encoder_outputs", None)
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

        if encoder_outputs is None:
            encoder_outputs, context_vectors = self.encode(input_ids, attention_mask)
        else:
            context_vectors = None
        batch_size = attention_mask.shape[0]
        memory = encoder_outputs.last_hidden_state.repeat_interleave(num_sequences, dim=0)
        memory_mask = attention_mask.repeat_interleave(num_sequences, dim=0)

        if latents is None:
            if context_vectors is None:
                context_vectors = self.pool_layers(encoder_outputs, attention_mask)
            context_vectors = context_vectors.repeat_interleave(num_sequences, dim=0)
            latents = self.sample_latents(context_vectors, num_inference_steps, prior_guidance_scale, latent_generator)
        elif latents.shape[0] == batch_size and num_sequences > 1:
            latents = latents.repeat_interleave(num_sequences, dim=0)
        self._check_latents(latents, batch_size * num_sequences)

        if self.config.memory_dropout_at_inference and self.config.memory_dropout > 0:
            memory_mask = self.memory_dropout_mask(memory_mask, latent_generator)
        return super().generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=memory),
            attention_mask=memory_mask,
            latents=latents.to(memory.dtype),
            generation_config=generation_config,
            **model_kwargs,
        )


DiorCVAEConfig.register_for_auto_class()
DiorCVAEForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = ["DiorCVAEForConditionalGeneration", "DiorCVAEOutput"]
