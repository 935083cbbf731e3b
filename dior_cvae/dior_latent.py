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


def rng(generator: torch.Generator | None) -> dict:
    """`generator=` for torch.rand / randn, or nothing for the global RNG: torch.compile cannot trace an
    explicit `generator=None` with dynamic sizes."""
    return {} if generator is None else {"generator": generator}

# e^-7 ≤ σ ≤ 1, as soft bounds (softplus, so no entry ever sits on a bound without a gradient): posterior noise
# never exceeds the unit scale of the prior's noise (the authors allow σ up to 12)
LOG_STD_MIN, LOG_STD_MAX = -7.0, 0.0


class StackedLinear(nn.Module):
    """`num_layers` independent `nn.Linear(in_features, out_features)`, stored stacked: `weight` (L, out, in),
    `bias` (L, out). `forward` applies layer l to x[l] for every l at once (one batched matmul); `layer(l, x)` applies
    one of them. Initialised by `DiorCVAEForConditionalGeneration._init_weights` as BART initialises a Linear."""

    def __init__(self, num_layers: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.num_layers, self.in_features, self.out_features = num_layers, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_layers, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_layers, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        """What `nn.Linear` does for each layer (the model's `_init_weights` then applies BART's init)."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (L, N, in) → (L, N, out)."""
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))

    def layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight[index], None if self.bias is None else self.bias[index])

    def unbound(self) -> list:
        """[(weight_l, bias_l)] for the L layers: for a Python loop over layers. One `unbind` (whose backward is one
        `stack`), rather than indexing the stacked weight in every step (one `select_backward` + add each)."""
        weights = self.weight.unbind(0)
        biases = self.bias.unbind(0) if self.bias is not None else [None] * self.num_layers
        return list(zip(weights, biases))

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class LayerPooling(nn.Module):
    """Yang et al. (2016) attention pooling of every encoder layer (Eq. 10), one pooling per layer, with padding
    masked out: e_l = Σ_i softmax_i(v_l · tanh(W_l h_{l,i} + b_l)) h_{l,i}, all layers in one batched pass: (B, L, d).
    Shared by the context and the response."""

    def __init__(self, config):
        super().__init__()
        num_layers, d = config.encoder_layers, config.d_model
        self.proj = StackedLinear(num_layers, d, d)
        self.context = StackedLinear(num_layers, d, 1, bias=False)

    def forward(self, layer_hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
        """`layer_hidden_states`: L tensors (B, S, d), or one (L, B, S, d); `attention_mask` (B, S) → (B, L, d), or
        (B, K, S) for K segments of each row pooled separately (their scores computed once) → (B, K, L, d)."""
        states = layer_hidden_states if torch.is_tensor(layer_hidden_states) else torch.stack(tuple(layer_hidden_states))
        num_layers, batch, length, d = states.shape
        segment_masks = attention_mask if attention_mask.ndim == 3 else attention_mask[:, None]  # (B, K, S)
        segments = segment_masks.shape[1]
        flat = states.reshape(num_layers, batch * length, d)
        scores = self.context(torch.tanh(self.proj(flat))).view(num_layers, batch, 1, length)
        scores = scores.float().masked_fill(segment_masks[None] == 0, torch.finfo(torch.float32).min)
        weights = scores.softmax(dim=-1).to(states.dtype)  # (L, B, K, S)
        pooled = torch.bmm(weights.view(num_layers * batch, segments, length),
                           states.reshape(num_layers * batch, length, d))
        pooled = pooled.view(num_layers, batch, segments, d).permute(1, 2, 0, 3)  # (B, K, L, d)
        return pooled if attention_mask.ndim == 3 else pooled[:, 0]


class LatentProjection(StackedLinear):
    """Linear_l(z_l) for every decoder layer at once: latents (B, L, ls) → latent memory (B, L, d)."""

    def __init__(self, config):
        super().__init__(config.decoder_layers, config.latent_size, config.d_model)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return super().forward(latents.transpose(0, 1)).transpose(0, 1)


class DiagonalGaussian:
    """N(mean, exp(log_std)²) per dimension; entropies and KLs are summed over the last dimension."""

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

    def detach(self) -> "DiagonalGaussian":
        return DiagonalGaussian(self.mean.detach(), self.log_std.detach())

    def sample(self, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """mean + temperature · std · ε (no extra multiply at 1: the posterior's sample is on the training path)."""
        noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype, **rng(generator))
        if temperature != 1.0:
            noise = temperature * noise
        return self.mean + self.log_std.exp() * noise

    def entropy(self) -> torch.Tensor:
        """Summed in float32: a bf16 sum of 64 log σ ≈ −40 would round it to ±0.125 nats."""
        return (self.log_std.float() + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        standardized = (value - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * standardized**2 - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def kl(self, other: "DiagonalGaussian") -> torch.Tensor:
        var_ratio = torch.exp(2 * (self.log_std - other.log_std))
        mean_term = ((self.mean - other.mean) * torch.exp(-other.log_std)) ** 2
        return 0.5 * (var_ratio + mean_term - 1 - 2 * (self.log_std - other.log_std)).sum(-1)


class GaussianHeads(nn.Module):
    """One FNN with tanh (Eq. 8) per layer, returning [mean; log_std]: head_l([summary; condition_l]) =
    W2_l tanh(W1_l [summary; condition_l] + b1_l) + b2_l. W1_l is kept as its summary part and its condition part,
    so that the condition part of every layer is one batched matmul (`condition`), done before the sequential loop
    over layers, and only the small summary part (`layer`) runs per layer."""

    def __init__(self, num_layers: int, summary_size: int, condition_size: int, hidden_size: int, latent_size: int):
        super().__init__()
        self.summary_proj = StackedLinear(num_layers, summary_size, hidden_size, bias=False)
        self.condition_proj = StackedLinear(num_layers, condition_size, hidden_size)
        self.out_proj = StackedLinear(num_layers, hidden_size, 2 * latent_size)

    def condition(self, conditions: torch.Tensor) -> torch.Tensor:
        """(B, L, condition_size) → W1_l condition_l + b1_l for every layer, (L, B, hidden)."""
        return self.condition_proj(conditions.transpose(0, 1))

    def layers(self):
        """A function (index, summary, condition_part) → [mean; log_std] of that layer (B, 2·ls), for a loop over
        the layers; `summary=None` stands for h_1 = 0."""
        summary_proj, out_proj = self.summary_proj.unbound(), self.out_proj.unbound()

        def layer(index: int, summary: torch.Tensor | None, condition_part: torch.Tensor) -> torch.Tensor:
            hidden = condition_part
            if summary is not None:
                hidden = hidden + nn.functional.linear(summary, *summary_proj[index])
            return nn.functional.linear(torch.tanh(hidden), *out_proj[index])

        return layer

    def forward(self, summaries: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Every layer at once, when all summaries are known: (B, L, ls), (B, L, cond) → (B, L, 2·ls)."""
        hidden = self.summary_proj(summaries.transpose(0, 1)) + self.condition(conditions)
        return self.out_proj(torch.tanh(hidden)).transpose(0, 1)


class HierarchicalLatents(nn.Module):
    """Posterior q(z_l | z_<l, c, r) and, for `prior_type="gaussian"`, the prior p(z_l | z_<l, c).

    z_<l is summarised by the aggregator of Eq. 9, h_l = tanh(W_h h_{l-1} + W_z z_{l-1}) with h_1 = 0, shared by
    the posterior and the Gaussian prior (as in the authors' code). Every per-layer weight is stacked over the layer
    axis (`StackedLinear`); whatever does not depend on z_<l is computed for all layers in one batched matmul.
    """

    def __init__(self, config):
        super().__init__()
        d, ls, num_layers = config.d_model, config.latent_size, config.encoder_layers
        self.latent_size, self.num_layers = ls, num_layers
        # transition l → l+1; h_1 = 0, so the first transition has no hidden-state term
        # (no parameter without a use: DDP would wait for its gradient)
        self.aggregate_latent = StackedLinear(num_layers - 1, ls, ls) if num_layers > 1 else None
        self.aggregate_hidden = StackedLinear(num_layers - 2, ls, ls, bias=False) if num_layers > 2 else None
        self.posterior = GaussianHeads(num_layers, ls, 2 * d, d, ls)
        self.prior = None
        if config.prior_type == "gaussian":
            self.prior = GaussianHeads(num_layers, ls, d, d, ls)

    def _transitions(self):
        """A function (layer, h_l or None, z_l) → h_{l+1}, for a loop over the layers."""
        latent_proj = self.aggregate_latent.unbound() if self.aggregate_latent is not None else []
        hidden_proj = self.aggregate_hidden.unbound() if self.aggregate_hidden is not None else []

        def next_summary(layer: int, summary: torch.Tensor | None, latent: torch.Tensor) -> torch.Tensor:
            hidden = nn.functional.linear(latent, *latent_proj[layer])
            if summary is not None:
                hidden = hidden + nn.functional.linear(summary, *hidden_proj[layer - 1])
            return torch.tanh(hidden)

        return next_summary

    def _ancestral(self, heads: GaussianHeads, conditions: torch.Tensor, generator=None, temperature: float = 1.0):
        """z_l ~ head_l(h_l, condition_l) for l = 1..L in order (noise scaled by `temperature`); returns latents,
        [mean; log_std] and summaries, each (B, L, ·)."""
        condition_parts = heads.condition(conditions).unbind(0)  # every layer's condition term at once
        head, next_summary = heads.layers(), self._transitions()
        summary, latents, params, summaries = None, [], [], []
        for layer in range(self.num_layers):
            layer_params = head(layer, summary, condition_parts[layer])
            latent = DiagonalGaussian.from_params(layer_params).sample(generator, temperature)
            latents.append(latent), params.append(layer_params)
            summaries.append(latent.new_zeros(latent.shape) if summary is None else summary)
            if layer + 1 < self.num_layers:
                summary = next_summary(layer, summary, latent)
        return torch.stack(latents, dim=1), torch.stack(params, dim=1), torch.stack(summaries, dim=1)

    def posterior_sample(self, context_vectors, response_vectors, generator=None):
        """Returns the posterior sample (B, L, ls), its distribution (a `DiagonalGaussian` over (B, L, ls)), and the
        layer summaries h_l (B, L, ls)."""
        conditions = torch.cat([context_vectors, response_vectors], dim=-1)
        latents, params, summaries = self._ancestral(self.posterior, conditions, generator)
        return latents, DiagonalGaussian.from_params(params), summaries

    def posterior_log_density_matrix(self, latents, context_vectors, response_vectors) -> torch.Tensor:
        """log q(z_i | c_j, r_j) for every pair of the batch's latents (B, L, ls) and conditions (B, L, d) each: (B, B),
        row i = latent i. Layer l of z_i is scored under the Gaussian of (c_j, r_j) given z_i's own z_<l (its
        summaries), which is what the density of the whole z_i under the hierarchy q(· | c_j, r_j) is; float32."""
        heads, next_summary = self.posterior, self._transitions()
        summary, summaries = None, []
        for layer in range(self.num_layers):
            summaries.append(latents.new_zeros(latents[:, layer].shape) if summary is None else summary)
            if layer + 1 < self.num_layers:
                summary = next_summary(layer, summary, latents[:, layer])
        summary_part = heads.summary_proj(torch.stack(summaries))  # (L, B_i, hidden)
        condition_part = heads.condition(torch.cat([context_vectors, response_vectors], dim=-1))  # (L, B_j, hidden)
        num_layers, batch, hidden = summary_part.shape
        pair_hidden = torch.tanh(summary_part[:, :, None] + condition_part[:, None]).view(num_layers, -1, hidden)
        params = heads.out_proj(pair_hidden).view(num_layers, batch, batch, -1).float()  # (L, B_i, B_j, 2·ls)
        per_layer = DiagonalGaussian.from_params(params).log_prob(latents.float().transpose(0, 1)[:, :, None])
        return per_layer.sum(0)

    def prior_dist(self, summaries: torch.Tensor, context_vectors: torch.Tensor) -> DiagonalGaussian:
        """The learned Gaussian prior of every layer at once, given the summaries (B, L, ls): over (B, L, ls)."""
        return DiagonalGaussian.from_params(self.prior(summaries, context_vectors))

    def prior_kl(self, posterior: DiagonalGaussian, summaries, context_vectors) -> torch.Tensor:
        """Σ_l KL(q_l || p_l) per example (B,), with p_l the learned prior, or N(0, I) when there is none."""
        if self.prior is None:
            prior = DiagonalGaussian.standard(posterior.mean)
        else:
            prior = self.prior_dist(summaries, context_vectors)
        return posterior.kl(prior).sum(-1)

    def prior_sample(self, context_vectors: torch.Tensor, generator=None, temperature: float = 1.0) -> torch.Tensor:
        """Ancestral sample of the Gaussian prior (learned, or N(0, I) when there is none), its noise scaled by
        `temperature`: (B, L, ls)."""
        batch, num_layers = context_vectors.shape[:2]
        if self.prior is None:
            shape = (batch, num_layers, self.latent_size)
            noise = torch.randn(shape, device=context_vectors.device, dtype=context_vectors.dtype, **rng(generator))
            return temperature * noise
        return self._ancestral(self.prior, context_vectors, generator, temperature)[0]


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
    of Linear_l(z_l), precomputed for every layer by `DiorCVAEForConditionalGeneration.latent_slots`: `latent_slots`
    (B, L, 2·A, heads, head_dim), this attention's pair at `slot_index`) as one extra key/value that every query sees.

    This is exactly the authors' decoder (a slot at position 0 replaced by Linear_l(z_l) before every layer and
    prepended to the cross-attention memory), without materialising the slot: its own query output was discarded.
    The cache holds what BART's holds: self-attention keys of real tokens only (so token positions are BART's), and
    the cross-attention keys of [slot; encoder states], projected once at the first step. The self-attention slot is
    concatenated at every step from `latent_slots`, which `forward` always passes; the cross-attention mask comes
    with the slot's column (`forward` prepends it to the encoder mask once). The weights keep BART's names, so BART
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
