"""The prior's sampling settings travel like every other generation setting: as `generate()` keywords, on a
`GenerationConfig`, and in a saved folder's generation_config.json; and `generate(generation_config=...)` raises no
transformers deprecation warning of the model's own making."""

import logging

import pytest
import torch
from transformers import GenerationConfig
from transformers.utils import logging as hf_logging

from dior_cvae import DiorCVAEForConditionalGeneration


def context_batch(batch, length, vocab=96):
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(5))
    ids[:, 0], ids[:, -1] = 0, 2
    return ids


def record_prior_calls(model):
    """model.diffusion_prior.sample's settings and results, one dict per call."""
    calls = []
    original = model.diffusion_prior.sample

    def recording(condition, num_inference_steps=None, guidance_scale=None, generator=None, temperature=None,
                  **kwargs):
        out = original(condition, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       generator=generator, temperature=temperature, **kwargs)
        calls.append(dict(steps=num_inference_steps, guidance=guidance_scale, temperature=temperature, latents=out))
        return out

    model.diffusion_prior.sample = recording
    return calls


def test_prior_settings_on_a_generation_config_are_used(tiny_model):
    model = tiny_model().eval()
    calls = record_prior_calls(model)
    input_ids = context_batch(2, 8)
    config = GenerationConfig(do_sample=False, max_new_tokens=4, prior_temperature=0.0, num_inference_steps=3,
                              prior_guidance_scale=0.0)
    first = model.generate(input_ids, generation_config=config)
    second = model.generate(input_ids, generation_config=config)
    assert [(c["steps"], c["guidance"], c["temperature"]) for c in calls] == [(3, 0.0, 0.0)] * 2
    # τ = 0: the prior's mode, so greedy decoding answers two identical calls identically
    assert torch.equal(calls[0]["latents"], calls[1]["latents"]) and torch.equal(first, second)
    # a keyword still wins over the config's attribute
    model.generate(input_ids, generation_config=config, prior_temperature=1.0)
    assert calls[-1]["temperature"] == 1.0 and calls[-1]["steps"] == 3


def test_prior_settings_round_trip_through_generation_config_json(tiny_model, tmp_path):
    model = tiny_model().eval()
    model.generation_config.prior_temperature = 0.25
    model.generation_config.num_inference_steps = 4
    model.generation_config.prior_guidance_scale = 0.5
    model.save_pretrained(tmp_path)
    loaded = DiorCVAEForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert (loaded.generation_config.prior_temperature, loaded.generation_config.num_inference_steps,
            loaded.generation_config.prior_guidance_scale) == (0.25, 4, 0.5)
    calls = record_prior_calls(loaded)
    loaded.generate(context_batch(1, 8), max_new_tokens=3)
    assert (calls[0]["steps"], calls[0]["guidance"], calls[0]["temperature"]) == (4, 0.5, 0.25)
    # the saved settings are the defaults of a passed generation config that does not set them
    loaded.generate(context_batch(1, 8), generation_config=GenerationConfig(max_new_tokens=3))
    assert (calls[1]["steps"], calls[1]["guidance"], calls[1]["temperature"]) == (4, 0.5, 0.25)


def test_bad_prior_setting_on_a_generation_config_is_refused_by_name(tiny_model):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="num_inference_steps"):
        model.generate(context_batch(1, 8), generation_config=GenerationConfig(max_new_tokens=3, num_inference_steps=0))


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("keywords", [{}, {"num_return_sequences": 2}])
def test_generate_with_a_generation_config_raises_no_deprecation_warning(tiny_model, keywords):
    model = tiny_model().eval()
    logging.Logger.warning_once.cache_clear()  # transformers warns once per message and process
    handler = Collect()
    logger = hf_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        config = GenerationConfig(do_sample=True, top_k=20, max_new_tokens=4, num_return_sequences=3)
        out = model.generate(context_batch(2, 8), generation_config=config)
        assert out.shape[0] == 6  # 3 sequences (3 prior draws) per context
        assert config.num_return_sequences == 3  # the caller's config is left as it was
        assert not [m for m in handler.messages if "deprecated" in m], handler.messages
        if keywords:  # the caller's own keyword beside a config: transformers' warning is theirs, the count is kept
            assert model.generate(context_batch(2, 8), generation_config=config, **keywords).shape[0] == 4
    finally:
        logger.removeHandler(handler)


def test_greedy_decoding_draws_a_new_latent_per_call_unless_made_repeatable(tiny_model):
    """`do_sample=False` is greedy over tokens only: each call draws new latents. The documented repeatable ways: a
    seeded `latent_generator`, given `latents=`, or `prior_temperature=0`."""
    model = tiny_model().eval()
    calls = record_prior_calls(model)
    input_ids = context_batch(2, 8)
    model.generate(input_ids, do_sample=False, max_new_tokens=3)
    model.generate(input_ids, do_sample=False, max_new_tokens=3)
    assert (calls[0]["latents"] - calls[1]["latents"]).abs().max() > 1e-3  # two calls, two draws
    seeded = [model.generate(input_ids, do_sample=False, max_new_tokens=5,
                             latent_generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(calls[2]["latents"], calls[3]["latents"]) and torch.equal(*seeded)
    modal = [model.generate(input_ids, do_sample=False, max_new_tokens=5, prior_temperature=0) for _ in range(2)]
    assert torch.equal(calls[4]["latents"], calls[5]["latents"]) and torch.equal(*modal)
    given = calls[4]["latents"].view(2, model.config.encoder_layers, model.config.latent_size)
    assert torch.equal(model.generate(input_ids, do_sample=False, max_new_tokens=5, latents=given), modal[0])
