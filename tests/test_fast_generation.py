"""The opt-in fast generation paths (`dior_cvae.dior_fast`) give the default path's tokens under the same seed.

CPU tests run the static-cache path (with and without torch.compile's graph capture, `backend="eager"`), the
graphed decoding loop without graphs, and the hoisted prior loop; a dispatch-mode check stands in for CUDA-graph
capture (no host synchronisation inside a decoding step or the prior loop while "capturing"). The CUDA tests replay
the actual graphs and are skipped without a GPU.
"""

from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import CompileConfig

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration, dior_fast

from conftest import tiny_config_kwargs

SAMPLING = dict(do_sample=True, top_k=50, top_p=0.9)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(batch=3, length=10, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 96, (batch, length), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 0, 2
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        attention_mask[1, length - 3 :] = 0  # one padded context
        input_ids[1, length - 3 :] = 1
    return input_ids.to(device), attention_mask.to(device)


def random_latents(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, model.config.encoder_layers, model.config.latent_size)
    return torch.randn(shape, generator=g).to(model.device, model.dtype)


def generate_pair(model, seed=0, batch=3, latent_seed=None, **kwargs):
    """(default generate, generate with `kwargs` added), each after `torch.manual_seed(seed)`; with `latent_seed`,
    each call also gets a fresh `latent_generator` seeded with it."""
    input_ids, attention_mask = inputs(batch, device=model.device)
    base = {k: v for k, v in kwargs.items() if k not in ("cache_implementation", "custom_generate",
                                                          "compile_config", "use_cuda_graph", "compile_step")}

    def run(extra):
        torch.manual_seed(seed)
        if latent_seed is not None:
            extra = dict(extra, latent_generator=torch.Generator().manual_seed(latent_seed))
        return model.generate(input_ids, attention_mask=attention_mask, **extra)

    return run(base), run(kwargs)


class HostSyncDetector(TorchDispatchMode):
    """Records ops that read device data on the host (what a CUDA graph cannot contain)."""

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNC_OPS:
            self.hits.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def capturing():
    """Make transformers take its CUDA-graph-capture code paths (no mask-skipping checks) on CPU."""
    return mock.patch("torch.cuda.is_current_stream_capturing", return_value=True)


# ---- static cache -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("do_sample", [False, True])
def test_static_cache_gives_the_same_tokens(tiny_model, do_sample):
    model = tiny_model().eval()
    kwargs = dict(SAMPLING, do_sample=do_sample) if do_sample else dict(do_sample=False)
    expected, actual = generate_pair(model, seed=3, latents=random_latents(model, 3), max_new_tokens=10,
                                     cache_implementation="static", **kwargs)
    assert torch.equal(expected, actual)


def test_static_cache_with_prior_samples(tiny_model):
    model = tiny_model().eval()
    expected, actual = generate_pair(model, seed=1, latent_seed=5, max_new_tokens=8, num_return_sequences=2,
                                     cache_implementation="static", **SAMPLING)
    assert actual.shape[0] == 6 and torch.equal(expected, actual)


def test_static_cache_compiles_in_one_graph(tiny_model):
    """transformers compiles the decoding step when the cache is static; `fullgraph=True` fails on any graph break.
    (backend="eager": dynamo's capture without inductor's code generation, which is slow on small CPUs.)"""
    torch._dynamo.reset()
    model = tiny_model().eval()
    compile_config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    compile_config._compile_all_devices = True
    for do_sample in (False, True):
        expected, actual = generate_pair(model, seed=2, latents=random_latents(model, 3), max_new_tokens=8,
                                         cache_implementation="static", compile_config=compile_config,
                                         **dict(SAMPLING, do_sample=do_sample) if do_sample else {})
        assert torch.equal(expected, actual)
    assert getattr(model, "_compiled_call", None) is not None  # the compiled step was really used


# ---- graphed decoding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("do_sample", [False, True])
def test_graphed_decoding_gives_the_same_tokens(tiny_model, do_sample):
    model = tiny_model().eval()
    kwargs = dict(SAMPLING, do_sample=do_sample) if do_sample else dict(do_sample=False)
    latents = random_latents(model, 3)
    for seed in (0, 1):  # the second call reuses the cached static state
        expected, actual = generate_pair(model, seed=seed, latents=latents, max_new_tokens=12, min_new_tokens=12,
                                         custom_generate=dior_fast.graphed_decoding, **kwargs)
        assert torch.equal(expected, actual)
    assert dior_fast.graph_status(model)["decode_states"] == 1
    assert dior_fast.graph_status(model)["decode_graphs"] == 0  # no graphs on CPU: the same steps, eagerly


def test_graphed_decoding_compiled_step_gives_the_same_tokens(tiny_model):
    """`compile_step`: the decoding step through torch.compile (fullgraph; dynamo's `eager` backend on CPU)."""
    torch._dynamo.reset()
    model = tiny_model().eval()
    latents = random_latents(model, 3)
    for seed in (0, 1):
        expected, actual = generate_pair(model, seed=seed, latents=latents, max_new_tokens=8, min_new_tokens=8,
                                         custom_generate=dior_fast.graphed_decoding, compile_step="eager", **SAMPLING)
        assert torch.equal(expected, actual)
    assert dior_fast.graph_status(model)["decode_compiled_states"] == 1


def test_graphed_decoding_with_prior_and_return_sequences(tiny_model):
    model = tiny_model().eval()
    expected, actual = generate_pair(model, seed=4, latent_seed=7, max_new_tokens=6, num_return_sequences=2,
                                     custom_generate=dior_fast.graphed_decoding, use_cuda_graph=False, **SAMPLING)
    assert torch.equal(expected, actual)


def test_graphed_decoding_stops_where_generate_stops(tiny_model):
    model = tiny_model().eval()
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = 3.5  # EOS early and at different steps per row
    latents = random_latents(model, 4)
    lengths = set()
    for seed in range(6):
        for extra in ({}, {"min_new_tokens": 3}):
            expected, actual = generate_pair(model, seed=seed, batch=4, latents=latents, do_sample=True,
                                             max_new_tokens=15, custom_generate=dior_fast.graphed_decoding, **extra)
            assert expected.shape == actual.shape and torch.equal(expected, actual)
            lengths.add(expected.shape[1])
    assert len(lengths) > 1 and max(lengths) < 16  # really stopped early, at different lengths


def test_graphed_decoding_step_has_no_host_sync(tiny_model):
    """What CUDA-graph recording needs: a decoding step never reads device data on the host."""
    model = tiny_model().eval()
    input_ids, attention_mask = inputs()
    model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6,
                   custom_generate=dior_fast.graphed_decoding, **SAMPLING)
    (state,) = model._dior_decode_states.values()
    with torch.no_grad():
        encoder_states = state.encoder_states.clone()
        state.load(state.ids[:, :1].clone(), encoder_states, attention_mask, state.latents.clone())
        state.prefill()
        with capturing(), HostSyncDetector() as detector:
            state.step(2)
            state.step(3)
    assert detector.hits == []
    with torch.no_grad(), HostSyncDetector() as detector:  # the detector does see the eager mask checks
        state.step(4)
    assert detector.hits


