"""Latent-variable diagnostics that text-VAE papers report, for a trained Dior-CVAE (package only, not remote code).

- active units (Burda et al. 2016): latent dimensions whose posterior mean varies across data, Cov_x(E_q[z]) > 0.01;
- KL per latent layer: KL(q(z_l | ·) ‖ p(z_l | ·)) for the Gaussian priors; for every prior also KL to N(0, I) per
  layer, and the model's own KL term (for the diffusion prior: E[log q] + its bound on −log p);
- mutual information I(x; z) = E_x KL(q(z | x) ‖ q(z)), with the aggregate posterior q(z) estimated by the batch's
  mixture (as Optimus and DELLA report it);
- the ratio of prior-sample to posterior-sample latent norm for the same contexts (healthy: 0.8–1.25), and 2-D PCA
  coordinates of both, for a plot where a reader sees at once whether the prior puts its samples where the
  posterior is.
"""

import io
import math

import torch

from ..latent_dior import DiagonalGaussian
from .outputs import write_atomic


@torch.no_grad()
def latent_statistics(model, batches, num_inference_steps=None, generator=None, pca: bool = True) -> dict:
    """`batches`: iterable of dicts with `input_ids`, `attention_mask`, `labels` (as the training collator makes).

    Returns the diagnostics above (floats and lists) plus, with `pca`, `prior_pca` / `posterior_pca` (N, 2) tensors
    (None where a latent is not finite: the statistics then read NaN)."""
    if not model.config.has_latent:
        raise ValueError('latent diagnostics need a latent model (prior_type is "none")')
    model.eval()
    gaussian_prior = model.config.prior_type == "gaussian"
    means, log_stds, samples, priors, kls, mi_terms, layer_kls = [], [], [], [], [], [], []
    for batch in batches:
        batch = {k: v.to(model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        _, context_vectors = model.encode(batch["input_ids"], batch["attention_mask"])
        response_vectors = model.encode_response(batch["labels"])
        draw = model.hierarchy.posterior_sample(context_vectors, response_vectors)
        latents, posterior, summaries = draw
        if gaussian_prior:
            prior = DiagonalGaussian.from_params(model.prior(summaries, context_vectors))
            layer_kls.append(posterior.kl(prior).float().mean(0).cpu())  # (L,)
        kl = model.prior.kl(draw, context_vectors, generator).kl
        kls.append(kl.float().cpu())
        means.append(posterior.mean.float().cpu())
        log_stds.append(posterior.log_std.float().cpu())
        samples.append(latents.float().cpu())
        priors.append(model.sample_latents(context_vectors, num_inference_steps, generator=generator).float().cpu())
        mi_terms.append(mutual_information(model.hierarchy, latents, context_vectors, response_vectors))
    mean, log_std = torch.cat(means), torch.cat(log_stds)  # (N, L, ls)
    posterior_samples, prior_samples = torch.cat(samples), torch.cat(priors)
    variance = log_std.mul(2).exp()
    kl_to_standard = 0.5 * (variance + mean.pow(2) - 1 - 2 * log_std).sum(-1).mean(0)  # (L,)
    activity = mean.flatten(1).var(0)
    stats = {
        "num_examples": int(mean.shape[0]),
        "active_units": int((activity > 0.01).sum()),
        "active_units_fraction": float((activity > 0.01).float().mean()),
        "kl": float(torch.cat(kls).mean()),
        "kl_to_standard_per_layer": kl_to_standard.tolist(),
        "mutual_information": float(torch.stack(mi_terms).mean()),
        "posterior_norm": float(posterior_samples.flatten(1).norm(dim=-1).mean()),
        "prior_norm": float(prior_samples.flatten(1).norm(dim=-1).mean()),
        "posterior_std_mean": float(log_std.exp().mean()),
    }
    stats["prior_posterior_norm_ratio"] = stats["prior_norm"] / stats["posterior_norm"]
    if gaussian_prior:
        stats["kl_per_layer"] = torch.stack(layer_kls).mean(0).tolist()
    if not pca:
        return stats
    flat = posterior_samples.flatten(1)
    stats["posterior_pca"] = stats["prior_pca"] = None
    if torch.isfinite(flat).all() and torch.isfinite(prior_samples).all():
        center = flat.mean(0)
        _, _, components = torch.pca_lowrank(flat - center, q=2, center=False)
        stats["posterior_pca"] = (flat - center) @ components
        stats["prior_pca"] = (prior_samples.flatten(1) - center) @ components
    return stats


def mutual_information(hierarchy, latents, context_vectors, response_vectors) -> torch.Tensor:
    """E[log q(z | x)] − E[log q(z)] over one batch of posterior samples `latents` (B, L, ls) of x = (c, r), with
    q(z) ≈ (1/B) Σ_j q(z | x_j); each q(z_i | x_j) is the whole hierarchy's density (layer l given z_i's own z_<l),
    a scalar on the CPU."""
    log_q = hierarchy.posterior_log_density_matrix(latents, context_vectors, response_vectors)
    log_q_aggregate = torch.logsumexp(log_q, dim=1) - math.log(latents.shape[0])
    return (log_q.diagonal() - log_q_aggregate).mean().cpu()


def plot_latents(stats: dict, path, title: str = "") -> None:
    """PNG: prior samples over posterior samples of the same contexts, in the posterior's first two principal axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    post, prior = stats["posterior_pca"], stats["prior_pca"]
    if post is None:
        raise ValueError("no latent plot: the posterior or prior latents are not finite")
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(post[:, 0], post[:, 1], s=3, alpha=0.4, label="posterior q(z | c, r)")
    ax.scatter(prior[:, 0], prior[:, 1], s=3, alpha=0.4, label="prior p(z | c)")
    ax.set_xlabel("PC 1 of posterior samples")
    ax.set_ylabel("PC 2")
    ax.set_title(f"{title} norm ratio {stats['prior_posterior_norm_ratio']:.2f}".strip())
    ax.legend(markerscale=4)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, image.getvalue())


__all__ = ["latent_statistics", "mutual_information", "plot_latents"]
