"""The diffusion prior as a distribution: a tight bound, samples where the data is, solvers that converge."""

import math

import pytest
import torch

from dior_cvae import DiorCVAEConfig
from dior_cvae.prior_dior import DiffusionPrior
from dior_cvae.scheduling_dior import DiorScheduler, alpha_sigma, log_snr_grid

from conftest import ForwardDenoiser, tiny_config_kwargs


class gaussian_x0(ForwardDenoiser):
    """The optimal denoiser of N(mean, std²) data, as v-prediction: E[x | z_λ] and v = (α z − x̂0) / σ."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, noisy, log_snr, condition):
        alpha, sigma = (a.unsqueeze(-1) for a in alpha_sigma(log_snr))
        x0 = self.mean + alpha * self.std**2 * (noisy - alpha * self.mean) / (alpha**2 * self.std**2 + sigma**2)
        return (alpha * noisy - x0) / sigma


def exact_gap_per_dim(mean, std, config):
    """E[bound] − E[−log p] per dimension for N(mean, std²) data with the optimal denoiser, in closed form: the
    diffusion term is ½ ∫ Var(ε | z_λ) dλ = ½ [log(1 + e^λ std²)] from λ_min to λ_max, the terminal term is the
    Gaussian KL at λ_min, the decoder term a constant; what remains is the error of the two end points."""
    lam_min, lam_max = config.log_snr_min, config.log_snr_max
    a2 = 1 / (1 + math.exp(-lam_min))
    diffusion = 0.5 * (math.log1p(math.exp(lam_max) * std**2) - math.log1p(math.exp(lam_min) * std**2))
    terminal = 0.5 * (a2 * (mean**2 + std**2) - a2 - math.log1p(-a2))
    decoder = 0.5 * (math.log(2 * math.pi * math.e) - lam_max)
    return terminal + diffusion + decoder - 0.5 * math.log(2 * math.pi * math.e * std**2)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (1.5, 0.3), (-0.5, 2.0), (0.2, 0.05)])
def test_bound_is_tight_for_gaussian_data_with_the_optimal_denoiser(mean, std):
    """The evaluated bound's mean gap to −log p (the data's own density: true KL(q‖p) = 0) is the closed-form end-point
    error (3e-5 to 0.009 nat per dimension here), within 4 standard errors (≈ 0.004 nat per dimension)."""
    torch.manual_seed(0)
    config = DiorCVAEConfig(**tiny_config_kwargs(cfg_dropout=0.0))
    prior = DiffusionPrior(config).eval()
    prior.denoiser = gaussian_x0(mean, std)
    dim, n = config.total_latent_size, 20000
    x = mean + std * torch.randn(n, dim)
    bound = torch.cat([prior.nll_bound(chunk, torch.zeros(len(chunk), 64)) for chunk in x.split(5000)])
    nll = (0.5 * ((x - mean) / std) ** 2 + math.log(std) + 0.5 * math.log(2 * math.pi)).sum(-1)
    gap_per_dim = (bound - nll).mean().item() / dim
    standard_error = (bound - nll).std().item() / math.sqrt(n) / dim
    exact = exact_gap_per_dim(mean, std, config)
    assert 0 <= exact < 0.01
    assert standard_error < 0.006, standard_error
    assert abs(gap_per_dim - exact) < 4 * standard_error, (gap_per_dim, exact, standard_error)


class condition_recorder(ForwardDenoiser):
    """A denoiser that keeps the conditions it was given and predicts v = 0."""

    def forward(self, noisy, log_snr, condition):
        self.seen = condition
        return torch.zeros_like(noisy)


def test_condition_dropout_only_in_training():
    """Classifier-free guidance drops the condition of a `cfg_dropout` share of the rows while training; an evaluated
    bound (validation loss, eval KL, diagnostics) is −log p(z | c) with every row's condition."""
    config = DiorCVAEConfig(**tiny_config_kwargs(cfg_dropout=0.5))
    prior = DiffusionPrior(config)
    prior.denoiser = condition_recorder()
    x, condition = torch.randn(4000, config.total_latent_size), torch.rand(4000, 64) + 1.0
    generator = torch.Generator().manual_seed(0)
    prior.eval()
    prior.nll_bound(x, condition, generator=generator)
    seen = prior.denoiser.seen.view(len(x), -1, condition.shape[1])  # each example's noise levels
    assert torch.equal(seen, condition[:, None].expand_as(seen))
    prior.train()
    prior.nll_bound(x, condition, generator=generator)
    dropped = (prior.denoiser.seen == 0).all(-1).float().mean().item()
    assert abs(dropped - 0.5) < 0.04, dropped  # binomial std ≈ 0.008
    kept = prior.denoiser.seen.ne(0).all(-1)
    assert torch.equal(prior.denoiser.seen[kept], condition[kept])


