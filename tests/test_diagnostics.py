"""The latent diagnostics' mutual information I(x; z) against hierarchies whose I(x; z) is known."""

import math

import torch

from dior_cvae import DiorCVAEConfig
from dior_cvae.training.diagnostics import mutual_information
from dior_cvae.latent_dior import HierarchicalLatents

from conftest import tiny_config_kwargs


def sharp_hierarchy(condition_gain: float) -> HierarchicalLatents:
    """3 latent layers whose upper layers follow z_<l closely: layer l > 1 has σ ≈ e^-4 and a mean that moves by
    O(1) with z_<l, so scoring z_i's upper layers given another sample's z_<l (instead of z_i's own) is far off.
    `condition_gain` scales how much the condition (c, r) moves the means (0: q(z | x) does not depend on x)."""
    torch.manual_seed(0)
    config = DiorCVAEConfig(**tiny_config_kwargs(encoder_layers=3, decoder_layers=3))
    hierarchy = HierarchicalLatents(config)
    ls = config.latent_size
    with torch.no_grad():
        for linear in (hierarchy.aggregate_latent, hierarchy.aggregate_hidden, hierarchy.posterior.summary_proj):
            linear.weight.normal_(0, 1 / math.sqrt(linear.in_features))
        posterior = hierarchy.posterior
        posterior.condition_proj.weight.normal_(0, condition_gain / math.sqrt(posterior.condition_proj.in_features))
        posterior.condition_proj.bias.zero_()
        posterior.out_proj.weight.normal_(0, 3 / math.sqrt(posterior.out_proj.in_features))
        posterior.out_proj.weight[:, ls:] = 0  # log σ from the bias alone
        posterior.out_proj.bias.zero_()
        posterior.out_proj.bias[1:, ls:] = -4.0
    return hierarchy


def test_mutual_information_is_zero_when_the_posterior_ignores_x():
    """q(z | x) = q(z) for every x: I(x; z) = 0 exactly, for any batch (the mixture of identical densities)."""
    hierarchy = sharp_hierarchy(condition_gain=0.0)
    context, response = torch.randn(64, 3, 32), torch.randn(64, 3, 32)
    latents, _, _ = hierarchy.posterior_sample(context, response, torch.Generator().manual_seed(1))
    assert abs(mutual_information(hierarchy, latents, context, response).item()) < 1e-4


def test_mutual_information_is_log_k_for_k_separated_inputs():
    """x takes K = 4 values, each 16 times in the batch, with posteriors far apart: the batch estimate of I(x; z)
    is log K (each z_i's mixture density is its own class's 16 identical terms of 64)."""
    hierarchy = sharp_hierarchy(condition_gain=30.0)
    prototypes = torch.randn(4, 3, 64)
    classes = torch.arange(64) % 4
    context, response = prototypes[classes, :, :32], prototypes[classes, :, 32:]
    latents, _, _ = hierarchy.posterior_sample(context, response, torch.Generator().manual_seed(1))
    estimate = mutual_information(hierarchy, latents, context, response).item()
    assert abs(estimate - math.log(4)) < 1e-3, estimate


def test_the_density_matrix_diagonal_is_the_sampled_posterior():
    """log q(z_i | x_i) from the matrix equals the log density of the posterior the sample was drawn from."""
    hierarchy = sharp_hierarchy(condition_gain=1.0)
    context, response = torch.randn(8, 3, 32), torch.randn(8, 3, 32)
    latents, posterior, _ = hierarchy.posterior_sample(context, response, torch.Generator().manual_seed(2))
    matrix = hierarchy.posterior_log_density_matrix(latents, context, response)
    torch.testing.assert_close(matrix.diagonal(), posterior.log_prob(latents).sum(-1), rtol=1e-5, atol=1e-4)
