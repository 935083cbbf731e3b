"""Hierarchical latent variables: attention pooling, posterior and Gaussian priors (paper §3.1), and the attention
module that infuses one latent per decoder layer (§3.2).

Shapes: B batch, S context length, L layers, d = d_model, ls = latent_size.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bart.modeling_bart import ALL_ATTENTION_FUNCTIONS, BartAttention, eager_attention_forward

from .dior_compat import pop_cache

# e^-7 ≤ σ ≤ 1, as soft bounds (softplus, so no entry ever sits on a bound without a gradient): posterior noise
# never exceeds the unit scale of the prior's noise (the authors allow σ up to 12)
LOG_STD_MIN, LOG_STD_MAX = -7.0, 0.0


class AttentionPooling(nn.Module):
    """Yang et al. (2016) attention pooling of one encoder layer (Eq. 10), with padding masked out:
    e = Σ_i softmax_i(v · tanh(W h_i + b)) h_i."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.context = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.context(torch.tanh(self.proj(hidden_states))).squeeze(-1)  # (B, S)
        scores = scores.float().masked_fill(attention_mask == 0, torch.finfo(torch.float32).min)
        weights = scores.softmax(dim=-1).to(hidden_states.dtype)
        return torch.einsum("bs,bsd->bd", weights, hidden_states)


