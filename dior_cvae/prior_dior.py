"""The priors p(z | c) of Dior-CVAE behind one interface (`LatentPrior`): `kl(posterior, context_vectors)` estimates
KL(q(z | c, r) ‖ p(z | c)) for a posterior draw, `sample(context_vectors, ...)` draws latents (B, L, ls) from
p(z | c). Three priors (`config.prior_type`):

- `StandardPrior`: N(0, I), the paper's wording; analytic KL, no weights.
- `GaussianPrior`: the learned hierarchical Gaussian p(z_l | z_<l, c) (the authors' "w/o diffusion"), sharing the
  posterior's aggregator of z_<l; analytic KL.
- `DiffusionPrior`: the conditional latent diffusion prior (paper §3.4, Alg. 1–2), always computed in float32;
  below.

The denoiser f_φ(z_λ, λ, e_c) sees the noisy concatenated latent z_λ (B, E), the noise level through sinusoidal
features of λ and a small MLP, and the condition e_c = all layers' pooled context vectors (B, L·d) through a condition
MLP; time and condition are summed before meeting z_λ (as in the authors' code), then `denoiser_layers` residual MLP
blocks. Classifier-free guidance: in training (`self.training`) each example's condition is replaced by zeros with
probability `cfg_dropout` (an evaluated bound keeps every condition); in sampling every step uses
(1 + w)·f(z, λ, e_c) − w·f(z, λ, 0), both branches in one batch (`DiorDenoiser.sampling_predictor`).

The KL term (paper Eq. 16) is E_q[log q(z | c, r)] + the bound below on −log p(z | c), which makes it an honest,
tight KL estimate. We use VDM's continuous-time bound (Kingma et al. 2021) rather than the authors' T = 50 discrete
DDPM loss, because:

- it is tight: with the optimal denoiser it equals −log p(z) up to the two end points, whose gap has a closed form
  for Gaussian data (`tests/test_prior.py` checks the Monte Carlo bound against it). The discrete DDPM loss with a fixed reverse variance ("fixed_small") is a bound only up to that
  variance choice, and its gap is not checked here;
- it depends on the noise schedule only through its end points, so training samples λ uniformly and no schedule
  or step count is baked into a checkpoint: any solver and step count can sample it:

    −log p(x) ≤ KL(q(z_min | x) ‖ N(0, I))                           terminal: λ = log_snr_min
              + ½ (λ_max − λ_min) E_{λ ~ U, ε}[‖ε − ε̂(z_λ, λ)‖²]      diffusion (VDM's L_∞, in λ)
              + E[−log N(x; z_max / α_max, σ_max² / α_max²)]           decoder at λ = log_snr_max (a constant)

The denoiser predicts v = α ε − σ x (`prediction_type="v_prediction"`) and its output layer starts at zero: then
ε̂ = σ z and x̂0 = α z, the exact denoiser of N(0, I) data, so at initialisation the prior *is* N(0, I) and the KL
estimate is the standard Gaussian KL (LSGM's mixed score, Vahdat et al. 2021); training starts where a working CVAE
starts, not at a penalty of hundreds of nats. v also keeps x̂0 bounded at high noise (x̂0 = α z − σ v̂), where an
ε-predictor's x̂0 = (z − σ ε̂)/α amplifies its error by 1/α (≈ 150 at λ = −10) and drives samples off the data.
"""

import functools
import math

import torch
from torch import nn

from .latent_dior import DiagonalGaussian, GaussianHeads, KLEstimate, PosteriorSample
from .scheduling_dior import DiorScheduler, alpha_sigma, to_x0_eps
from .utils_dior import generator_kwargs

EVAL_NOISE_LEVELS = 16  # noise levels per example in an evaluated bound (one per example in training)


