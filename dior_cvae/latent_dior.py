"""Hierarchical latent variables (paper §3.1): attention pooling of every encoder layer, the layer-wise Gaussian
posterior q(z_l | z_<l, c, r) with its aggregator over the layers, and free bits for the KL term of the loss.

Shapes: B batch, S context length, L layers, d = d_model, ls = latent_size.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .utils_dior import generator_kwargs

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
        noise = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype, **generator_kwargs(generator))
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


class PosteriorSample(NamedTuple):
    """A draw of the posterior: the latents (B, L, ls), their distribution (a `DiagonalGaussian` over (B, L, ls)) and
    the aggregator's layer summaries h_l (B, L, ls), which the learned Gaussian prior conditions on."""

    latents: torch.Tensor
    distribution: DiagonalGaussian
    summaries: torch.Tensor


class KLEstimate(NamedTuple):
    """A prior's `kl` of a posterior draw, per example (B,): the KL estimate; for the diffusion prior also its two
    parts, E[log q(z | c, r)] (`neg_entropy`) and the bound on −log p(z | c) (`prior_nll`), None otherwise."""

    kl: torch.Tensor
    neg_entropy: torch.Tensor | None
    prior_nll: torch.Tensor | None


class HierarchicalLatents(nn.Module):
    """Posterior q(z_l | z_<l, c, r), layer by layer, and the aggregator of z_<l that it shares with the learned
    Gaussian prior (`prior_dior.GaussianPrior`, held here as `prior` so that its weights are named
    `hierarchy.prior.*`).

    z_<l is summarised by the aggregator of Eq. 9, h_l = tanh(W_h h_{l-1} + W_z z_{l-1}) with h_1 = 0 (as in the
    authors' code). Every per-layer weight is stacked over the layer axis (`StackedLinear`); whatever does not depend
    on z_<l is computed for all layers in one batched matmul.
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
        self.prior = None  # the Gaussian priors, set by the model

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

    def ancestral(self, heads: GaussianHeads, conditions: torch.Tensor, generator=None,
                  temperature: float = 1.0) -> PosteriorSample:
        """z_l ~ heads_l(h_l, condition_l) for l = 1..L in order (noise scaled by `temperature`): the latents, their
        distribution and the summaries, each over (B, L, ·)."""
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
        return PosteriorSample(torch.stack(latents, dim=1), DiagonalGaussian.from_params(torch.stack(params, dim=1)),
                               torch.stack(summaries, dim=1))

    def posterior_sample(self, context_vectors, response_vectors, generator=None) -> PosteriorSample:
        """A draw of q(z | c, r) given the pooled context and response vectors (B, L, d) each."""
        return self.ancestral(self.posterior, torch.cat([context_vectors, response_vectors], dim=-1), generator)

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


class KLLoss(NamedTuple):
    """The KL part of the loss, as batch means: `kl` the estimate of KL(q ‖ p) (reported as `kl_loss`), `objective`
    what the loss adds (see `kl_loss`), and the diffusion prior's two parts of `kl` (None for the Gaussian priors)."""

    kl: torch.Tensor
    objective: torch.Tensor
    neg_entropy: torch.Tensor | None
    prior_loss: torch.Tensor | None


def kl_loss(prior, posterior: PosteriorSample, context_vectors: torch.Tensor, kl_weight, free_bits: float,
            training: bool) -> KLLoss:
    """The KL term of the ELBO for the posterior draw `posterior`, against `prior` (a `prior_dior.LatentPrior`).

    In evaluation `objective = kl_weight · kl`: the negative ELBO at β = 1. In training (`free_bits_kl_objective`)
    its value is `kl_weight · max(kl, free_bits)` and the prior's weights are fit to the posterior samples at
    weight 1: the prior's `kl` also runs on a detached copy of the draw, in one batch of 2B rows, interleaved (row
    2i: example i, row 2i+1: its detached copy) so that the diffusion bound's λ, stratified over consecutive rows,
    stays stratified within each half."""
    prior_fit = None
    if training and prior.has_weights:
        def with_copy(tensor):
            return torch.stack([tensor, tensor.detach()], dim=1).flatten(0, 1)

        distribution = posterior.distribution
        both = PosteriorSample(with_copy(posterior.latents),
                               DiagonalGaussian(with_copy(distribution.mean), with_copy(distribution.log_std)),
                               with_copy(posterior.summaries))
        estimate = prior.kl(both, with_copy(context_vectors))
        kl, prior_fit = estimate.kl.view(-1, 2).unbind(1)
        estimate = KLEstimate(kl, *(None if t is None else t[0::2] for t in estimate[1:]))
        prior_fit = prior_fit.mean()
    else:
        estimate = prior.kl(posterior, context_vectors)
    kl = estimate.kl.mean()
    neg_entropy, prior_loss = (None, None) if estimate.neg_entropy is None else (
        estimate.neg_entropy.mean(), estimate.prior_nll.mean())
    objective = free_bits_kl_objective(kl, prior_fit, kl_weight, free_bits) if training else kl_weight * kl
    return KLLoss(kl, objective, neg_entropy, prior_loss)


@torch.compiler.disable  # kept out of compiled graphs: inductor cannot generate the kernel fusing it with the mean
def above_floor(kl_loss: torch.Tensor, floor: float) -> torch.Tensor:
    """1.0 where the (0-d) KL is above the free-bits floor, else 0.0. NaN counts as above (it reaches the loss);
    with no floor (0) every value is above, so a diffusion estimate below 0 keeps its gradient."""
    if floor == 0:
        return torch.ones_like(kl_loss)
    return (~(kl_loss <= floor)).to(kl_loss.dtype)


def free_bits_kl_objective(kl_loss: torch.Tensor, prior_fit: torch.Tensor | None, kl_weight, floor: float):
    """What a training loss adds for the KL: value `kl_weight · max(kl_loss, floor)`, gradient split between the
    KL's two sides.

    - the posterior (and the response encoding) gets β times the floored KL's gradient: below the floor the latent
      carries information for free (free bits, Kingma et al. 2016), so the decoder learns to use it before the KL
      pressure closes it;
    - the prior's weights get the gradient of `prior_fit` (the same KL with the posterior samples detached) at
      weight 1, always: maximum likelihood on the posterior samples, so that the prior keeps following the posterior
      while β is annealed or the floor holds. `prior_fit` is None for a prior without weights (N(0, I)).
    At β = 1 above the floor this is the ELBO's exact gradient.
    """
    above = above_floor(kl_loss.detach(), floor)
    objective = kl_weight * (above * kl_loss + (1 - above) * floor)  # no gradient below the floor
    if prior_fit is None:
        return objective
    prior_share = 1 - kl_weight * above  # what `objective` left to give the prior, so that it gets weight 1
    return objective + prior_share * (prior_fit - prior_fit.detach())  # gradient only


__all__ = ["DiagonalGaussian", "GaussianHeads", "HierarchicalLatents", "KLEstimate", "KLLoss", "LayerPooling",
           "PosteriorSample", "StackedLinear", "free_bits_kl_objective", "kl_loss"]
