"""The latent carries what the context cannot: a synthetic one-to-many task, for every prior.

Each of 6 random contexts is followed by one of 4 fixed responses, chosen at random, so the choice is information
only the latent can carry (a decoder without it can do no better than log 4 nats on the first token). Trained with
the default loss (free bits, `kl_free_bits`) at KL weight β = 0.5, annealed over the first half, greedy decoding
from prior latents must give valid responses, several distinct ones per context, and a reconstruction loss below
what ignoring the latent costs.
"""

import math

import pytest
import torch

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

from conftest import tiny_config_kwargs

NUM_CONTEXTS, NUM_RESPONSES, DRAWS, STEPS, BETA = 6, 4, 20, 400, 0.5


def train_one_to_many(prior_type: str, seed: int = 1, **config):
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed)
    contexts = torch.randint(4, 96, (NUM_CONTEXTS, 6), generator=data)
    words = torch.randint(4, 96, (NUM_RESPONSES, 3), generator=data)
    responses = torch.cat([torch.zeros(NUM_RESPONSES, 1, dtype=torch.long), words,
                           torch.full((NUM_RESPONSES, 1), 2)], dim=1)  # <s> a b c </s>
    model = DiorCVAEForConditionalGeneration(
        DiorCVAEConfig(**tiny_config_kwargs(prior_type=prior_type, label_smoothing=0.0, **config))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(STEPS):
        context_ids = torch.randint(0, NUM_CONTEXTS, (32,), generator=data)
        response_ids = torch.randint(0, NUM_RESPONSES, (32,), generator=data)
        beta = BETA * min(1.0, step / (STEPS / 2))
        out = model(input_ids=contexts[context_ids], labels=responses[response_ids], kl_weight=beta)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        rc_loss = model(input_ids=contexts.repeat(NUM_RESPONSES, 1),
                        labels=responses.repeat_interleave(NUM_CONTEXTS, 0)).rc_loss.item()
        generated = model.generate(contexts, num_return_sequences=DRAWS, do_sample=False, max_new_tokens=6,
                                   latent_generator=torch.Generator().manual_seed(seed))
    valid = {tuple(r) for r in responses[:, :4].tolist()}
    outputs = [tuple(row) for row in generated[:, 1:5].tolist()]  # after the decoder start: <s> a b c
    per_context = [outputs[c * DRAWS : (c + 1) * DRAWS] for c in range(NUM_CONTEXTS)]
    valid_fraction = sum(o in valid for o in outputs) / len(outputs)
    distinct = sum(len({o for o in rows if o in valid}) for rows in per_context) / NUM_CONTEXTS
    return rc_loss, valid_fraction, distinct


@pytest.mark.parametrize("prior_type", ["diffusion", "gaussian", "standard"])
def test_prior_latents_choose_among_the_responses_of_a_context(prior_type):
    rc_loss, valid_fraction, distinct = train_one_to_many(prior_type)
    assert valid_fraction >= 0.9, f"{valid_fraction:.0%} valid responses"
    assert distinct >= 2.5, f"{distinct:.1f} distinct valid responses per context (of {NUM_RESPONSES})"
    assert rc_loss < 0.5 * math.log(NUM_RESPONSES), f"reconstruction loss {rc_loss:.2f}: the latent is unused"


def test_without_free_bits_the_latent_collapses():
    """The reason `kl_free_bits` is on by default: the plain ELBO at the same β ignores the latent here."""
    rc_loss, _, distinct = train_one_to_many("diffusion", kl_free_bits=0.0)
    assert distinct <= 1.5 and rc_loss > 0.8 * math.log(NUM_RESPONSES), (rc_loss, distinct)


def _gradients(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("prior_type", ["gaussian", "diffusion"])
def test_free_bits_split_the_kl_gradient_between_posterior_and_prior(tiny_model, prior_type):
    """At β = 1 above the floor the loss has the ELBO's gradient; below the floor the posterior gets none from the
    KL while the prior still fits the posterior samples; in evaluation the loss is the plain negative ELBO."""
    model = tiny_model(prior_type=prior_type, memory_dropout=0.0, cfg_dropout=0.0, kl_free_bits=0.0)
    model.train()
    batch = dict(input_ids=torch.randint(4, 96, (4, 7)), labels=torch.randint(4, 96, (4, 5)))

    def forward(beta):
        torch.manual_seed(3)  # the same posterior sample and diffusion noise in every call
        return model(**batch, kl_weight=beta)

    out = forward(1.0)
    elbo = _gradients(model, out.rc_loss + out.kl_loss)
    for name, grad in _gradients(model, out.loss).items():
        if grad is not None:
            torch.testing.assert_close(grad, elbo[name], msg=name)

    # β < 1 above the floor (the whole annealing phase): the posterior gets β times the KL's gradient, the prior the
    # KL's gradient at weight 1 (β from the KL term plus 1 − β from the fit on the detached samples)
    out = forward(0.5)
    rc_only, kl_only, total = (_gradients(model, loss) for loss in (out.rc_loss, out.kl_loss, out.loss))
    prior_prefix = "diffusion_prior." if prior_type == "diffusion" else "hierarchy.prior."
    posterior_names = [n for n, g in total.items() if n.startswith("hierarchy.posterior.") and g is not None]
    assert posterior_names
    for name in posterior_names:
        torch.testing.assert_close(total[name], rc_only[name] + 0.5 * kl_only[name], msg=name)
    prior_names = [n for n, g in total.items() if n.startswith(prior_prefix) and g is not None
                   and kl_only[n] is not None and kl_only[n].abs().max() > 1e-6]
    assert prior_names
    for name in prior_names:
        if prior_type == "gaussian":  # analytic KL: the fit's gradient is the KL's own, so weight 1 in total
            torch.testing.assert_close(total[name], kl_only[name], msg=name)
        else:  # the fit runs on other noise levels: not exactly the KL's gradient, but more than β's share of it
            assert not torch.allclose(total[name], 0.5 * kl_only[name], atol=1e-6), name

    model.config.kl_free_bits = 1e4  # far above any KL here
    out = forward(0.5)
    torch.testing.assert_close(out.loss, out.rc_loss + 0.5 * 1e4 * model.config.total_latent_size)
    floored, rc_only = _gradients(model, out.loss), _gradients(model, out.rc_loss)
    kl_only = _gradients(model, out.kl_loss)
    for name, grad in floored.items():
        if name.startswith("hierarchy.posterior."):
            torch.testing.assert_close(grad, rc_only[name], msg=name)  # nothing from the KL
    prior_grads = [(name, g) for name, g in floored.items() if name.startswith(prior_prefix) and g is not None]
    assert prior_grads and any(g.abs().max() > 0 for _, g in prior_grads)
    if prior_type == "gaussian":  # analytic KL: the prior's gradient is the KL's own, at weight 1
        for name, grad in prior_grads:
            torch.testing.assert_close(grad, kl_only[name], msg=name)

    model.eval()
    out = model(**batch, kl_weight=1.0)
    torch.testing.assert_close(out.loss, out.rc_loss + out.kl_loss)


def test_a_nan_kl_is_never_hidden_by_the_floor(tiny_model, monkeypatch):
    model = tiny_model(prior_type="diffusion")
    model.train()
    monkeypatch.setattr(model.diffusion_prior, "nll_bound", lambda latents, *a, **k: latents.sum(-1) * float("nan"))
    out = model(input_ids=torch.randint(4, 96, (2, 5)), labels=torch.randint(4, 96, (2, 4)), kl_weight=0.5)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("prior_type", ["gaussian", "diffusion"])
def test_the_prior_fit_shares_one_batch_with_the_kl(tiny_model, monkeypatch, prior_type):
    """In training the KL and the prior's fit (on detached copies) are one batch of 2B interleaved rows: the KL is the
    attached rows' alone, and the diffusion bound's noise levels are stratified within each half."""
    model = tiny_model(prior_type=prior_type, memory_dropout=0.0).train()
    batch = dict(input_ids=torch.randint(4, 96, (8, 7)), labels=torch.randint(4, 96, (8, 5)))
    if prior_type == "gaussian":  # analytic: the training KL equals the evaluation KL of the same posterior sample
        torch.manual_seed(5)
        train_kl = model(**batch).kl_loss
        torch.manual_seed(5)
        _, context_vectors = model.encode(batch["input_ids"], batch["input_ids"].ne(1).long())
        expected = model.prior.kl(model.posterior(context_vectors, batch["labels"]), context_vectors).kl.mean()
        torch.testing.assert_close(train_kl, expected)
        return
    seen = []
    denoise = model.diffusion_prior.denoiser.forward
    monkeypatch.setattr(model.diffusion_prior.denoiser, "forward",
                        lambda noisy, log_snr, condition: seen.append(log_snr.detach()) or denoise(noisy, log_snr, condition))
    model(**batch)
    (log_snr,) = seen
    assert log_snr.shape == (16,)
    config = model.config
    u = (log_snr - config.log_snr_min) / (config.log_snr_max - config.log_snr_min)
    for half in (u[0::2], u[1::2]):  # one point in each eighth of [0, 1)
        assert sorted((half * 8).floor().long().tolist()) == list(range(8))
