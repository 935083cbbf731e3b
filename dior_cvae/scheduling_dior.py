"""Noise schedule and solvers of the latent diffusion prior, with a diffusers-style `set_timesteps` / `step` API.

The forward process is variance preserving and continuous in time (as in VDM, Kingma et al. 2021), indexed by the
log signal-to-noise ratio λ = log(α²/σ²), with α² = sigmoid(λ), σ² = sigmoid(−λ):

    z_λ = α_λ x + σ_λ ε,   λ ∈ [log_snr_min, log_snr_max]   (log_snr_min: almost pure noise; log_snr_max: almost x)

Training needs no time grid: the prior's bound depends on the end points only (see `prior_dior`). Sampling walks a
grid of `num_inference_steps` steps uniform in λ from `log_snr_min` to `log_snr_max` (`log_snr_grid`): every step
count starts from pure noise ("trailing" spacing in diffusers' terms; a 1-step sampler is a one-shot denoiser, not
N(0, I)).

Solvers (`sampler`), all in terms of the denoiser's x̂0 and ε̂ at the current point s and the next point t:

- `"ddim"` (Song et al. 2021): z_t = α_t x̂0 + √(σ_t² − c²) ε̂ + c·n, c = η σ_t √(1 − e^(λ_s − λ_t)), η = `ddim_eta`.
- `"ddpm"`: ancestral sampling from q(z_t | z_s, x̂0) (Ho et al. 2020), which is DDIM with η = 1.
- `"dpmsolver++"`: DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver in data prediction, with
  first-order first and last steps (diffusers' `lower_order_final`, here at every step count: the second-order
  update across the last, widest step in λ is unstable; docs/design.md).

Every per-step coefficient is precomputed by `set_timesteps` into one device tensor, so `step` issues only tensor
arithmetic (no host syncs: the loop can be captured in a CUDA graph). `tests/test_prior.py` checks DDIM against
diffusers' `DDIMScheduler` on the same α, σ grid (when diffusers is installed), the noise-free solvers against the
exact probability-flow ODE solution of Gaussian data (DPM-Solver++ second order, DDIM first order), and DDPM (a
stochastic sampler, with no ODE path to compare) by the mean and spread of its samples of Gaussian data.
Not diffusers itself: this file is remote code, and every import here would become a requirement of *loading* a
checkpoint (diffusers is in neither the usual transformers install nor our GPU image).
"""

from typing import NamedTuple

import torch

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")

# columns of the per-step table
_ALPHA_S, _SIGMA_S, _ALPHA_T, _SIGMA_T, _NOISE, _DPM_Z, _DPM_D, _DPM_CUR, _DPM_PREV = range(9)


def alpha_sigma(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, σ) of the variance-preserving process at log-SNR λ: α² = sigmoid(λ), σ² = sigmoid(−λ)."""
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def to_x0(prediction_type: str, model_output, sample, alpha, sigma):
    """x̂0 from the denoiser's output at a point z = α x + σ ε (`to_x0_eps` adds ε̂)."""
    if prediction_type == "v_prediction":  # v = α ε − σ x
        return alpha * sample - sigma * model_output
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    return model_output


def to_x0_eps(prediction_type: str, model_output, sample, alpha, sigma):
    """(x̂0, ε̂) from the denoiser's output at a point z = α x + σ ε."""
    x0 = to_x0(prediction_type, model_output, sample, alpha, sigma)
    if prediction_type == "v_prediction":  # v = α ε − σ x
        return x0, sigma * sample + alpha * model_output
    if prediction_type == "epsilon":
        return x0, model_output
    return x0, (sample - alpha * model_output) / sigma


def log_snr_grid(log_snr_min: float, log_snr_max: float, steps: int) -> torch.Tensor:
    """`steps + 1` points uniform in λ from `log_snr_min` to `log_snr_max` (float64, noisiest first).

    Uniform in λ treats every data scale alike (docs/design.md compares it with the cosine schedule's grid)."""
    return torch.linspace(log_snr_min, log_snr_max, steps + 1, dtype=torch.float64)


class SchedulerOutput(NamedTuple):
    prev_sample: torch.Tensor  # z at the next (less noisy) point
    pred_original_sample: torch.Tensor  # x̂0 at the current point (the multistep solver's memory)


