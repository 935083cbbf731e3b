"""The conditional latent diffusion prior of Dior-CVAE (paper §3.4, Alg. 1–2).

The denoiser f_φ(z_t, t, e_c) sees the noisy concatenated latent z_t (B, E), the timestep t through sinusoidal
features and a small MLP, and the condition e_c = all layers' pooled context vectors (B, L·d) through a condition MLP.
As in the authors' code (and unlike the paper's one-layer Eq. 15) time and condition each get an MLP and are summed
before meeting z_t; the trunk is `denoiser_layers` residual MLP blocks. Classifier-free guidance: in training, each
example's condition is replaced by zeros with probability `cfg_dropout`; in sampling every step uses
(1 + w)·f(z_t, t, e_c) − w·f(z_t, t, 0), with the two branches run as one batch.
"""

import math

import torch
from torch import nn

from .scheduling_dior import DiorScheduler


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos; sin] of (B,) timesteps, as in improved-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(self.norm(hidden))


class DiorDenoiser(nn.Module):
    """f_φ(z_t, t, e_c) → prediction of ε or z_0 (`config.prediction_type`), shape (B, E)."""

    def __init__(self, config):
        super().__init__()
        latent, hidden = config.total_latent_size, config.denoiser_hidden_size
        self.time_scale = 1000.0 / config.num_train_timesteps  # timesteps fed as 0, 20, …, 980 for T = 50
        self.time_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.condition_mlp = nn.Sequential(
            nn.Linear(config.d_model * config.encoder_layers, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.input_proj = nn.Linear(latent + hidden, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(config.denoiser_layers))
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, latent))

    def forward(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        hidden_size = self.time_mlp[0].in_features
        time_features = timestep_embedding(timesteps * self.time_scale, hidden_size).to(noisy_latent.dtype)
        time_and_condition = self.time_mlp(time_features) + self.condition_mlp(condition)
        hidden = self.input_proj(torch.cat([noisy_latent, time_and_condition], dim=-1))
        for block in self.blocks:
            hidden = block(hidden)
        return self.output(hidden)


class DiffusionPrior(nn.Module):
    """Trains on posterior samples (x0 = z, not detached, as in LSGM and the authors' code) and samples latents."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.denoiser = DiorDenoiser(config)
        self.scheduler = DiorScheduler(config)

    def loss(self, latents: torch.Tensor, condition: torch.Tensor, generator=None) -> torch.Tensor:
        """The cross-entropy term of Eq. 16 per example (B,): an estimate of −log p(z | c) for posterior samples.

        `latents` (B, E) are posterior samples, `condition` (B, L·d). One timestep per example; the denoiser
        regresses ε or z_0 (`prediction_type`). With `prior_loss_weighting="vlb"` the squared error is weighted as
        in DDPM's variational bound (T·λ_t, plus the decoder normaliser and the terminal KL), so that together
        with E[log q] it is a KL estimate; `"simple"` is ½‖f − target‖² with unit weight (the authors' code)."""
        batch = latents.shape[0]
        scheduler = self.scheduler
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (batch,), generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if self.config.cfg_dropout > 0:
            keep = torch.rand(batch, 1, generator=generator, device=latents.device) >= self.config.cfg_dropout
            condition = condition * keep.to(condition.dtype)
        prediction = self.denoiser(noisy, timesteps, condition)
        target = noise if self.config.prediction_type == "epsilon" else latents
        squared_error = (prediction.float() - target.float()).pow(2).sum(-1)
        if self.config.prior_loss_weighting == "simple":
            return 0.5 * squared_error
        weights = scheduler.vlb_weights_on(latents.device, self.config.prediction_type)[timesteps]
        return weights * squared_error + latents.shape[1] * scheduler.vlb_constant_per_dim + scheduler.terminal_kl(latents)

    def guided_prediction(self, noisy, timestep: int, condition, guidance: float) -> torch.Tensor:
        """(1 + w)·f(z_t, t, c) − w·f(z_t, t, 0); both branches in one batch."""
        batch = noisy.shape[0]
        if guidance == 0:
            return self.denoiser(noisy, noisy.new_full((batch,), timestep), condition)
        both = self.denoiser(
            torch.cat([noisy, noisy]),
            noisy.new_full((2 * batch,), timestep),
            torch.cat([condition, torch.zeros_like(condition)]),
        )
        conditional, unconditional = both.chunk(2)
        return (1 + guidance) * conditional - guidance * unconditional

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, num_inference_steps=None, prior_guidance_scale=None, generator=None,
               initial_noise=None) -> torch.Tensor:
        """Draw z ~ p(z | c) by running the reverse process from pure noise: (B, E)."""
        steps = num_inference_steps or self.config.num_inference_steps
        guidance = self.config.prior_guidance_scale if prior_guidance_scale is None else prior_guidance_scale
        if (self.scheduler.sampler, self.scheduler.eta, self.scheduler.clip_sample) != (
            self.config.sampler, self.config.ddim_eta, self.config.clip_sample
        ):  # the sampler settings were changed on the config (e.g. `model.config.sampler = "ddim"`)
            self.scheduler = DiorScheduler(self.config)
        if self.scheduler.num_inference_steps != steps or self.scheduler.timesteps.device != condition.device:
            self.scheduler.set_timesteps(steps, condition.device)
        shape = (condition.shape[0], self.config.total_latent_size)
        latents = initial_noise
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=condition.device, dtype=condition.dtype)
        for step_index, timestep in enumerate(self.scheduler.timestep_values):
            prediction = self.guided_prediction(latents, timestep, condition, guidance)
            latents = self.scheduler.step(prediction, step_index, latents, generator=generator)
        return latents