def test_an_evaluated_bound_averages_several_noise_levels_per_example():
    """Evaluated, each example's diffusion term averages EVAL_NOISE_LEVELS stratified noise levels: the same
    expectation as training's one level, with a per-example spread several times smaller (here 9.5 against 80 nats)."""
    from dior_cvae.prior_dior import EVAL_NOISE_LEVELS

    torch.manual_seed(0)
    config = DiorCVAEConfig(**tiny_config_kwargs(cfg_dropout=0.0))
    prior = DiffusionPrior(config)
    prior.denoiser = gaussian_x0(0.0, 1.0)  # the optimal denoiser of N(0, 1) data, scored on N(0, 0.3²) data
    x = 0.3 * torch.randn(4000, config.total_latent_size)
    condition = torch.zeros(4000, 64)
    train_bound = prior.train().nll_bound(x, condition)
    eval_bound = prior.eval().nll_bound(x, condition)
    assert EVAL_NOISE_LEVELS >= 8
    assert eval_bound.std() < 0.3 * train_bound.std(), (eval_bound.std(), train_bound.std())
    standard_error = math.hypot(eval_bound.std(), train_bound.std()) / math.sqrt(4000)
    assert abs(eval_bound.mean() - train_bound.mean()) < 4 * standard_error


def test_an_untrained_prior_is_the_standard_normal():
    """Zero-initialised v-prediction: at the start the KL estimate is the standard Gaussian KL (LSGM's mixed score)."""
    from dior_cvae import DiorCVAEForConditionalGeneration

    torch.manual_seed(0)
    model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs()))
    x = 0.7 * torch.randn(80000, 16) + 0.3  # the estimate's Monte Carlo std is ≈ 0.006 nats per dimension here
    bound = model.diffusion_prior.nll_bound(x, torch.randn(80000, 64)).mean() / 16
    standard_nll = (0.5 * x**2 + 0.5 * math.log(2 * math.pi)).mean()
    assert abs(bound.item() - standard_nll.item()) < 0.03
    samples = model.diffusion_prior.sample(torch.randn(4000, 2, 32), generator=torch.Generator().manual_seed(1))
    assert abs(samples.mean().item()) < 0.03 and abs(samples.std().item() - 1) < 0.03


def exact_ode_endpoint(noise, mean, std, scheduler):
    """The probability-flow ODE of Gaussian data maps the standardised noisy point to the standardised clean point."""
    lam = torch.tensor([scheduler.log_snr_min, scheduler.log_snr_max], dtype=torch.float64)
    (a0, a1), (s0, s1) = alpha_sigma(lam)
    xi = (noise.double() - a0 * mean) / torch.sqrt(a0**2 * std**2 + s0**2)
    return (a1 * mean + torch.sqrt(a1**2 * std**2 + s1**2) * xi) / a1


def run_sampler(config, denoiser, noise, steps):
    scheduler = DiorScheduler(config)
    scheduler.set_timesteps(steps)
    z, x0 = noise.clone(), None
    for i in range(steps):
        z, x0 = scheduler.step(denoiser(z, scheduler.log_snrs[i].expand(len(z)), None), i, z, previous_x0=x0)
    return scheduler.final_sample(z), scheduler