class DiorScheduler:
    """Sampling of the latent prior, plus the conversions between the denoiser's output and (x̂0, ε̂).

    Usage::

        scheduler = DiorScheduler(config)
        scheduler.set_timesteps(20, device)
        z, x0 = torch.randn(...), None
        for i, log_snr in enumerate(scheduler.log_snrs):          # (steps,) device tensor, noisiest first
            z, x0 = scheduler.step(denoiser(z, log_snr), i, z, previous_x0=x0, generator=g)
        sample = scheduler.final_sample(z)
    """

    def __init__(self, config):
        self.log_snr_min = float(config.log_snr_min)
        self.log_snr_max = float(config.log_snr_max)
        self.prediction_type = config.prediction_type
        self.sampler = config.sampler
        self.eta = 1.0 if config.sampler == "ddpm" else float(config.ddim_eta)
        self.set_timesteps(config.num_inference_steps)

    def set_timesteps(self, num_inference_steps: int, device="cpu"):
        """The λ grid (uniform, noisiest first, ending at `log_snr_max`) and each step's coefficients on `device`."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")
        steps = num_inference_steps
        grid = log_snr_grid(self.log_snr_min, self.log_snr_max, steps)
        lam_s, lam_t = grid[:-1], grid[1:]
        alpha_s, sigma_s = alpha_sigma(lam_s)
        alpha_t, sigma_t = alpha_sigma(lam_t)
        noise = self.eta * sigma_t * (1 - torch.exp(lam_s - lam_t)).clamp(min=0).sqrt()
        # DPM-Solver++ in its own log-SNR h = (λ_t − λ_s) / 2: z_t = (σ_t/σ_s) z_s − α_t (e^−h − 1) D
        h = (lam_t - lam_s) / 2
        dpm_z = sigma_t / sigma_s
        dpm_d = -alpha_t * torch.expm1(-h)
        # D = (1 + 1/2r) x̂0_s − (1/2r) x̂0_prev, r = h_prev / h; first order at the first and the last step
        r = torch.cat([h[:1], h[:-1]]) / h
        second_order = torch.ones(steps, dtype=torch.bool)
        second_order[0] = second_order[-1] = False
        dpm_prev = torch.where(second_order, -1 / (2 * r), torch.zeros_like(r))
        dpm_cur = 1 - dpm_prev
        table = torch.stack([alpha_s, sigma_s, alpha_t, sigma_t, noise, dpm_z, dpm_d, dpm_cur, dpm_prev], dim=1)
        self.num_inference_steps = steps
        self.log_snrs = lam_s.to(device=device, dtype=torch.float32)
        self._table = table.to(device=device, dtype=torch.float32)
        self._final_alpha = float(alpha_t[-1])
        return self.log_snrs

    def step(self, model_output, step_index: int, sample, previous_x0=None, generator=None,
             noise_scale: float = 1.0) -> SchedulerOutput:
        """One step from grid point `step_index` to the next; `previous_x0` is the last step's x̂0 (multistep);
        `noise_scale` multiplies the fresh noise of DDPM / DDIM with η > 0 (the prior's temperature)."""
        row = self._table[step_index]
        if self.sampler == "dpmsolver++":  # needs x̂0 only
            x0 = to_x0(self.prediction_type, model_output, sample, row[_ALPHA_S], row[_SIGMA_S])
            data = x0 if previous_x0 is None else row[_DPM_CUR] * x0 + row[_DPM_PREV] * previous_x0
            return SchedulerOutput(row[_DPM_Z] * sample + row[_DPM_D] * data, x0)
        x0, eps = to_x0_eps(self.prediction_type, model_output, sample, row[_ALPHA_S], row[_SIGMA_S])
        alpha_t, sigma_t, noise_std = row[_ALPHA_T], row[_SIGMA_T], row[_NOISE]
        prev = alpha_t * x0 + (sigma_t**2 - noise_std**2).clamp(min=0).sqrt() * eps
        if self.eta > 0:
            noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev = prev + (noise_scale * noise_std) * noise
        return SchedulerOutput(prev, x0)

    def final_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """The sample at `log_snr_max` mapped to data scale: the mean of the prior's decoder N(z/α, σ²/α²)."""
        return sample / self._final_alpha


__all__ = ["DiorScheduler", "log_snr_grid", "PREDICTION_TYPES", "SAMPLERS", "SchedulerOutput", "alpha_sigma", "to_x0_eps"]
