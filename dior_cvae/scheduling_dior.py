"""Noise schedule and samplers of the latent diffusion prior, with a diffusers-style `set_timesteps` / `step` API.

Why not `diffusers.DDPMScheduler` / `DDIMScheduler` themselves: the model is loaded as remote code, so every import
here becomes a hard requirement of *loading* a checkpoint (diffusers is not in the usual transformers install, nor in
our GPU image); and their `step` reads per-step scalars on the host, which keeps the 50-step loop from being captured
in one CUDA graph. The formulas are diffusers' — `tests/test_scheduler.py` checks `step` and `add_noise` against
`DDPMScheduler` (variance "fixed_small") and `DDIMScheduler` (`set_alpha_to_one=True`) number for number, with the
same "leading" timestep spacing — but every per-step coefficient is precomputed into a device tensor by
`set_timesteps`, so `step` issues only tensor arithmetic.

The schedule is a pure function of the configuration (no buffers), so it cannot be lost or corrupted by
`save_pretrained` / `from_pretrained`.
"""

import math

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(config) -> torch.Tensor:
    """β_1..β_T (float64) for `config.beta_schedule`, as diffusers defines them."""
    steps = config.num_train_timesteps
    cpu = torch.device("cpu")  # explicit: models are built under a meta-device context by `from_pretrained`
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, steps, dtype=torch.float64, device=cpu)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, steps, dtype=torch.float64, device=cpu) ** 2
    if config.beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        return torch.tensor(betas, dtype=torch.float64, device=cpu)
    raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}, got {config.beta_schedule!r}")


