"""dior_cvae.training.likelihood against answers known in closed form or by numerical integration."""

import math

import pytest
import torch
from conftest import tiny_config_kwargs

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
from dior_cvae.training.likelihood import importance_weighted_nll, response_log_likelihood


def build(prior_type, **overrides):
    torch.manual_seed(0)
    config = DiorCVAEConfig(**tiny_config_kwargs(prior_type=prior_type, label_smoothing=0.0, **overrides))
    return DiorCVAEForConditionalGeneration(config).eval()


def batch(seed=1, size=3):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 96, (size, 7), generator=g)
    labels = torch.randint(4, 96, (size, 5), generator=g)
    labels[:, 0], labels[:, -1] = 0, 2  # <s> ... </s>
    labels[0, 3:] = -100  # a shorter response
    return input_ids, torch.ones_like(input_ids), labels


def one_dimensional(prior_type):
    """One latent dimension (1 encoder layer × latent_size 1) that the decoder listens to: p(r | c) is a 1-D integral
    and the prior (N(0, 1) or the learned Gaussian) and posterior are far enough apart that K matters."""
    model = build(prior_type, encoder_layers=1, decoder_layers=1, latent_size=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("latent_to_memory"):
                param.mul_(30.0)
        # a posterior off the true one (mean shifted, wider): the importance weights then matter
        bias = model.hierarchy.posterior.out_proj.bias  # (layers, [mean; raw log-std])
        bias[:, 0] += 1.0
        bias[:, 1] += 1.0  # wider than the true posterior: finite-variance weights
    return model


def integrated_nll(model, input_ids, attention_mask, labels):
    """−log ∫ p(r | z, c) p(z | c) dz by the trapezoidal rule on a fine grid of the one latent dimension."""
    grid = torch.linspace(-9.0, 9.0, 3601)
    nll = []
    with torch.no_grad():
        encoder_outputs, context_vectors = model.encode(input_ids, attention_mask)
        for b in range(len(input_ids)):
            z = grid.view(-1, 1, 1)
            n = len(grid)
            out = model(encoder_outputs=(encoder_outputs.last_hidden_state[b: b + 1].expand(n, -1, -1),),
                        attention_mask=attention_mask[b: b + 1].expand(n, -1), labels=labels[b: b + 1].expand(n, -1),
                        latents=z)
            log_lik = response_log_likelihood(out.logits, labels[b: b + 1].expand(n, -1)).double()
            prior = model.prior.distribution(torch.zeros(1, 1, 1), context_vectors[b: b + 1])  # N(0, I) or learned
            mean, log_std = prior.mean.view(()), prior.log_std.view(())
            log_prior = (-0.5 * ((grid - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).double()
            integrand = torch.exp(log_lik + log_prior)
            nll.append(-math.log(torch.trapezoid(integrand, grid.double()).item()))
    return torch.tensor(nll, dtype=torch.float64)


def test_none_is_the_exact_token_nll():
    model = build("none")
    input_ids, mask, labels = batch()
    out = importance_weighted_nll(model, input_ids, mask, labels, num_samples=5)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    log_probs = logits.log_softmax(-1)
    expected = [-log_probs[b, t, labels[b, t]].item() for b in range(3) for t in range(5) if labels[b, t] >= 0]
    per_row = [sum(-log_probs[b, t, labels[b, t]].item() for t in range(5) if labels[b, t] >= 0) for b in range(3)]
    assert len(expected) == 13
    torch.testing.assert_close(out["nll"], torch.tensor(per_row, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["neg_elbo"], out["nll"])


@pytest.mark.parametrize("prior_type", ["standard", "gaussian"])
def test_iw_estimate_decreases_with_k_to_the_integrated_nll(prior_type):
    model = one_dimensional(prior_type)
    input_ids, mask, labels = batch()
    exact = integrated_nll(model, input_ids, mask, labels)

    def mean_estimate(k, repeats):
        g = torch.Generator().manual_seed(k)
        return torch.stack([importance_weighted_nll(model, input_ids, mask, labels, k, generator=g)["nll"]
                            for _ in range(repeats)]).mean(0)

    k1, k10 = mean_estimate(1, 200), mean_estimate(10, 40)
    k_large = importance_weighted_nll(model, input_ids, mask, labels, 20000, samples_per_pass=2000,
                                      generator=torch.Generator().manual_seed(0))["nll"]
    # the ELBO is loose here (the posterior is far from the true one): otherwise the test proves nothing
    assert (k1 - exact).min() > 0.4, (k1, exact)
    assert (k1 > k10).all() and (k10 > k_large).all(), (k1, k10, k_large)
    torch.testing.assert_close(k_large, exact, atol=0.1, rtol=0)


def test_diffusion_log_prior_at_initialisation_is_the_standard_normal():
    """The denoiser's output layer starts at zero, which for v-prediction is ε̂ = σ·z_t: the optimal denoiser of
    N(0, I) data. The VDM bound of each latent then has a closed form, 0.5·∫(α⁴·d + α²σ²·|x|²) dλ plus the end
    points, whose mean over x ~ N(0, I) exceeds −log N(x; 0, I) by a tiny positive end-point gap. The Monte Carlo
    bound must match that closed form within its standard error (≈ 0.16 nats here: the squared-error term has a
    per-draw spread of ≈ 80 nats, 4,096 draws per latent, 64 latents); a perturbed denoiser gives a looser bound."""
    from dior_cvae.training.likelihood import _log_prior

    model = build("diffusion")
    latents = torch.randn(64, 2, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(64, 2, 32)
    exact = (-0.5 * latents.pow(2) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(-1)
    estimate = _log_prior(model, latents, None, context, 256, torch.Generator().manual_seed(1))

    lam_min, lam_max = model.config.log_snr_min, model.config.log_snr_max
    lam = torch.linspace(lam_min, lam_max, 20001, dtype=torch.float64)
    alpha2 = torch.sigmoid(lam)
    x = latents.flatten(1).double()
    dim, norm2 = x.shape[1], x.pow(2).sum(1)
    alpha2_min = 1 / (1 + math.exp(-lam_min))
    closed_form = (0.5 * (alpha2_min * norm2 - dim * alpha2_min - dim * math.log1p(-alpha2_min))
                   + 0.5 * (torch.trapezoid(alpha2 ** 2, lam) * dim + torch.trapezoid(alpha2 * (1 - alpha2), lam) * norm2)
                   + dim * 0.5 * (math.log(2 * math.pi * math.e) - lam_max))
    end_point_gap = (closed_form + exact.double()).mean()
    assert 0 <= end_point_gap < 0.01, end_point_gap
    assert abs((-estimate.double() - closed_form).mean()) < 0.5, (-estimate.double() - closed_form).mean()
    with torch.no_grad():
        for param in model.diffusion_prior.parameters():
            param.add_(0.5 * torch.randn_like(param))
    looser = _log_prior(model, latents, None, context, 256, torch.Generator().manual_seed(1))
    assert looser.mean() < exact.mean() - 1.0


def test_needs_eval_mode():
    model = build("standard").train()
    with pytest.raises(ValueError, match="eval"):
        importance_weighted_nll(model, *batch(), num_samples=2)


def test_corpus_nll_encodes_examples_as_in_training():
    """`corpus_nll` (examples/likelihood.py's path): text examples in, one estimate per response; the seq2seq's NLL
    equals the summed cross-entropy of the same encoded batch."""
    from dior_cvae.training.data import train_tokenizer
    from dior_cvae.training.likelihood import corpus_nll

    examples = [{"context": ["hi there", "how are you ?"], "response": "fine , thanks"},
                {"context": ["where is it ?"], "response": "over there"}]
    tokenizer = train_tokenizer([t for e in examples for t in (*e["context"], e["response"])], 96)
    for prior_type in ("none", "diffusion"):
        model = build(prior_type, vocab_size=len(tokenizer))
        result = corpus_nll(model, tokenizer, examples, num_samples=4, batch_size=2)
        assert result["responses"] == 2 and math.isfinite(result["nll_per_response"]), result
    assert result["nll_per_response"] <= result["neg_elbo_per_response"] + 1e-4, result
