"""The latent modules batched over the layer axis (`latent_dior.StackedLinear` & co.) against a straightforward
per-layer reference written here (one Linear per layer, a Python loop over layers, as the modules were before they
were batched), with the same weights: equal within 1e-6 (float64)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config_kwargs

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
from dior_cvae.latent_dior import DiagonalGaussian, PosteriorSample

TOL = dict(rtol=0, atol=1e-6)


def reference_pooling(pooling, layer_hidden_states, attention_mask):
    vectors = []
    for layer, h in enumerate(layer_hidden_states):
        scores = F.linear(torch.tanh(F.linear(h, pooling.proj.weight[layer], pooling.proj.bias[layer])),
                          pooling.context.weight[layer]).squeeze(-1)
        scores = scores.float().masked_fill(attention_mask == 0, torch.finfo(torch.float32).min)
        weights = scores.softmax(dim=-1).to(h.dtype)
        vectors.append(torch.einsum("bs,bsd->bd", weights, h))
    return torch.stack(vectors, dim=1)


def reference_head(heads, layer, summary, condition):
    weight = torch.cat([heads.summary_proj.weight[layer], heads.condition_proj.weight[layer]], dim=-1)
    hidden = torch.tanh(F.linear(torch.cat([summary, condition], dim=-1), weight, heads.condition_proj.bias[layer]))
    return F.linear(hidden, heads.out_proj.weight[layer], heads.out_proj.bias[layer])


def reference_next_summary(hierarchy, layer, summary, latent):
    hidden = F.linear(latent, hierarchy.aggregate_latent.weight[layer], hierarchy.aggregate_latent.bias[layer])
    if layer > 0:
        hidden = hidden + F.linear(summary, hierarchy.aggregate_hidden.weight[layer - 1])
    return torch.tanh(hidden)


def reference_ancestral(hierarchy, heads, conditions, generator):
    """conditions: one (B, cond) tensor per layer."""
    summary = conditions[0].new_zeros(conditions[0].shape[0], hierarchy.latent_size)
    latents, dists, summaries = [], [], []
    for layer, condition in enumerate(conditions):
        dist = DiagonalGaussian.from_params(reference_head(heads, layer, summary, condition))
        latent = dist.sample(generator)
        latents.append(latent), dists.append(dist), summaries.append(summary)
        if layer + 1 < len(conditions):
            summary = reference_next_summary(hierarchy, layer, summary, latent)
    return torch.stack(latents, dim=1), dists, summaries


def reference_kl(prior_type, hierarchy, dists, summaries, context_vectors):
    kl = 0
    for layer, (dist, summary) in enumerate(zip(dists, summaries)):
        if prior_type == "standard":
            prior = DiagonalGaussian.standard(dist.mean)
        else:
            prior = DiagonalGaussian.from_params(reference_head(hierarchy.prior, layer, summary, context_vectors[:, layer]))
        kl = kl + dist.kl(prior)
    return kl


def build(prior_type, num_layers=3):
    torch.manual_seed(0)
    config = DiorCVAEConfig(**tiny_config_kwargs(prior_type=prior_type, encoder_layers=num_layers,
                                                 decoder_layers=num_layers))
    model = DiorCVAEForConditionalGeneration(config).double()
    for param in model.parameters():  # BART's init is small: make the tanh/softmax non-linearities matter
        param.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("prior_type", ["gaussian", "standard"])
def test_batched_latents_equal_the_per_layer_reference(prior_type, num_layers):
    model = build(prior_type, num_layers)
    batch, length, d = 5, 7, model.config.d_model
    hidden = [torch.randn(batch, length, d, dtype=torch.float64) for _ in range(num_layers)]
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 4:], mask[3, 1:] = 0, 0  # padding, down to a single visible token
    padded = [h.clone() for h in hidden]
    for h in padded:
        h[mask == 0] = 1e3  # what sits under the padding must not matter

    context_vectors = model.layer_pooling(padded, mask)
    torch.testing.assert_close(context_vectors, reference_pooling(model.layer_pooling, hidden, mask), **TOL)
    response_vectors = torch.randn_like(context_vectors)

    latents, posterior, summaries = model.hierarchy.posterior_sample(
        context_vectors, response_vectors, generator=torch.Generator().manual_seed(1))
    conditions = [torch.cat([context_vectors[:, l], response_vectors[:, l]], -1) for l in range(num_layers)]
    ref_latents, ref_dists, ref_summaries = reference_ancestral(
        model.hierarchy, model.hierarchy.posterior, conditions, torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents, ref_latents, **TOL)
    torch.testing.assert_close(summaries, torch.stack(ref_summaries, dim=1), **TOL)
    torch.testing.assert_close(posterior.mean, torch.stack([q.mean for q in ref_dists], dim=1), **TOL)
    torch.testing.assert_close(posterior.log_std, torch.stack([q.log_std for q in ref_dists], dim=1), **TOL)

    kl = model.prior.kl(PosteriorSample(latents, posterior, summaries), context_vectors).kl
    torch.testing.assert_close(kl, reference_kl(prior_type, model.hierarchy, ref_dists, ref_summaries, context_vectors),
                               **TOL)
    entropy = posterior.entropy().sum(-1)
    torch.testing.assert_close(entropy, sum(q.entropy() for q in ref_dists), **TOL)

    prior_latents = model.prior.sample(context_vectors, generator=torch.Generator().manual_seed(2))
    if prior_type == "gaussian":
        ref_prior, _, _ = reference_ancestral(model.hierarchy, model.hierarchy.prior,
                                              [context_vectors[:, l] for l in range(num_layers)],
                                              torch.Generator().manual_seed(2))
        torch.testing.assert_close(prior_latents, ref_prior, **TOL)

    # the slots: per layer, k_proj / v_proj of each infusing attention applied to Linear_l(z_l)
    slots = model.project_latent_slots(latents)
    projection = model.latent_to_memory
    heads = model.config.decoder_attention_heads
    for l, layer in enumerate(model.model.decoder.layers):
        slot = F.linear(latents[:, l], projection.weight[l], projection.bias[l])
        for attention in (layer.self_attn, layer.encoder_attn):
            for which, proj in enumerate((attention.k_proj, attention.v_proj)):
                expected = proj(slot).view(len(slot), heads, -1)
                torch.testing.assert_close(slots[:, l, 2 * attention.slot_index + which], expected, **TOL)


def test_standard_prior_kl_is_the_analytic_kl_to_n01():
    model = build("standard")
    context_vectors = torch.randn(4, 3, model.config.d_model, dtype=torch.float64)
    draw = model.hierarchy.posterior_sample(context_vectors, torch.randn_like(context_vectors))
    kl, posterior = model.prior.kl(draw, context_vectors).kl, draw.distribution
    var, mean = torch.exp(2 * posterior.log_std), posterior.mean
    torch.testing.assert_close(kl, 0.5 * (var + mean**2 - 1 - 2 * posterior.log_std).sum((-1, -2)), **TOL)


def test_from_bart_initialises_the_stacked_weights_like_barts_linears(tmp_path):
    """The stacked parameters are raw `nn.Parameter`s: after `from_pretrained` of a BART-only checkpoint (meta
    device, then only missing keys initialised) they must hold BART's init, normal(0, init_std) and zero bias."""
    from transformers import BartConfig, BartForConditionalGeneration

    from dior_cvae.latent_dior import StackedLinear

    bart_config = BartConfig(**{k: v for k, v in tiny_config_kwargs().items() if k in BartConfig.__dataclass_fields__})
    BartForConditionalGeneration(bart_config).save_pretrained(tmp_path / "bart")
    for prior_type in ("gaussian", "diffusion"):
        dior = DiorCVAEForConditionalGeneration.from_bart(tmp_path / "bart", latent_size=8, prior_type=prior_type,
                                                          denoiser_hidden_size=32)
        stacked = {name: m for name, m in dior.named_modules() if isinstance(m, StackedLinear)}
        expected = {"layer_pooling.proj", "layer_pooling.context", "latent_to_memory", "hierarchy.aggregate_latent",
                    "hierarchy.posterior.summary_proj", "hierarchy.posterior.condition_proj",
                    "hierarchy.posterior.out_proj"}
        if prior_type == "gaussian":
            expected |= {"hierarchy.prior.summary_proj", "hierarchy.prior.condition_proj", "hierarchy.prior.out_proj"}
        assert expected <= set(stacked), set(stacked)
        std = dior.config.init_std
        for name, module in stacked.items():
            assert torch.isfinite(module.weight).all(), name
            assert 0.6 * std < module.weight.std().item() < 1.4 * std, (name, module.weight.std().item())
            assert module.weight.mean().abs().item() < 0.5 * std, name
            if module.bias is not None:
                assert torch.equal(module.bias, torch.zeros_like(module.bias)), name