def test_slot_stash_lets_later_steps_skip_latent_memory(tiny_model):
    """After the first step the slot's keys/values live beside the cache: `latent_memory=None` gives the same
    tokens (the optional hook for `forward`: `dior_fast.latent_memory_needed`)."""
    model = tiny_model().eval()
    decoder = model.model.decoder
    original = decoder.forward
    skipped = []

    def forward(*args, latent_memory=None, past_key_values=None, **kwargs):
        if past_key_values is not None and not dior_fast.latent_memory_needed(past_key_values):
            skipped.append(1)
            latent_memory = None
        return original(*args, latent_memory=latent_memory, past_key_values=past_key_values, **kwargs)

    latents = random_latents(model, 3)
    torch.manual_seed(0)
    input_ids, attention_mask = inputs()
    expected = model.generate(input_ids, attention_mask=attention_mask, latents=latents, max_new_tokens=8, **SAMPLING)
    decoder.forward = forward
    try:
        torch.manual_seed(0)
        actual = model.generate(input_ids, attention_mask=attention_mask, latents=latents, max_new_tokens=8,
                                **SAMPLING)
    finally:
        decoder.forward = original
    assert skipped and torch.equal(expected, actual)


@pytest.mark.parametrize("infusion", [dict(self_attention_infusion=False), dict(cross_attention_infusion=False)])
def test_fast_paths_with_one_infusion_off(tiny_model, infusion):
    model = tiny_model(**infusion).eval()
    latents = random_latents(model, 3)
    for extra in (dict(cache_implementation="static"), dict(custom_generate=dior_fast.graphed_decoding)):
        expected, actual = generate_pair(model, seed=1, latents=latents, max_new_tokens=8, **SAMPLING, **extra)
        assert torch.equal(expected, actual)


# ---- prior --------------------------------------------------------------------------------------------------------

