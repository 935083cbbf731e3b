"""GPU checks of the default decoding path — the captured decoding step and the compiled prior solver — against
transformers' own loop and the eager solver, the prior sampler in a bf16 model, and the compiled training step.
Skipped without CUDA."""

import pytest
import torch

from conftest import tiny_config_kwargs
from dior_cvae.utils_dior import compiled_training_problem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW_TOKENS = 10
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles its own model; leftover graphs would count against the recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def build(device, dtype, **overrides):
    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

    torch.manual_seed(0)
    model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(**overrides)))
    return model.to(device=device, dtype=dtype).eval()


def contexts(model, batch, device, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = model.config.bos_token_id, model.config.eos_token_id
    return ids.to(device), torch.ones_like(ids).to(device)


def given_latents(model, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model.config.encoder_layers, model.config.latent_size)
    return torch.randn(shape, generator=g).to(device=device, dtype=model.dtype)


def sample(model, ids, mask, latents, seed=0, **extra):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, latents=latents, do_sample=True, top_k=50, top_p=0.9,
                              min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, **extra)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("batch", [1, 4])
def test_default_generate_replays_captured_steps_and_gives_transformers_tokens(batch, dtype, monkeypatch):
    """The default `generate()` on CUDA decodes through the captured step (generation_dior.py), with no CUDA-graph
    skip, and gives the tokens of transformers' own loop (`disable_compile=True`: dynamic cache, eager)."""
    import dior_cvae.modeling_dior as modeling_dior
    from torch._dynamo.utils import counters

    calls = []
    real_decode = modeling_dior.decode
    monkeypatch.setattr(modeling_dior, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    counters.clear()
    device = torch.device("cuda")
    model = build(device, DTYPES[dtype])
    ids, mask = contexts(model, batch, device)
    latents = given_latents(model, batch, device)

    loop = sample(model, ids, mask, latents, disable_compile=True)
    assert calls == [], "disable_compile=True must take transformers' loop"
    default = sample(model, ids, mask, latents)
    again = sample(model, ids, mask, latents)  # the recorded graphs, replayed
    other_seed = sample(model, ids, mask, latents, seed=1)
    assert len(calls) == 3
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert getattr(model, "_compiled_call", None) is None, "transformers' compiled forward must not run as well"

    assert loop.shape == (batch, NEW_TOKENS + 1)
    assert torch.equal(default, loop), (default, loop)
    assert torch.equal(again, loop), (again, loop)
    assert not torch.equal(other_seed, loop), "another seed must sample other tokens"

    # with the prior's own latents too (its compiled solver inside generate)
    torch.manual_seed(0)
    assert sample(model, ids, mask, None).shape == (batch, NEW_TOKENS + 1)


def test_the_cuda_rng_after_generate_is_transformers_loops():
    """Rows that all end before the captured loop's first look at them (every SYNC_EVERY steps): the draws of the
    steps run past the end are undone, so a second call and a later draw on the GPU see what they see after
    transformers' loop (`disable_compile=True`)."""
    from dior_cvae.generation_dior import SYNC_EVERY

    device = torch.device("cuda")
    model = build(device, torch.float32)
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] += 5.0
    ids, mask = contexts(model, 4, device)
    latents = given_latents(model, 4, device)

    def two_calls_and_a_draw(**extra):
        torch.manual_seed(7)
        with torch.no_grad():
            first, second = (model.generate(ids, attention_mask=mask, latents=latents, do_sample=True,
                                            max_new_tokens=3 * SYNC_EVERY, **extra) for _ in range(2))
        return first, second, torch.rand(4, device=device)

    loop = two_calls_and_a_draw(disable_compile=True)
    captured = two_calls_and_a_draw()
    assert loop[0].shape[1] - 1 < SYNC_EVERY, "rows must end before the loop's first look"
    for loop_part, captured_part in zip(loop, captured):
        assert torch.equal(captured_part, loop_part), (captured_part, loop_part)


def test_compiled_prior_solver_matches_the_eager_loop():
    """On CUDA the noise-free solvers run as one CUDA graph (`prior_dior.compiled_solve`): the same latents as the
    eager loop from the same noise, for DPM-Solver++ and DDIM, with guidance, and no CUDA-graph skip."""
    from torch._dynamo.utils import counters

    from dior_cvae.prior_dior import solve
    from dior_cvae.scheduling_dior import DiorScheduler

    counters.clear()
    device = torch.device("cuda")
    model = build(device, torch.float32)
    ids, mask = contexts(model, 3, device)
    with torch.no_grad():
        _, context_vectors = model.encode(ids, mask)
        condition = context_vectors.flatten(1).float()
        for sampler, guidance in (("dpmsolver++", 0.0), ("ddim", 0.5)):
            model.config.sampler = model.diffusion_prior.config.sampler = sampler
            noise = torch.randn(3, model.config.total_latent_size, device=device,
                                generator=torch.Generator(device).manual_seed(0))
            compiled = model.diffusion_prior.sample(context_vectors, num_inference_steps=7, guidance_scale=guidance,
                                                    initial_noise=noise).flatten(1)
            again = model.diffusion_prior.sample(context_vectors, num_inference_steps=7, guidance_scale=guidance,
                                                 initial_noise=2 * noise).flatten(1)
            scheduler = DiorScheduler(model.config)
            scheduler.set_timesteps(7, device)
            eager = solve(model.diffusion_prior.denoiser, scheduler, noise, condition, guidance)
            eager_again = solve(model.diffusion_prior.denoiser, scheduler, 2 * noise, condition, guidance)
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(again, eager_again, rtol=1e-4, atol=1e-4)  # not the first replay's output
            assert not torch.allclose(compiled, again)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.parametrize("sampler", ["dpmsolver++", "ddim", "ddpm"])
