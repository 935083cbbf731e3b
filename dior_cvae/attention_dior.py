"""Latent infusion into the decoder (paper §3.2–3.3): each decoder layer's attentions see one extra key/value, the
latent slot Linear_l(z_l), and memory dropout hides encoder tokens from the cross-attention.

`project_latent_slots` turns the latents into every infusing attention's slot key and value at once;
`LatentSlotAttention` is BART's attention with that slot prepended to its keys and values.
"""

import torch
from torch import nn
from torch.nn.attention import SDPBackend
from transformers.models.bart.modeling_bart import ALL_ATTENTION_FUNCTIONS, BartAttention, eager_attention_forward

from .latent_dior import StackedLinear
from .utils_dior import generator_kwargs, pop_cache

# The SDPA kernels the model runs with: cuDNN's fused attention is left out, as it rejects some of the masked,
# evaluation-mode shapes of this model (its graph fails to execute); the other kernels handle them.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class LatentProjection(StackedLinear):
    """Linear_l(z_l) for every decoder layer at once: latents (B, L, ls) → latent memory (B, L, d)."""

    def __init__(self, config):
        super().__init__(config.decoder_layers, config.latent_size, config.d_model)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return super().forward(latents.transpose(0, 1)).transpose(0, 1)


def project_latent_slots(latent_projection: LatentProjection, decoder_layers, latents: torch.Tensor,
                         num_heads: int) -> torch.Tensor:
    """(B, L, ls) → latent slots (B, L, 2·A, heads, head_dim): for each decoder layer, the key and the value of its
    latent slot in each of the A attentions that infuse it (self-attention's pair first): k_proj / v_proj of
    Linear_l(z_l). All layers and projections in one batched matmul (their weights stacked)."""
    latent_memory = latent_projection(latents)  # (B, L, d): Linear_l(z_l)
    projections = [projection for layer in decoder_layers
                   for attention in (layer.self_attn, layer.encoder_attn) if attention.infuse
                   for projection in (attention.k_proj, attention.v_proj)]  # layer-major: L · 2A of them
    num_layers, d_model = len(decoder_layers), latent_memory.shape[-1]
    weight = torch.stack([p.weight for p in projections]).view(num_layers, -1, d_model)
    bias = torch.stack([p.bias for p in projections]).view(num_layers, 1, -1)
    slots = torch.baddbmm(bias, latent_memory.transpose(0, 1), weight.transpose(1, 2))  # (L, B, 2A·d)
    return slots.transpose(0, 1).reshape(latents.shape[0], num_layers, -1, num_heads, d_model // num_heads)


def memory_dropout_mask(attention_mask: torch.Tensor, probability: float, keep_one: bool,
                        generator=None) -> torch.Tensor:
    """Hide each memory token with `probability` (the latent slot is not part of the memory). `keep_one`: a row with
    nothing left keeps its whole memory (when no slot is there to attend to)."""
    keep = torch.rand(attention_mask.shape, device=attention_mask.device, **generator_kwargs(generator))
    dropped = attention_mask * (keep >= probability).to(attention_mask.dtype)
    if keep_one:
        dropped = torch.where(dropped.sum(-1, keepdim=True) == 0, attention_mask, dropped)
    return dropped


def with_slot_column(memory_mask: torch.Tensor) -> torch.Tensor:
    """The cross-attention mask (B, S) with the latent slot's column in front: visible to every query."""
    return torch.cat([memory_mask.new_ones(memory_mask.shape[0], 1), memory_mask], dim=1)


def latent_slot_attention(config, layer_idx: int, is_causal: bool, infuse: bool, slot_index: int):
    """A decoder layer's self- (`is_causal`) or cross-attention with BART's arguments."""
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


def _prepend_visible_column(attention_mask, query_length: int, key_length: int, reference):
    """Make room in a prepared causal self-attention mask for the latent key/value, which every query may see."""
    if attention_mask is None:
        if query_length == 1:
            return None
        # sdpa relied on `is_causal`, which no longer lines up once a column is prepended: build the mask
        attention_mask = torch.ones(query_length, key_length, dtype=torch.bool, device=reference.device)
        attention_mask = attention_mask.tril(key_length - query_length)[None, None]
    if attention_mask.dtype == torch.bool:
        slot = torch.ones_like(attention_mask[..., :1])
    else:
        slot = torch.zeros_like(attention_mask[..., :1])
    return torch.cat([slot, attention_mask], dim=-1)


class LatentSlotAttention(BartAttention):
    """BART attention that, when `infuse` is set, adds the key and value of the layer's latent slot (k_proj / v_proj
    of Linear_l(z_l), precomputed for every layer by `project_latent_slots`: `latent_slots`
    (B, L, 2·A, heads, head_dim), this attention's pair at `slot_index`) as one extra key/value that every query sees.

    This is exactly the authors' decoder (a slot at position 0 replaced by Linear_l(z_l) before every layer and
    prepended to the cross-attention memory), without materialising the slot: its own query output was discarded.
    The cache holds what BART's holds: self-attention keys of real tokens only (so token positions are BART's), and
    the cross-attention keys of [slot; encoder states], projected once at the first step. The self-attention slot is
    concatenated at every step from `latent_slots`, which `forward` always passes; the cross-attention mask comes
    with the slot's column (`with_slot_column` prepends it to the encoder mask once). The weights keep BART's names, so BART
    checkpoints load unchanged.
    """

    def __init__(self, *args, infuse: bool = True, slot_index: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.infuse = infuse
        self.slot_index = slot_index

    def _heads(self, states: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        batch = states.shape[0]
        return proj(states).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, len, hd)

    def _with_slot(self, latent_slots, key_states, value_states):
        """[slot; keys] and [slot; values]: this attention's pair of `latent_slots` (B, L, 2·A, heads, hd) prepended
        on the length axis of (B, heads, len, hd). Only where it is used: a cached cross-attention already holds it."""
        pair = latent_slots[:, self.layer_idx, 2 * self.slot_index : 2 * self.slot_index + 2]  # (B, 2, heads, hd)
        slot_key, slot_value = pair.to(key_states.dtype).unsqueeze(3).unbind(1)  # (B, heads, 1, hd) each
        return torch.cat([slot_key, key_states], dim=2), torch.cat([slot_value, value_states], dim=2)

    def forward(self, hidden_states, key_value_states=None, attention_mask=None, latent_slots=None, **kwargs):
        cache = pop_cache(kwargs)  # EncoderDecoderCache or None
        is_cross_attention = key_value_states is not None
        batch, query_length = hidden_states.shape[:2]
        if self.infuse and latent_slots is None:
            raise ValueError(f"decoder layer {self.layer_idx} infuses a latent: `latent_slots` is required")

        query_states = self._heads(hidden_states, self.q_proj)
        if is_cross_attention:
            if cache is not None and cache.is_updated.get(self.layer_idx):
                layer_cache = cache.cross_attention_cache.layers[self.layer_idx]
                key_states, value_states = layer_cache.keys, layer_cache.values  # [slot; memory], from step one
            else:
                key_states = self._heads(key_value_states, self.k_proj)
                value_states = self._heads(key_value_states, self.v_proj)
                if self.infuse:
                    key_states, value_states = self._with_slot(latent_slots, key_states, value_states)
                if cache is not None:
                    key_states, value_states = cache.cross_attention_cache.update(
                        key_states, value_states, self.layer_idx
                    )
                    cache.is_updated[self.layer_idx] = True
        else:
            key_states, value_states = self._heads(hidden_states, self.k_proj), self._heads(hidden_states, self.v_proj)
            if cache is not None:
                key_states, value_states = cache.self_attention_cache.update(key_states, value_states, self.layer_idx)
            if self.infuse:
                key_states, value_states = self._with_slot(latent_slots, key_states, value_states)
                attention_mask = _prepend_visible_column(attention_mask, query_length, key_states.shape[2] - 1,
                                                         hidden_states)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, query_length, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


__all__ = ["LatentProjection", "LatentSlotAttention", "SDPA_BACKENDS", "latent_slot_attention",
           "memory_dropout_mask", "project_latent_slots", "with_slot_column"]