class DiorScheduler:
    """DDPM (ancestral) and DDIM sampling of the latent prior, plus the forward process used in training.

    Usage::

        scheduler = DiorScheduler(config)
        scheduler.set_timesteps(25, device)
        z = torch.randn(...)
        for i, t in enumerate(scheduler.timestep_values):
            z = scheduler.step(denoiser(z, t), i, z, generator=g)
    """

    def __init__(self, config):
        self.num_train_timesteps = config.num_train_timesteps
        self.prediction_type = config.prediction_type
        self.sampler = config.sampler
        self.eta = config.ddim_eta
        self.clip_sample = config.clip_sample
        self.betas = make_betas(config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # Variational bound of DDPM in ε form: −log p(z_0) ≤ Σ_t λ_t ‖ε − ε̂(z_t, t)‖² + C + KL(q(z_T|z_0) ‖ N(0, I)),
        # λ_t = β_t / (2 α_t (1 − ᾱ_{t−1})) for t ≥ 1 (reverse variance β̃_t), λ_0 = 1 / (2 α_0) from the
        # Gaussian decoder term −log N(z_0; μ̂, β_0) whose normaliser is C = ½ log(2π β_0) per dimension.
        alphas = 1.0 - self.betas
        alphas_cumprod_prev = torch.cat([torch.ones_like(alphas[:1]), self.alphas_cumprod[:-1]])
        self.vlb_weights = self.betas / (2 * alphas * (1 - alphas_cumprod_prev).clamp(min=1e-20))
        self.vlb_weights[0] = 1 / (2 * alphas[0])
        self.vlb_constant_per_dim = 0.5 * math.log(2 * math.pi * float(self.betas[0]))
        self._alphas_cumprod_on = {}
        self._vlb_weights_on = {}
        self.set_timesteps(config.num_inference_steps)

    def alphas_cumprod_on(self, device, dtype=torch.float32) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[key] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return self._alphas_cumprod_on[key]

    def vlb_weights_on(self, device, prediction_type: str) -> torch.Tensor:
        """Per-timestep weight of the summed squared error of the `prediction_type` output in T·L_t."""
        key = (torch.device(device), prediction_type)
        if key not in self._vlb_weights_on:
            weights = self.num_train_timesteps * self.vlb_weights
            if prediction_type == "sample":  # ‖ε − ε̂‖² = ᾱ_t / (1 − ᾱ_t) ‖z_0 − ẑ_0‖²
                weights = weights * self.alphas_cumprod / (1 - self.alphas_cumprod)
            self._vlb_weights_on[key] = weights.to(device=device, dtype=torch.float32)
        return self._vlb_weights_on[key]

    def terminal_kl(self, sample: torch.Tensor) -> torch.Tensor:
        """KL(q(z_T | z_0) ‖ N(0, I)) summed over the last dimension: (B,)."""
        alpha_bar = float(self.alphas_cumprod[-1])
        return 0.5 * (alpha_bar * sample.float().pow(2) - alpha_bar - math.log(1 - alpha_bar)).sum(-1)

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.LongTensor) -> torch.Tensor:
        """q(z_t | z_0) = N(√ᾱ_t z_0, (1 − ᾱ_t) I); `timesteps` (B,) in [0, T)."""
        alpha_bar = self.alphas_cumprod_on(sample.device, sample.dtype)[timesteps].unsqueeze(-1)
        return alpha_bar.sqrt() * sample + (1 - alpha_bar).sqrt() * noise

    def set_timesteps(self, num_inference_steps: int, device="cpu"):
        """Choose the denoising timesteps ("leading" spacing) and precompute each step's coefficients on `device`."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` must be in [1, {self.num_train_timesteps}], got {num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps
        stride = self.num_train_timesteps // num_inference_steps
        timesteps = (torch.arange(num_inference_steps, device=self.betas.device) * stride).flip(0)
        alpha_bar = self.alphas_cumprod[timesteps]
        prev = timesteps - stride
        alpha_bar_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], torch.ones((), dtype=torch.float64, device=self.betas.device))
        beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
        step_alpha = alpha_bar / alpha_bar_prev
        if self.sampler == "ddpm":
            # posterior mean μ̃(x_t, x̂0) and "fixed_small" variance β̃_t (no noise at the last step)
            coef_x0 = alpha_bar_prev.sqrt() * (1 - step_alpha) / beta_bar
            coef_xt = step_alpha.sqrt() * beta_bar_prev / beta_bar
            coef_eps = torch.zeros_like(coef_x0)
            std = (beta_bar_prev / beta_bar * (1 - step_alpha)).clamp(min=1e-20).sqrt()
            std = torch.where(timesteps > 0, std, torch.zeros((), dtype=torch.float64, device=self.betas.device))
        else:
            # x_{t-1} = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z
            std = self.eta * (beta_bar_prev / beta_bar * (1 - step_alpha)).sqrt()
            coef_x0 = alpha_bar_prev.sqrt()
            coef_xt = torch.zeros_like(coef_x0)
            coef_eps = (beta_bar_prev - std**2).clamp(min=0).sqrt()
        table = torch.stack([alpha_bar.sqrt(), beta_bar.sqrt(), coef_x0, coef_xt, coef_eps, std], dim=1)
        self.timesteps = timesteps.to(device)
        self.timestep_values = timesteps.tolist()  # host copy: iterating it needs no device sync
        self._table = table.to(device=device, dtype=torch.float32)
        return self.timesteps

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor, generator=None) -> torch.Tensor:
        """One reverse step from `self.timesteps[step_index]`: returns the less noisy sample."""
        sqrt_alpha_bar, sqrt_beta_bar, coef_x0, coef_xt, coef_eps, std = self._table[step_index].to(sample.dtype)
        if self.prediction_type == "epsilon":
            pred_eps = model_output
            pred_x0 = (sample - sqrt_beta_bar * pred_eps) / sqrt_alpha_bar
        else:
            pred_x0 = model_output
            pred_eps = (sample - sqrt_alpha_bar * pred_x0) / sqrt_beta_bar
        if self.clip_sample:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            pred_eps = (sample - sqrt_alpha_bar * pred_x0) / sqrt_beta_bar
        prev_sample = coef_x0 * pred_x0 + coef_xt * sample + coef_eps * pred_eps
        if self.sampler == "ddpm" and step_index == self.num_inference_steps - 1:
            return prev_sample
        if self.sampler == "ddim" and self.eta == 0:
            return prev_sample
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return prev_sample + std * noise