class LayerPooling(nn.Module):
    """One `AttentionPooling` per encoder layer, shared by the context and the response: (B, L, d)."""

    def __init__(self, config):
        super().__init__()
        self.pools = nn.ModuleList(AttentionPooling(config.d_model) for _ in range(config.encoder_layers))

    def forward(self, layer_hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack([pool(h, attention_mask) for pool, h in zip(self.pools, layer_hidden_states)], dim=1)


class DiagonalGaussian:
    """N(mean, exp(log_std)²) per dimension; log-densities are summed over the last dimension."""

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor):
        self.mean = mean
        self.log_std = log_std

    @classmethod
    def from_params(cls, params: torch.Tensor) -> "DiagonalGaussian":
        """[mean; raw] of a network head; log σ = raw squashed softly into [LOG_STD_MIN, LOG_STD_MAX]."""
        mean, raw = params.chunk(2, dim=-1)
        log_std = LOG_STD_MAX - F.softplus(LOG_STD_MAX - raw)
        return cls(mean, LOG_STD_MIN + F.softplus(log_std - LOG_STD_MIN))

    @classmethod
    def standard(cls, like: torch.Tensor) -> "DiagonalGaussian":
        return cls(torch.zeros_like(like), torch.zeros_like(like))

    def sample(self, generator=None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.log_std.exp() * noise

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        normalized = (value - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * normalized**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def kl(self, other: "DiagonalGaussian") -> torch.Tensor:
        var_ratio = torch.exp(2 * (self.log_std - other.log_std))
        mean_term = ((self.mean - other.mean) * torch.exp(-other.log_std)) ** 2
        return 0.5 * (var_ratio + mean_term - 1 - 2 * (self.log_std - other.log_std)).sum(-1)


def gaussian_head(in_size: int, hidden_size: int, latent_size: int) -> nn.Sequential:
    """FNN with tanh (Eq. 8) returning [mean; log_std]."""
    return nn.Sequential(nn.Linear(in_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 2 * latent_size))


class HierarchicalLatents(nn.Module):
    """Posterior q(z_l | z_<l, c, r) and, for `prior_type="gaussian"`, the prior p(z_l | z_<l, c).

    z_<l is summarised by the aggregator of Eq. 9, h_l = tanh(W_h h_{l-1} + W_z z_{l-1}) with h_1 = 0, shared by
    the posterior and the Gaussian prior (as in the authors' code).
    """

    def __init__(self, config):
        super().__init__()
        d, ls, num_layers = config.d_model, config.latent_size, config.encoder_layers
        self.latent_size = ls
        # transition l → l+1; h_1 = 0, so the first transition has no hidden-state term
        self.aggregate_latent = nn.ModuleList(nn.Linear(ls, ls) for _ in range(num_layers - 1))
        self.aggregate_hidden = nn.ModuleList(nn.Linear(ls, ls, bias=False) for _ in range(num_layers - 2))
        self.posterior = nn.ModuleList(gaussian_head(ls + 2 * d, d, ls) for _ in range(num_layers))
        self.prior = None
        if config.prior_type == "gaussian":
            self.prior = nn.ModuleList(gaussian_head(ls + d, d, ls) for _ in range(num_layers))

    def _next_summary(self, layer: int, summary: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        hidden = self.aggregate_latent[layer](latent)
        if layer > 0:
            hidden = hidden + self.aggregate_hidden[layer - 1](summary)
        return torch.tanh(hidden)

    def posterior_sample(self, context_vectors, response_vectors, generator=None):
        """Returns the posterior sample (B, L, ls), its distribution per layer, and the layer summaries h_l."""
        summary = context_vectors.new_zeros(context_vectors.shape[0], self.latent_size)
        latents, dists, summaries = [], [], []
        for layer, head in enumerate(self.posterior):
            inputs = torch.cat([summary, context_vectors[:, layer], response_vectors[:, layer]], dim=-1)
            dist = DiagonalGaussian.from_params(head(inputs))
            latent = dist.sample(generator)
            latents.append(latent), dists.append(dist), summaries.append(summary)
            if layer + 1 < len(self.posterior):
                summary = self._next_summary(layer, summary, latent)
        return torch.stack(latents, dim=1), dists, summaries

    def prior_dist(self, layer: int, summary: torch.Tensor, context_vectors: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_params(self.prior[layer](torch.cat([summary, context_vectors[:, layer]], -1)))

    def prior_kl(self, dists, summaries, context_vectors) -> torch.Tensor:
        """Σ_l KL(q_l || p_l) per example (B,), with p_l the learned prior, or N(0, I) when there is none."""
        kl = 0
        for layer, (dist, summary) in enumerate(zip(dists, summaries)):
            if self.prior is None:
                prior = DiagonalGaussian.standard(dist.mean)
            else:
                prior = self.prior_dist(layer, summary, context_vectors)
            kl = kl + dist.kl(prior)
        return kl

    def prior_sample(self, context_vectors: torch.Tensor, generator=None) -> torch.Tensor:
        """Ancestral sample of the Gaussian prior (learned, or N(0, I) when there is none): (B, L, ls)."""
        batch, num_layers = context_vectors.shape[:2]
        if self.prior is None:
            shape = (batch, num_layers, self.latent_size)
            return torch.randn(shape, generator=generator, device=context_vectors.device, dtype=context_vectors.dtype)
        summary = context_vectors.new_zeros(batch, self.latent_size)
        latents = []
        for layer in range(num_layers):
            latent = self.prior_dist(layer, summary, context_vectors).sample(generator)
            latents.append(latent)
            if layer + 1 < num_layers:
                summary = self._next_summary(layer, summary, latent)
        return torch.stack(latents, dim=1)


def _prepend_visible_column(attention_mask, query_length: int, key_length: int, causal: bool, reference):
    """Make room in a prepared attention mask for the latent key/value, which every query may see."""
    if attention_mask is None:
        if not causal or query_length == 1:
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
    """BART attention that, when `infuse` is set, adds `k_proj`/`v_proj` of the layer's latent slot
    `latent_memory[:, layer_idx]` (B, 1, d) as one extra key/value that every query sees.

    This is exactly the authors' decoder (a slot at position 0 replaced by Linear_l(z_l) before every layer and
    prepended to the cross-attention memory), without materialising the slot: its own query output was discarded.
    The cache holds what BART's holds: self-attention keys of real tokens only (so token positions are BART's), and
    the cross-attention keys of [slot; encoder states], projected once at the first step. The self-attention slot is
    projected at every step from `latent_memory`, which `forward` always passes. The weights keep BART's names, so
    BART checkpoints load unchanged.
    """

    def __init__(self, *args, infuse: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.infuse = infuse

    def _heads(self, states: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        batch = states.shape[0]
        return proj(states).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, len, hd)

    def forward(self, hidden_states, key_value_states=None, attention_mask=None, latent_memory=None, **kwargs):
        cache = pop_cache(kwargs)  # EncoderDecoderCache or None
        is_cross_attention = key_value_states is not None
        batch, query_length = hidden_states.shape[:2]
        slot = None
        if self.infuse:
            if latent_memory is None:
                raise ValueError(f"decoder layer {self.layer_idx} infuses a latent: `latent_memory` is required")
            slot = latent_memory[:, self.layer_idx : self.layer_idx + 1].to(hidden_states.dtype)  # (B, 1, d)

        query_states = self._heads(hidden_states, self.q_proj)
        if is_cross_attention:
            if cache is not None and cache.is_updated.get(self.layer_idx):
                layer_cache = cache.cross_attention_cache.layers[self.layer_idx]
                key_states, value_states = layer_cache.keys, layer_cache.values  # [slot; memory], from step one
            else:
                memory = key_value_states if slot is None else torch.cat([slot, key_value_states], dim=1)
                key_states, value_states = self._heads(memory, self.k_proj), self._heads(memory, self.v_proj)
                if cache is not None:
                    key_states, value_states = cache.cross_attention_cache.update(
                        key_states, value_states, self.layer_idx
                    )
                    cache.is_updated[self.layer_idx] = True
        else:
            key_states, value_states = self._heads(hidden_states, self.k_proj), self._heads(hidden_states, self.v_proj)
            if cache is not None:
                key_states, value_states = cache.self_attention_cache.update(key_states, value_states, self.layer_idx)
            if slot is not None:
                key_states = torch.cat([self._heads(slot, self.k_proj), key_states], dim=2)
                value_states = torch.cat([self._heads(slot, self.v_proj), value_states], dim=2)
        if slot is not None:
            attention_mask = _prepend_visible_column(
                attention_mask, query_length, key_states.shape[2] - 1, not is_cross_attention, hidden_states
            )

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