PRIOR_VARIANTS = [
    dict(),
    dict(sampler="ddim"),
    dict(sampler="ddim", ddim_eta=0.5),
    dict(prediction_type="sample", clip_sample=True),
    dict(prior_guidance_scale=0.0),
    dict(denoiser_layers=0, prior_guidance_scale=0.3),
]


@pytest.mark.parametrize("variant", PRIOR_VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_fast_prior_matches_the_eager_loop(variant):
    torch.manual_seed(0)
    model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(**variant))).eval()
    prior = model.diffusion_prior
    condition = torch.randn(3, model.config.encoder_layers * model.config.d_model)
    sampler = dior_fast.FastPriorSampler(prior)
    for steps in (None, 7):
        g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
        expected = prior.sample(condition, steps, generator=g1)
        actual = sampler(condition, steps, generator=g2)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(g1.get_state(), g2.get_state())  # the same random draws, no more, no fewer


def test_fast_prior_compiles_in_one_graph(tiny_model):
    torch._dynamo.reset()
    model = tiny_model().eval()
    condition = torch.randn(2, model.config.encoder_layers * model.config.d_model)
    sampler = dior_fast.FastPriorSampler(model.diffusion_prior, compile="eager")
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = model.diffusion_prior.sample(condition)
        torch.manual_seed(seed)
        actual = sampler(condition)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert sampler._compiled_step is not None


def test_fast_prior_loop_has_no_host_sync(tiny_model):
    model = tiny_model().eval()
    sampler = dior_fast.FastPriorSampler(model.diffusion_prior)
    condition = torch.randn(2, model.config.encoder_layers * model.config.d_model)
    coefficients = sampler._coefficients(condition.dtype)
    with capturing(), HostSyncDetector() as detector:
        sampler.loop(condition, model.config.num_inference_steps, 0.1, coefficients=coefficients)
    assert detector.hits == []


def test_enable_fast_prior_routes_sample_latents(tiny_model):
    model = tiny_model().eval()
    context_vectors = torch.randn(2, model.config.encoder_layers, model.config.d_model)
    expected = model.sample_latents(context_vectors, generator=torch.Generator().manual_seed(3))
    sampler = dior_fast.enable_fast_prior(model)
    assert model.diffusion_prior.sample is sampler
    actual = model.sample_latents(context_vectors, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    dior_fast.disable_fast_prior(model)
    assert "sample" not in vars(model.diffusion_prior)
    assert dior_fast.enable_fast_prior(tiny_model(prior_type="gaussian")) is None


# ---- CUDA: the real graphs ----------------------------------------------------------------------------------------


def cuda_model(**overrides):
    torch.manual_seed(0)
    with torch.device("cuda"):
        return DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(**overrides))).eval()


@cuda
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graphed_decoding_replays_the_eager_tokens(batch):
    model = cuda_model()
    latents = random_latents(model, batch)
    for seed in (0, 1, 2):  # first call records, later calls replay
        expected, actual = generate_pair(model, seed=seed, batch=batch, latents=latents, max_new_tokens=12,
                                         min_new_tokens=12, custom_generate=dior_fast.graphed_decoding, **SAMPLING)
        assert torch.equal(expected, actual), seed
    status = dior_fast.graph_status(model)
    assert status["decode_graph_errors"] == [] and status["decode_graphs"] == 12  # prefill + 11 steps


@cuda
def test_cuda_graphed_decoding_stops_where_generate_stops():
    model = cuda_model()
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = 3.5
    latents = random_latents(model, 4)
    for seed in range(4):
        expected, actual = generate_pair(model, seed=seed, batch=4, latents=latents, do_sample=True,
                                         max_new_tokens=15, custom_generate=dior_fast.graphed_decoding)
        assert expected.shape == actual.shape and torch.equal(expected, actual)
    assert dior_fast.graph_status(model)["decode_graph_errors"] == []


@cuda
def test_cuda_graphed_prior_replays_the_eager_loop():
    model = cuda_model()
    sampler = dior_fast.FastPriorSampler(model.diffusion_prior)
    condition = torch.randn(2, model.config.encoder_layers * model.config.d_model, device="cuda")
    expected = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected.append(sampler.loop(condition, model.config.num_inference_steps, 0.1))
        torch.manual_seed(seed)
        expected.append(model.diffusion_prior.sample(condition))
    actual = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        actual.append(sampler(condition))  # records on the first call, replays on the second
    assert sampler.graph_error is None and len(sampler.graphs) == 1
    for seed in (0, 1):
        torch.testing.assert_close(actual[seed], expected[2 * seed], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual[seed], expected[2 * seed + 1], rtol=1e-3, atol=1e-3)