def test_sample_latents_in_a_bf16_model(sampler):
    device = torch.device("cuda")
    model = build(device, torch.bfloat16, sampler=sampler)
    ids, mask = contexts(model, 3, device)
    with torch.no_grad():
        _, context_vectors = model.encode(ids, mask)
        for steps in (None, 5):
            latents = model.sample_latents(context_vectors, num_inference_steps=steps)
            assert latents.device.type == "cuda"
            assert latents.dtype == torch.float32
            assert latents.shape == (3, model.config.encoder_layers, model.config.latent_size)
            assert torch.isfinite(latents).all()
    # and through generate(): the prior's float32 latents decode in the bf16 model
    out = sample(model, ids, mask, None)
    assert out.shape == (3, NEW_TOKENS + 1)


def test_deferred_readback_returns_the_previous_update_without_waiting():
    from dior_cvae.training.compiled import DeferredReadback

    readback = DeferredReadback(torch.device("cuda"))
    assert readback.push(torch.tensor([0.0, 2.5], device="cuda"), 1) is None  # nothing earlier yet
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # queue work behind the next push: its value is read back only one push later
        busy = (busy @ busy).tanh()  # stays finite
    tag, value = readback.push(torch.tensor([1.0, float("inf")], device="cuda") + 0 * busy[0, :2], 2)
    assert tag == 1 and value.tolist() == [0.0, 2.5]
    tag, value = readback.flush()
    assert tag == 2 and value[0] == 1 and value[1].isinf()
    assert readback.flush() is None


def _training_batch(model, batch, source, target, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (batch, source), generator=g)
    labels = torch.randint(4, model.config.vocab_size, (batch, target), generator=g)
    labels[: batch // 2, target - 2 :] = -100  # padded responses
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), labels=labels.to(device))


@pytest.mark.skipif(compiled_training_problem() is not None, reason="needs transformers >= 5.23 (layerdrop branch)")
def test_compiled_training_step_replays_cuda_graphs_and_matches_eager():
    """train.py's `--torch_compile` (`CompiledTrainingForward`, mode reduce-overhead: inductor + CUDA graphs), fp32:
    - with given latents (no random draw: dropouts 0, memory dropout 0) loss and gradients equal eager's;
    - the full training loss (posterior sample, memory dropout, diffusion bound: random draws) has eager's
      distribution: the means over 24 draws at fixed weights agree within 4 standard errors;
    - two batch shapes and a β that changes every update (a device tensor) run without a CUDA-graph skip, and the
      updates train (the loss of a fixed batch falls)."""
    from torch._dynamo.utils import counters

    from dior_cvae.training.compiled import CompiledTrainingForward

    device = torch.device("cuda")
    model = build(device, torch.float32, memory_dropout=0.0).train()
    forward = CompiledTrainingForward(model, "reduce-overhead")
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _training_batch(model, 4, 12, 6, device, seed=0)
    latents = given_latents(model, 4, device)
    results = []
    for run in (model, forward):
        out = run(**batch, latents=latents)
        grads = torch.autograd.grad(out.loss, params, allow_unused=True)
        results.append((out.loss.detach().clone(), [None if g is None else g.clone() for g in grads]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)

    model = build(device, torch.float32, memory_dropout=0.3, kl_free_bits=0.5).train()
    forward = CompiledTrainingForward(model, "reduce-overhead")
    beta = torch.zeros((), device=device)
    losses = {}
    with torch.no_grad():
        for name, run in (("eager", model), ("compiled", forward)):
            losses[name] = torch.stack([run(**batch, kl_weight=beta.fill_(1.0)).loss.clone() for _ in range(24)])
    eager, compiled = losses["eager"], losses["compiled"]
    stderr = ((eager.var() + compiled.var()) / 24).sqrt()
    assert (compiled.mean() - eager.mean()).abs() <= 4 * stderr + 1e-3, (eager.mean(), compiled.mean(), stderr)

    skips_before = counters["inductor"]["cudagraph_skips"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    shapes = [_training_batch(model, 4, 12, 6, device, seed=0), _training_batch(model, 8, 20, 9, device, seed=1)]
    first = last = None
    for step in range(30):
        out = forward(**shapes[step % 2], kl_weight=beta.fill_(min(1.0, step / 20)))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            first = out.loss.item()
        if step == 28:
            last = out.loss.item()
    assert counters["inductor"]["cudagraph_skips"] == skips_before, "a compiled graph ran without CUDA graphs"
    assert last < first, (first, last)
