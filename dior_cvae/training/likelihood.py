"""Importance-weighted estimates of a model's negative log-likelihood −log p(r | c) per response.

For a latent model (Burda et al. 2016),

    log p(r | c) ≥ L_K = E[ log 1/K Σ_k p(r | z_k, c) p(z_k | c) / q(z_k | c, r) ],   z_k ~ q(z | c, r),

with L_1 the ELBO, L_K non-decreasing in K and L_K → log p(r | c) as K → ∞. `importance_weighted_nll` returns −L_K
from one draw of the K samples (and, from the same draws, −(mean of the K log-weights): the single-sample ELBO,
averaged). Per prior type:

- ``none`` (the plain seq2seq): the exact −log p(r | c), the response's summed token cross-entropy; K is unused.
- ``standard`` / ``gaussian``: log p(z | c) exactly (N(0, I); the learned hierarchical Gaussian, each layer's density
  at the posterior sample's own layer summaries, as in training's KL).
- ``diffusion``: log p(z | c) has no closed form. −log p(z | c) is replaced by VDM's continuous-time bound
  (`DiffusionPrior.nll_bound`, the bound training minimises) averaged over `prior_bound_samples` stratified (λ, ε)
  draws per latent. The bound is ≥ −log p(z | c), so every weight is at most its true value and the estimate is an
  upper bound on the importance-weighted NLL, hence on −log p(r | c) (up to the Monte Carlo error of the averaged
  bound). The probability-flow ODE would give −log p(z | c) itself; it is not used here.

Token log-probabilities are the model's (no label smoothing): the same quantity for every prior type, so the numbers
compare across models sharing a tokenizer. Everything runs in eval mode (no dropout, no memory dropout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput

from .data import encode_examples

LOG_2PI = math.log(2 * math.pi)


def _gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(log_std)²) summed over every dimension but the first: (N,)."""
    density = -0.5 * ((z - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * LOG_2PI
    return density.flatten(1).sum(-1)


def response_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(r | ·) of each row: the summed log-probabilities of the label tokens (padding = −100), (N,) float32."""
    token_nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -token_nll.view(labels.shape).sum(-1)


def _log_prior(model, latents: torch.Tensor, summaries: torch.Tensor, context_vectors: torch.Tensor,
               prior_bound_samples: int, generator) -> torch.Tensor:
    """log p(z | c) of latents (N, L, ls) — for the diffusion prior minus the averaged VDM bound: (N,) float32."""
    if model.diffusion_prior is not None:
        flat, condition = latents.flatten(1).float(), context_vectors.flatten(1).float()
        # tiled, not interleaved: nll_bound stratifies λ over consecutive rows, so each latent's M copies, one every
        # N rows, get M stratified noise levels
        bound = model.diffusion_prior.nll_bound(flat.repeat(prior_bound_samples, 1),
                                                condition.repeat(prior_bound_samples, 1), generator)
        return -bound.view(prior_bound_samples, len(flat)).mean(0)
    prior = model.prior.distribution(summaries, context_vectors)  # N(0, I) or the learned Gaussian
    return _gaussian_log_density(latents.float(), prior.mean.float(), prior.log_std.float())


@torch.no_grad()
def importance_weighted_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                            num_samples: int = 50, *, samples_per_pass: int | None = None, prior_bound_samples: int = 16,
                            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """−L_K (``"nll"``) and the averaged single-sample negative ELBO (``"neg_elbo"``) of each response, (B,) float64
    each, in nats. `labels` as in `forward` (``<s> r </s>``, padding = −100). `samples_per_pass` bounds the decoder
    batch to B · samples_per_pass rows (default: all K at once). For ``prior_type="none"`` both are the exact NLL."""
    if model.training:
        raise ValueError("importance_weighted_nll needs model.eval(): dropout and memory dropout change p(r | z, c)")
    if num_samples < 1 or prior_bound_samples < 1:
        raise ValueError(f"num_samples and prior_bound_samples must be >= 1, got {num_samples}, {prior_bound_samples}")
    encoder_outputs, context_vectors = model.encode(input_ids, attention_mask)
    memory = encoder_outputs.last_hidden_state
    if not model.config.has_latent:
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=attention_mask,
                    labels=labels)
        nll = -response_log_likelihood(out.logits, labels).double()
        return {"nll": nll, "neg_elbo": nll.clone()}
    response_ids = labels.masked_fill(labels == -100, model.config.pad_token_id)
    _, response_vectors = model.encode(response_ids, labels.ne(-100).long())
    step = num_samples if samples_per_pass is None else max(1, min(samples_per_pass, num_samples))
    log_weights = []
    for start in range(0, num_samples, step):
        k = min(step, num_samples - start)

        def rep(tensor):  # row b·k + j: sample j of example b
            return tensor.repeat_interleave(k, dim=0)

        contexts = rep(context_vectors)
        latents, posterior, summaries = model.hierarchy.posterior_sample(contexts, rep(response_vectors), generator)
        log_q = _gaussian_log_density(latents.float(), posterior.mean.float(), posterior.log_std.float())
        log_p_z = _log_prior(model, latents, summaries, contexts, prior_bound_samples, generator)
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=rep(memory)), attention_mask=rep(attention_mask),
                    labels=rep(labels), latents=latents)
        log_p_r = response_log_likelihood(out.logits, rep(labels))
        log_weights.append((log_p_r + log_p_z - log_q).double().view(-1, k))
    log_w = torch.cat(log_weights, dim=1)  # (B, K)
    nll = -(torch.logsumexp(log_w, dim=1) - math.log(num_samples))
    return {"nll": nll, "neg_elbo": -log_w.mean(1)}


def estimator_name(config) -> str:
    """What `importance_weighted_nll` computes for a model with this config (recorded beside the numbers)."""
    if not config.has_latent:
        return "exact NLL (no latent)"
    if config.prior_type == "diffusion":
        return "importance-weighted, log p(z|c) from the VDM bound (an upper bound on the NLL)"
    return "importance-weighted, exact log p(z|c)"


def corpus_nll(model, tokenizer, examples: list[dict], *, num_samples: int = 50, batch_size: int = 16,
               samples_per_pass: int | None = None, prior_bound_samples: int = 16, max_source_length: int = 256,
               max_target_length: int = 64, seed: int = 1234, show_progress: bool = False) -> dict:
    """The estimates over (context, response) examples ({"context": [turns], "response": str}), encoded as in
    training: mean NLL and negative ELBO per response, NLL per label token (``<s> r </s>``), and their counts."""

    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", None)
    encoded = encode_examples(tokenizer, examples, max_source_length=min(max_source_length, limit or max_source_length),
                              max_target_length=max_target_length, show_progress=False)
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))  # less padding
    pad = tokenizer.pad_token_id
    nll_sum = elbo_sum = 0.0
    tokens = 0
    batches = range(0, len(order), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="likelihood", unit="batch")
    for start in batches:
        idx = order[start: start + batch_size]
        width = max(len(encoded[i]["input_ids"]) for i in idx)
        target = max(len(encoded[i]["labels"]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        labels = torch.full((len(idx), target), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, : len(encoded[i]["input_ids"])] = torch.tensor(encoded[i]["input_ids"])
            labels[row, : len(encoded[i]["labels"])] = torch.tensor(encoded[i]["labels"])
        input_ids, labels = input_ids.to(device), labels.to(device)
        out = importance_weighted_nll(model, input_ids, input_ids.ne(pad).long(), labels, num_samples,
                                      samples_per_pass=samples_per_pass, prior_bound_samples=prior_bound_samples,
                                      generator=generator)
        nll_sum += out["nll"].sum().item()
        elbo_sum += out["neg_elbo"].sum().item()
        tokens += int(labels.ne(-100).sum())
    n = len(encoded)
    return {"estimator": estimator_name(model.config), "prior_type": model.config.prior_type,
            "num_samples": num_samples if model.config.has_latent else None,
            "prior_bound_samples": prior_bound_samples if model.config.prior_type == "diffusion" else None,
            "responses": n, "tokens": tokens, "nll_per_response": nll_sum / n, "neg_elbo_per_response": elbo_sum / n,
            "nll_per_token": nll_sum / tokens, "seed": seed}