def test_solvers_converge_to_the_exact_ode_solution_and_dpmsolver_is_second_order():
    for mean, std in ((0.8, 0.4), (1.0, 0.05), (0.0, 2.0)):  # latents of any scale
        noise = torch.randn(2000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        errors = {}
        for sampler in ("ddim", "dpmsolver++"):
            config = DiorCVAEConfig(**tiny_config_kwargs(sampler=sampler))
            for steps in (20, 40, 160):
                sample, scheduler = run_sampler(config, gaussian_x0(mean, std), noise, steps)
                exact = exact_ode_endpoint(noise, mean, std, scheduler)
                errors[sampler, steps] = (sample - exact).abs().mean().item() / std
        assert errors["dpmsolver++", 20] < 0.02 and errors["ddim", 160] < 0.02, errors
        assert errors["dpmsolver++", 20] < errors["ddim", 20] / 4, errors  # higher order
        assert errors["dpmsolver++", 40] / errors["dpmsolver++", 160] > 8, errors  # 16 for second order
        assert 3 < errors["ddim", 40] / errors["ddim", 160] < 5, errors  # 4 for first order


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++"])
@pytest.mark.parametrize("steps", [1, 2, 20, 200])
def test_every_step_count_starts_from_pure_noise_and_ends_on_the_data(sampler, steps):
    config = DiorCVAEConfig(**tiny_config_kwargs(sampler=sampler))
    scheduler = DiorScheduler(config)
    scheduler.set_timesteps(steps)
    assert scheduler.log_snrs[0].item() == pytest.approx(config.log_snr_min)  # "trailing": noisiest point first
    # with the optimal denoiser of N(2, 0.5²), even one step lands on the data's mean, not on N(0, I)'s
    # (one step is a one-shot denoiser: E[x | noise], no spread; the spread needs steps)
    noise = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    sample, _ = run_sampler(config, gaussian_x0(2.0, 0.5), noise, steps)
    assert abs(sample.mean().item() - 2.0) < 0.05
    if steps == 200 or (steps == 20 and sampler == "dpmsolver++"):  # first-order solvers need more steps
        assert abs(sample.std().item() - 0.5) < 0.02


def test_ddim_matches_diffusers_on_the_same_grid():
    """Our DDIM step against diffusers' DDIMScheduler with betas that give the same ᾱ at the grid points."""
    diffusers = pytest.importorskip("diffusers")
    for prediction, eta in (("v_prediction", 0.0), ("epsilon", 0.5), ("sample", 1.0)):
        steps = 8
        config = DiorCVAEConfig(**tiny_config_kwargs(sampler="ddim", ddim_eta=eta, prediction_type=prediction))
        ours = DiorScheduler(config)
        ours.set_timesteps(steps)
        grid = log_snr_grid(config.log_snr_min, config.log_snr_max, steps)
        alpha_bar = torch.sigmoid(grid).flip(0)  # diffusers' t = 0 (cleanest) … steps (noisiest)
        betas = 1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        theirs = diffusers.DDIMScheduler(num_train_timesteps=steps + 1, trained_betas=betas.numpy(),
                                         prediction_type=prediction, clip_sample=False, steps_offset=1,
                                         timestep_spacing="leading", set_alpha_to_one=True)
        theirs.set_timesteps(steps)
        assert theirs.timesteps.tolist() == list(range(steps, 0, -1))
        z_ours = z_theirs = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
        g_ours, g_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        for i, t in enumerate(theirs.timesteps):
            output = torch.sin(3 * z_ours) + 0.1 * i  # any deterministic "denoiser"
            z_ours, _ = ours.step(output, i, z_ours, generator=g_ours)
            z_theirs = theirs.step(output, t, z_theirs, eta=eta, generator=g_theirs).prev_sample
            torch.testing.assert_close(z_ours, z_theirs.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler,steps", [("dpmsolver++", 20), ("ddpm", 200)])
def test_prior_temperature_scales_the_spread_about_the_mean(sampler, steps):
    """With the optimal denoiser of N(2, 0.5²) the sampler is affine in its noises (the initial one and, for DDPM,
    each step's): scaling them all by τ gives N(2, (τ·0.5)²)."""
    config = DiorCVAEConfig(**tiny_config_kwargs(sampler=sampler, num_inference_steps=steps, cfg_dropout=0.0,
                                                 prior_guidance_scale=0.0))
    prior = DiffusionPrior(config)
    prior.denoiser = gaussian_x0(2.0, 0.5)
    spread = {}
    for temperature in (0.0, 0.3, 1.0):
        samples = prior.sample(torch.zeros(20000, 2, 32), generator=torch.Generator().manual_seed(0),
                               temperature=temperature)
        assert abs(samples.mean().item() - 2.0) < 0.02, temperature
        spread[temperature] = samples.std().item()
    assert abs(spread[1.0] - 0.5) < 0.02 and spread[0.0] < 1e-4, spread  # DDPM's first-order error: 0.488
    assert abs(spread[0.3] / spread[1.0] - 0.3) < 0.01, spread


def class_gaussians(n, generator):
    """Two classes (one-hot condition), each an axis-aligned Gaussian with its own mean and std."""
    means = torch.tensor([[2.0, -1.5, 1.0, 0.5], [-1.0, 1.0, -2.0, 1.5]])
    stds = torch.tensor([[0.5, 0.3, 0.8, 0.2], [0.3, 0.6, 0.4, 0.5]])
    labels = torch.randint(0, 2, (n,), generator=generator)
    x = means[labels] + stds[labels] * torch.randn(n, 4, generator=generator)
    condition = torch.nn.functional.one_hot(labels, 2).float().repeat(1, 4)  # (n, L·d) = (n, 8)
    return x, condition, means, stds


def test_a_trained_prior_samples_each_class_where_its_data_is():
    torch.manual_seed(0)
    config = DiorCVAEConfig(**tiny_config_kwargs(d_model=4, encoder_attention_heads=1, decoder_attention_heads=1,
                                                 latent_size=2, denoiser_hidden_size=64, cfg_dropout=0.1,
                                                 prior_guidance_scale=0.0, sampler="dpmsolver++",
                                                 num_inference_steps=20))
    prior = DiffusionPrior(config)
    torch.nn.init.zeros_(prior.denoiser.output.weight), torch.nn.init.zeros_(prior.denoiser.output.bias)
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 1500)
    generator = torch.Generator().manual_seed(1)
    for step in range(1500):
        x, condition, means, stds = class_gaussians(256, generator)
        loss = prior.nll_bound(x, condition, generator=generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    for label in (0, 1):
        condition = torch.nn.functional.one_hot(torch.full((4000,), label), 2).float().repeat(1, 4)
        samples = prior.sample(condition.view(4000, 2, 4), generator=torch.Generator().manual_seed(2)).flatten(1)
        torch.testing.assert_close(samples.mean(0), means[label], rtol=0.1, atol=0.0)
        torch.testing.assert_close(samples.std(0), stds[label], rtol=0.1, atol=0.0)
