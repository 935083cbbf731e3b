"""Our scheduler against diffusers' DDPMScheduler / DDIMScheduler, number for number."""

import pytest
import torch

from dior_cvae import DiorCVAEConfig
from dior_cvae.scheduling_dior import DiorScheduler, make_betas

diffusers = pytest.importorskip("diffusers")


def configs():
    for schedule, start, end in [("linear", 0.002, 0.4), ("squaredcos_cap_v2", 1e-4, 0.02), ("scaled_linear", 0.001, 0.3)]:
        for prediction in ("epsilon", "sample"):
            yield schedule, start, end, prediction


@pytest.mark.parametrize("schedule,start,end,prediction", list(configs()))
@pytest.mark.parametrize("steps", [50, 10])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_step_matches_diffusers(schedule, start, end, prediction, steps, sampler):
    config = DiorCVAEConfig(
        num_train_timesteps=50, num_inference_steps=steps, beta_schedule=schedule, beta_start=start, beta_end=end,
        prediction_type=prediction, sampler=sampler, ddim_eta=0.5 if sampler == "ddim" else 0.0,
    )
    ours = DiorScheduler(config)
    common = dict(num_train_timesteps=50, beta_schedule=schedule, beta_start=start, beta_end=end,
                  prediction_type=prediction, clip_sample=False, timestep_spacing="leading")
    if sampler == "ddpm":
        theirs = diffusers.DDPMScheduler(variance_type="fixed_small", **common)
    else:
        theirs = diffusers.DDIMScheduler(set_alpha_to_one=True, **common)
    theirs.set_timesteps(steps)
    assert ours.timestep_values == theirs.timesteps.tolist()
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod.float())

    sample = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    gen_ours, gen_theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(ours.timestep_values):
        model_output = torch.sin(sample * (i + 1))  # any deterministic "denoiser"
        ours_sample = ours.step(model_output, i, sample, generator=gen_ours)
        kwargs = {"eta": 0.5} if sampler == "ddim" else {}
        sample = theirs.step(model_output, t, sample, generator=gen_theirs, **kwargs).prev_sample
        torch.testing.assert_close(ours_sample, sample, atol=1e-5, rtol=1e-5)  # same input, same noise


def test_add_noise_matches_diffusers():
    config = DiorCVAEConfig()
    theirs = diffusers.DDPMScheduler(num_train_timesteps=50, beta_start=0.002, beta_end=0.4)
    sample, noise = torch.randn(6, 8), torch.randn(6, 8)
    timesteps = torch.tensor([0, 5, 10, 25, 40, 49])
    torch.testing.assert_close(
        DiorScheduler(config).add_noise(sample, noise, timesteps), theirs.add_noise(sample, noise, timesteps)
    )


def test_default_schedule_reaches_noise():
    alpha_bar_T = torch.cumprod(1 - make_betas(DiorCVAEConfig()), 0)[-1].item()
    assert alpha_bar_T < 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_vlb_weights_equal_the_ddpm_kl_terms(prediction):
    """T·λ_t‖f − target‖² must be T times KL(q(z_{t-1} | z_t, z_0) ‖ p(z_{t-1} | z_t)) for t ≥ 1, written out here
    from the DDPM posterior (float64), and T times the Gaussian decoder NLL (minus its normaliser) for t = 0."""
    config = DiorCVAEConfig(prediction_type=prediction)
    scheduler = DiorScheduler(config)
    betas, abar = scheduler.betas, scheduler.alphas_cumprod
    weights = scheduler.vlb_weights_on("cpu", prediction).double()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    out = torch.randn(16, generator=g, dtype=torch.float64)  # the denoiser's output
    T = config.num_train_timesteps
    for t in (0, 1, 7, 30, T - 1):
        zt = abar[t].sqrt() * z0 + (1 - abar[t]).sqrt() * eps
        z0_hat = (zt - (1 - abar[t]).sqrt() * out) / abar[t].sqrt() if prediction == "epsilon" else out
        target = eps if prediction == "epsilon" else z0
        got = weights[t] * (out - target).pow(2).sum()
        if t == 0:  # −log N(z0; ẑ0, β_0) without its normaliser
            expected = (z0 - z0_hat).pow(2).sum() / (2 * betas[0])
        else:
            abar_prev = abar[t - 1]
            coef0 = abar_prev.sqrt() * betas[t] / (1 - abar[t])
            coeft = (1 - betas[t]).sqrt() * (1 - abar_prev) / (1 - abar[t])
            var = betas[t] * (1 - abar_prev) / (1 - abar[t])
            expected = ((coef0 * z0 + coeft * zt) - (coef0 * z0_hat + coeft * zt)).pow(2).sum() / (2 * var)
        torch.testing.assert_close(got, T * expected, rtol=1e-5, atol=1e-6)