def noise_level_embedding(log_snr: torch.Tensor, dim: int, config, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos; sin] of the (B,) noise levels, mapped to [0, 1000] (noisiest = 1000)."""
    position = 1000.0 * (config.log_snr_max - log_snr) / (config.log_snr_max - config.log_snr_min)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=log_snr.device, dtype=torch.float32) / half)
    args = position.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ZeroInitLinear(nn.Linear):
    """A Linear layer that `_init_weights` starts at zero."""


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.norm(hidden))


class DiorDenoiser(nn.Module):
    """f_φ(z_λ, λ, e_c) → v, ε or x0 (`config.prediction_type`), shape (B, E). `output` is zero-initialised.

    `input_proj([z; t + c])` is linear, so it is computed as the sum of three parts: `latent_part(z)`,
    `noise_level_part(λ)` and `condition_part(e_c)` (which holds the bias). A sampling loop computes the last two
    once per call (every step's λ in one batch; the condition, and the zero condition of guidance, once) and only the
    latent part and `denoise` per step."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        latent, hidden = config.total_latent_size, config.denoiser_hidden_size
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.condition_mlp = nn.Sequential(
            nn.Linear(config.d_model * config.encoder_layers, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.input_proj = nn.Linear(latent + hidden, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(config.denoiser_layers))
        self.output_norm = nn.LayerNorm(hidden)
        self.output = ZeroInitLinear(hidden, latent)

    def latent_part(self, noisy_latent: torch.Tensor) -> torch.Tensor:
        """(N, E) → (N, hidden): the noisy latent's share of `input_proj`."""
        return nn.functional.linear(noisy_latent, self.input_proj.weight[:, : self.config.total_latent_size])

    def noise_level_part(self, log_snr: torch.Tensor) -> torch.Tensor:
        """(N,) noise levels → (N, hidden): their share of `input_proj`, through the sinusoidal features and
        `time_mlp`."""
        time_features = noise_level_embedding(log_snr, self.time_mlp[0].in_features, self.config)
        return nn.functional.linear(self.time_mlp(time_features), self.input_proj.weight[:, self.config.total_latent_size :])

    def condition_part(self, condition: torch.Tensor) -> torch.Tensor:
        """(N, L·d) conditions → (N, hidden): their share of `input_proj`, through `condition_mlp`, plus its bias."""
        weight = self.input_proj.weight[:, self.config.total_latent_size :]
        return nn.functional.linear(self.condition_mlp(condition), weight, self.input_proj.bias)

    def denoise(self, hidden: torch.Tensor) -> torch.Tensor:
        """The residual blocks and the output layer: the sum of the three parts (N, hidden) → the prediction (N, E)."""
        for block in self.blocks:
            hidden = block(hidden)
        return self.output(nn.functional.silu(self.output_norm(hidden)))

    def forward(self, noisy_latent: torch.Tensor, log_snr: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.denoise(
            self.latent_part(noisy_latent) + self.noise_level_part(log_snr) + self.condition_part(condition)
        )

    def sampling_predictor(self, log_snrs: torch.Tensor, condition: torch.Tensor, guidance: float):
        """For a sampling loop over the noise levels `log_snrs` (steps,) given the conditions (B, L·d): a function
        (step_index, z (B, E)) → the guided prediction (1 + w)·f(z, λ_i, c) − w·f(z, λ_i, 0) (B, E). What does not
        depend on z is computed here, once: every step's noise-level part, and the condition part (of [c; 0] with
        guidance, whose two branches then run as one batch (2, B, ·))."""
        noise_level_parts = self.noise_level_part(log_snrs)  # (steps, hidden)
        conditions = condition if guidance == 0 else torch.stack([condition, torch.zeros_like(condition)])
        condition_parts = self.condition_part(conditions)  # (B, hidden) or (2, B, hidden)

        def predict(step_index: int, noisy: torch.Tensor) -> torch.Tensor:
            prediction = self.denoise(condition_parts + (self.latent_part(noisy) + noise_level_parts[step_index]))
            return prediction if guidance == 0 else torch.lerp(prediction[1], prediction[0], 1 + guidance)

        return predict


class LatentPrior:
    """The interface of the priors (each also an `nn.Module`): p(z | c) over the latents (B, L, ls), given the pooled
    context vectors (B, L, d), with the model's configuration as `config`.

    `sample` takes `None` for a setting to use the configuration's (`prior_temperature`, `num_inference_steps`,
    `prior_guidance_scale`); a prior without that setting ignores it. `has_weights`: whether the prior has weights
    to fit to the posterior samples (see `latent_dior.kl_loss`). The two Gaussian priors also give their density:
    `distribution(summaries, context_vectors)`, a `DiagonalGaussian` over (B, L, ls)."""

    has_weights = True
    config = None

    def kl(self, posterior: PosteriorSample, context_vectors: torch.Tensor, generator=None) -> KLEstimate:
        """KL(q(z | c, r) ‖ p(z | c)) per example (B,) for the posterior draw `posterior`."""
        raise NotImplementedError

    def sample(self, context_vectors: torch.Tensor, generator=None, temperature=None, num_inference_steps=None,
               guidance_scale=None, compile: bool = True) -> torch.Tensor:
        """Latents (B, L, ls) drawn from p(z | c), the prior's noise scaled by `temperature` (τ, see
        `prior_temperature`)."""
        raise NotImplementedError

    def _temperature(self, temperature):
        return self.config.prior_temperature if temperature is None else temperature


class StandardPrior(LatentPrior, nn.Module):
    """p(z | c) = N(0, I) for every layer: the analytic KL of the posterior to it."""

    has_weights = False

    def __init__(self, config):
        super().__init__()
        self.config = config

    def distribution(self, summaries, context_vectors) -> DiagonalGaussian:
        """N(0, I) over the shape of the layer summaries (B, L, ls)."""
        return DiagonalGaussian.standard(summaries)

    def kl(self, posterior, context_vectors, generator=None) -> KLEstimate:
        distribution = posterior.distribution
        return KLEstimate(distribution.kl(DiagonalGaussian.standard(distribution.mean)).sum(-1), None, None)

    def sample(self, context_vectors, generator=None, temperature=None, num_inference_steps=None,
               guidance_scale=None, compile=True) -> torch.Tensor:
        shape = (context_vectors.shape[0], context_vectors.shape[1], self.config.latent_size)
        noise = torch.randn(shape, device=context_vectors.device, dtype=context_vectors.dtype,
                            **generator_kwargs(generator))
        return self._temperature(temperature) * noise


class GaussianPrior(GaussianHeads, LatentPrior):
    """The learned hierarchical Gaussian p(z_l | z_<l, c): per layer a Gaussian head on [h_l; c_l], with h_l the
    summary of z_<l by the aggregator it shares with the posterior (`ancestral`, the bound method of
    `latent_dior.HierarchicalLatents` that owns this module; a method, not a submodule, so that the aggregator's
    weights keep one name). KL to the posterior analytic, per layer given the posterior's summaries."""

    def __init__(self, config, ancestral):
        d, ls = config.d_model, config.latent_size
        super().__init__(config.encoder_layers, ls, d, d, ls)
        self.config = config
        self.ancestral = ancestral

    def distribution(self, summaries, context_vectors) -> DiagonalGaussian:
        """p(z_l | z_<l, c) of every layer at once, given the summaries h_l (B, L, ls) of z_<l: over (B, L, ls)."""
        return DiagonalGaussian.from_params(self(summaries, context_vectors))

    def kl(self, posterior, context_vectors, generator=None) -> KLEstimate:
        prior = self.distribution(posterior.summaries, context_vectors)
        return KLEstimate(posterior.distribution.kl(prior).sum(-1), None, None)

    def sample(self, context_vectors, generator=None, temperature=None, num_inference_steps=None,
               guidance_scale=None, compile=True) -> torch.Tensor:
        return self.ancestral(self, context_vectors, generator, self._temperature(temperature)).latents


class DiffusionPrior(LatentPrior, nn.Module):
    """p(z | c) as a conditional latent diffusion over all layers' latents concatenated (B, E = L·ls), conditioned on
    all layers' context vectors concatenated (B, L·d). It trains on posterior samples (x = z, not detached, as in
    LSGM and the authors' code): `kl` = E_q[log q(z | c, r)] + `nll_bound`, the module docstring's bound (Eq. 16).

    Parameters and arithmetic stay float32 whatever the model's dtype (casts such as `model.half()` skip this module;
    autocast is off inside it): the prior's regression targets are small differences the bf16 mantissa loses."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.denoiser = DiorDenoiser(config)

    def kl(self, posterior, context_vectors, generator=None) -> KLEstimate:
        # E_q[log q] = -Σ_l H(q_l(· | z_<l)): exact given the sampled z_<l, so it adds no sampling noise
        neg_entropy = -posterior.distribution.entropy().sum(-1)
        prior_nll = self.nll_bound(posterior.latents.flatten(1), context_vectors.flatten(1), generator)
        return KLEstimate(neg_entropy + prior_nll, neg_entropy, prior_nll)

    def _apply(self, fn, recurse=True):
        def keep_float32(tensor):
            result = fn(tensor)
            return result.float() if tensor.is_floating_point() and result.is_floating_point() else result

        return super()._apply(keep_float32, recurse)

    def nll_bound(self, latents: torch.Tensor, condition: torch.Tensor, generator=None) -> torch.Tensor:
        """The module docstring's bound on −log p(z | c) for each of the (B, E) posterior samples: (B,) float32.

        Its diffusion term is a one-sample Monte Carlo estimate over the noise level in training (the gradient
        averages it over the batch and the steps); evaluated (`not self.training`), each example's term averages
        `EVAL_NOISE_LEVELS` noise levels, stratified, so that a validation KL over a few hundred examples is not
        dominated by the noise of the estimator."""
        config = self.config
        levels = 1 if self.training else EVAL_NOISE_LEVELS
        with torch.autocast(latents.device.type, enabled=False):
            x, condition = latents.float(), condition.float()
            batch, dim = x.shape
            lam_min, lam_max = config.log_snr_min, config.log_snr_max
            # stratified λ (VDM's low-discrepancy sampler): example i's k-th level at offset + i / (B·K) + k / K, so
            # each example's K levels are stratified and all B·K levels together form one shifted grid; same
            # expectation, lower variance. Each example's λ is uniform on its own (the offset is), so no
            # permutation is needed (`x[randperm]` trips inductor's pattern matcher under dynamic shapes). Every k-th
            # row from any start is stratified too (`latent_dior.kl_loss` interleaves a detached copy of the batch:
            # each half is stratified).
            offset = torch.rand((), device=x.device, **generator_kwargs(generator))
            grid = torch.arange(batch, device=x.device)[:, None] / (batch * levels)
            u = (offset + grid + torch.arange(levels, device=x.device) / levels) % 1.0  # (B, K)
            log_snr = (lam_min + (lam_max - lam_min) * u).flatten()
            alpha, sigma = (a.unsqueeze(-1) for a in alpha_sigma(log_snr))
            x_levels = x if levels == 1 else x.repeat_interleave(levels, dim=0)
            noise = torch.randn(x_levels.shape, device=x.device, **generator_kwargs(generator))
            noisy = alpha * x_levels + sigma * noise
            if self.training and config.cfg_dropout > 0:  # guidance's unconditional branch is learned in training
                keep = torch.rand(batch, 1, device=x.device, **generator_kwargs(generator)) >= config.cfg_dropout
                condition = condition * keep
            if levels > 1:
                condition = condition.repeat_interleave(levels, dim=0)
            prediction = self.denoiser(noisy, log_snr, condition)
            _, pred_noise = to_x0_eps(config.prediction_type, prediction, noisy, alpha, sigma)
            squared_error = (noise - pred_noise).pow(2).sum(-1).view(batch, levels).mean(1)
            diffusion = 0.5 * (lam_max - lam_min) * squared_error
            alpha2_min = 1 / (1 + math.exp(-lam_min))
            terminal = 0.5 * (alpha2_min * x.pow(2) - alpha2_min - math.log1p(-alpha2_min)).sum(-1)
            decoder = dim * 0.5 * (math.log(2 * math.pi * math.e) - lam_max)
            return terminal + diffusion + decoder

    @torch.no_grad()
    def sample(self, context_vectors, generator=None, temperature=None, num_inference_steps=None,
               guidance_scale=None, compile: bool = True, initial_noise=None) -> torch.Tensor:
        """Draw z ~ p(z | c) with `config.sampler` from pure noise at `log_snr_min` scaled by `temperature`
        (`initial_noise` (B, E) is used as given): (B, L, ls) float32. On CUDA the noise-free solvers run as one CUDA
        graph (`compiled_solve`) unless `compile=False`."""
        config = self.config
        steps = config.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = config.prior_guidance_scale if guidance_scale is None else guidance_scale
        temperature = float(self._temperature(temperature))
        batch, num_layers = context_vectors.shape[:2]
        with torch.autocast(context_vectors.device.type, enabled=False):
            condition = context_vectors.flatten(1).float()
            scheduler = DiorScheduler(self.config)
            scheduler.set_timesteps(steps, condition.device)
            latents = initial_noise
            if latents is None:
                shape = (batch, config.total_latent_size)
                latents = temperature * torch.randn(shape, generator=generator, device=condition.device)
            if compile and scheduler.eta == 0 and latents.is_cuda and not torch.compiler.is_compiling():
                # .clone(): a CUDA graph's output is overwritten by its next replay
                sample = compiled_solve()(self.denoiser, scheduler, latents, condition, guidance).clone()
            else:
                sample = solve(self.denoiser, scheduler, latents, condition, guidance, generator, temperature)
            return sample.view(batch, num_layers, config.latent_size)


def solve(denoiser, scheduler, latents, condition, guidance: float, generator=None, temperature: float = 1.0):
    """The sampling loop: from `latents` at the noisiest grid point of `scheduler` to the data-scale sample (B, E)."""
    predict = denoiser.sampling_predictor(scheduler.log_snrs, condition, guidance)
    x0 = None
    for step_index in range(scheduler.num_inference_steps):
        latents, x0 = scheduler.step(predict(step_index, latents), step_index, latents, previous_x0=x0,
                                     generator=generator, noise_scale=temperature)
    return scheduler.final_sample(latents)


@functools.cache
def compiled_solve():
    """`solve` for the noise-free solvers (DPM-Solver++, DDIM with η = 0) as one CUDA graph: a loop of many small
    kernels, bound by the host's launches when eager, replayed as one graph (docs/performance.md). Compiled once per
    process; torch.compile keeps one graph per batch size, step count and solver."""
    return torch.compile(solve, mode="reduce-overhead", fullgraph=True, dynamic=False)


__all__ = ["DiffusionPrior", "DiorDenoiser", "GaussianPrior", "LatentPrior", "StandardPrior", "ZeroInitLinear",
           "compiled_solve", "solve"]