def test_diagonal_gaussian_entropy_is_the_mean_negative_log_density():
    from dior_cvae.latent_dior import DiagonalGaussian

    torch.manual_seed(0)
    mean, log_std = torch.randn(3, 5), torch.randn(3, 5).clamp(-2, 1)
    dist = DiagonalGaussian(mean, log_std)
    samples = torch.stack([dist.sample() for _ in range(20000)])
    log_density = torch.distributions.Normal(mean, log_std.exp()).log_prob(samples).sum(-1)  # (N, 3)
    torch.testing.assert_close(dist.entropy(), -log_density.mean(0), atol=0.05, rtol=0)


def _padded_pair(generator, context_length=9):
    """A context batch (B=3, S) and a response batch (T=6) with different padding per row."""
    context = torch.randint(4, 96, (3, context_length), generator=generator)
    context_mask = torch.ones_like(context)
    context_mask[1, 6:], context_mask[2, 3:] = 0, 0
    context = context.masked_fill(context_mask == 0, 1)
    labels = torch.randint(4, 96, (3, 6), generator=generator)
    labels[0, 4:], labels[2, 2:] = -100, -100
    return context, context_mask, labels


@pytest.mark.parametrize("attn_implementation,context_length", [("sdpa", 9), ("eager", 9), ("sdpa", 60)])
def test_packed_encoding_equals_two_encoder_passes(attn_implementation, context_length):
    """`encode_with_response` (one pass over [context; response], block-diagonal attention, positions restarting at
    the response) gives the states and pooled vectors of two separate `encode` calls, and training through it gives
    the same loss and gradients as the separate path (taken when the caller passes `encoder_outputs`). A context of
    60 + a response of 6 tokens exceed the 64 positions of the table: two passes, the same results."""
    torch.manual_seed(0)
    model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(memory_dropout=0.0)))
    model.set_attn_implementation(attn_implementation)
    model.eval()
    context, context_mask, labels = _padded_pair(torch.Generator().manual_seed(1), context_length)
    outputs, context_vectors, response_vectors = model.encode_with_response(context, context_mask, labels)
    separate, separate_context = model.encode(context, context_mask)
    response_ids = labels.masked_fill(labels == -100, 1)
    _, separate_response = model.encode(response_ids, labels.ne(-100).long())
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(context_vectors, separate_context, **tol)
    torch.testing.assert_close(response_vectors, separate_response, **tol)
    valid = context_mask.bool()
    torch.testing.assert_close(outputs.last_hidden_state[valid], separate.last_hidden_state[valid], **tol)
    assert len(outputs.hidden_states) == len(separate.hidden_states)

    def loss_and_grads(**inputs):
        model.zero_grad()
        torch.manual_seed(7)  # the same posterior and diffusion noise in both calls
        out = model(attention_mask=context_mask, labels=labels, **inputs)
        out.loss.backward()
        return out.loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed_loss, packed_grads = loss_and_grads(input_ids=context)
    separate_loss, separate_grads = loss_and_grads(encoder_outputs=model.encode(context, context_mask)[0])
    torch.testing.assert_close(packed_loss, separate_loss, **tol)
    assert packed_grads.keys() == separate_grads.keys()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, separate_grads[name], rtol=1e-4, atol=1e-5, msg=name)
