"""Behaviour of the Dior-CVAE model on tiny configurations (CPU)."""

import warnings

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
from dior_cvae.prior_dior import DiorDenoiser

from conftest import tiny_config_kwargs


def random_latents(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.config.encoder_layers, model.config.latent_size, generator=g)


def context_batch(batch=3, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 96, (batch, length), generator=g)
    input_ids[:, 0] = 0
    input_ids[:, -1] = 2
    return input_ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_decoding_matches_full_forward(tiny_model, attn):
    model = tiny_model().eval()
    model.set_attn_implementation(attn)
    input_ids = context_batch()
    decoder_input_ids = torch.randint(4, 96, (3, 7))
    latents = random_latents(model, 3)
    with torch.no_grad():
        full = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=latents).logits
        encoder_outputs = model.model.encoder(input_ids=input_ids)
        past, steps = None, []
        for t in range(decoder_input_ids.shape[1]):
            out = model(
                encoder_outputs=encoder_outputs,
                attention_mask=torch.ones_like(input_ids),
                decoder_input_ids=decoder_input_ids[:, t : t + 1],
                latents=latents,
                past_key_values=past,
                use_cache=True,
            )
            past = out.past_key_values
            steps.append(out.logits)
    assert past.get_seq_length() == decoder_input_ids.shape[1]  # the latent slot is not in the self-attention cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_matches_single_examples(tiny_model, attn):
    model = tiny_model().eval()
    model.set_attn_implementation(attn)
    short, long = context_batch(1, 5, seed=1), context_batch(1, 9, seed=2)
    input_ids = torch.full((2, 9), model.config.pad_token_id)
    input_ids[0, :5], input_ids[1] = short[0], long[0]
    attention_mask = (input_ids != model.config.pad_token_id).long()
    decoder_short, decoder_long = torch.randint(4, 96, (1, 3)), torch.randint(4, 96, (1, 6))
    decoder_input_ids = torch.full((2, 6), model.config.pad_token_id)
    decoder_input_ids[0, :3], decoder_input_ids[1] = decoder_short[0], decoder_long[0]
    decoder_attention_mask = (decoder_input_ids != model.config.pad_token_id).long()
    latents = random_latents(model, 2)
    with torch.no_grad():
        batched = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            latents=latents,
        ).logits
        alone_short = model(input_ids=short, decoder_input_ids=decoder_short, latents=latents[:1]).logits
        alone_long = model(input_ids=long, decoder_input_ids=decoder_long, latents=latents[1:]).logits
        # the pooled context vectors (prior condition) ignore padding too
        _, pooled_batch = model.encode(input_ids, attention_mask)
        _, pooled_short = model.encode(short, torch.ones_like(short))
    torch.testing.assert_close(batched[0, :3], alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], alone_long[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_batch[0], pooled_short[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("self_infusion,cross_infusion", [(True, True), (True, False), (False, True)])
def test_latents_change_logits_through_either_infusion(tiny_model, self_infusion, cross_infusion):
    model = tiny_model(self_attention_infusion=self_infusion, cross_attention_infusion=cross_infusion).eval()
    input_ids, decoder_input_ids = context_batch(), torch.randint(4, 96, (3, 5))
    with torch.no_grad():
        a = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=random_latents(model, 3, 1)).logits
        b = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=random_latents(model, 3, 2)).logits
    assert (a - b).abs().max().item() > 1e-6


def test_memory_dropout_rate_train_only_and_never_the_latent_slot(tiny_model):
    model = tiny_model(memory_dropout=0.7)
    mask = torch.ones(64, 256, dtype=torch.long)
    kept = model.memory_dropout_mask(mask).float().mean().item()
    assert abs(kept - 0.3) < 0.02
    padded = mask.clone()
    padded[:, 100:] = 0
    assert model.memory_dropout_mask(padded)[:, 100:].sum() == 0  # padding stays masked

    # eval: no memory dropout, i.e. identical to the same weights with p = 0
    input_ids, decoder_input_ids, latents = context_batch(), torch.randint(4, 96, (3, 5)), random_latents(model, 3)
    no_dropout = tiny_model(memory_dropout=0.0)
    no_dropout.load_state_dict(model.state_dict())
    model.eval(), no_dropout.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=latents).logits,
            no_dropout(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=latents).logits,
        )

    # p = 1 in training hides the whole context, but the latent slot still gets through
    everything = tiny_model(memory_dropout=1.0).train()
    with torch.no_grad():
        base = everything(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=latents).logits
        other_context = everything(
            input_ids=context_batch(seed=5), decoder_input_ids=decoder_input_ids, latents=latents
        ).logits
        other_latents = everything(
            input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=random_latents(model, 3, 9)
        ).logits
    assert torch.isfinite(base).all()
    torch.testing.assert_close(base, other_context)
    assert (base - other_latents).abs().max().item() > 1e-6


@pytest.mark.parametrize("prior_type", ["diffusion", "gaussian", "standard"])
def test_overfits_eight_pairs_and_every_parameter_gets_a_gradient(tiny_model, prior_type):
    model = tiny_model(prior_type=prior_type, label_smoothing=0.0).train()
    input_ids = context_batch(8, 10, seed=3)
    labels = torch.randint(4, 96, (8, 6), generator=torch.Generator().manual_seed(4))
    labels[:, 0], labels[:, -1] = 0, 2
    labels[:3, 4:] = -100

    out = model(input_ids=input_ids, labels=labels, kl_weight=1.0)
    out.loss.backward()
    no_gradient = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # the denoiser's zero-initialised output layer (the prior starts as N(0, I)) holds back the layers below it
    # for exactly one step
    assert all(n.startswith("diffusion_prior.denoiser.") for n in no_gradient)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    optimizer.step()
    optimizer.zero_grad()
    model(input_ids=input_ids, labels=labels, kl_weight=1.0).loss.backward()
    no_gradient = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_gradient == []

    first = out.rc_loss.item()
    for _ in range(80):
        optimizer.zero_grad()
        out = model(input_ids=input_ids, labels=labels, kl_weight=0.1)
        out.loss.backward()
        optimizer.step()
    assert out.rc_loss.item() < 0.15 * first
    if prior_type == "diffusion":
        assert out.neg_entropy is not None and out.prior_loss is not None
        torch.testing.assert_close(out.kl_loss, out.neg_entropy + out.prior_loss)


def test_generate_draws_one_latent_per_returned_sequence(tiny_model):
    model = tiny_model().eval()
    input_ids = context_batch(2, 8)
    seen = []
    original = model.sample_latents

    def recording(*args, **kwargs):
        latents = original(*args, **kwargs)
        seen.append(latents)
        return latents

    model.sample_latents = recording
    decoded_with = []
    model.register_forward_pre_hook(lambda m, a, kw: decoded_with.append(kw["latent_slots"]), with_kwargs=True)
    out = model.generate(input_ids, num_return_sequences=4, do_sample=False, max_new_tokens=6)
    assert out.shape[0] == 8
    (latents,) = seen
    assert latents.shape == (8, 2, 8)
    flat = latents.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(8) * 1e9).min() > 1e-3  # 8 different draws
    assert decoded_with and all(torch.equal(kw, model.project_latent_slots(latents)) for kw in decoded_with)

    assert model.generate(input_ids, num_beams=3, num_return_sequences=2, max_new_tokens=6).shape[0] == 4
    sampled = model.generate(input_ids, do_sample=True, top_k=20, top_p=0.9, num_return_sequences=3, max_new_tokens=6)
    assert sampled.shape[0] == 6 and sampled.shape[1] <= 7


@pytest.mark.parametrize("prior_type", ["diffusion", "gaussian", "standard"])
def test_prior_temperature_scales_the_spread_of_generated_latents(tiny_model, prior_type):
    """τ = 0: one latent per context (its draws coincide); τ = 0.5: half the spread of τ = 1 about the same centre."""
    model = tiny_model(prior_type=prior_type).eval()
    if prior_type == "gaussian":  # a prior with a non-zero mean and a spread that is not 1
        torch.nn.init.normal_(model.hierarchy.prior.out_proj.weight, std=0.5)
    seen = []
    original = model.sample_latents
    model.sample_latents = lambda *a, **kw: seen.append(original(*a, **kw)) or seen[-1]
    input_ids = context_batch(1, 8)

    def latents(**kwargs):
        model.generate(input_ids, num_return_sequences=3000, do_sample=False, max_new_tokens=1,
                       latent_generator=torch.Generator().manual_seed(0), **kwargs)
        return seen[-1].flatten(1).double()

    full, half, zero = latents(), latents(prior_temperature=0.5), latents(prior_temperature=0)
    assert zero.std(0).max() < 1e-5
    centre = full.mean(0)  # for the diffusion prior the mode path ends at its mean only approximately
    assert (zero[0] - centre).abs().max() < 0.1 and (half.mean(0) - centre).abs().max() < 0.1
    ratio = half.std(0) / full.std(0)
    assert ((ratio - 0.5).abs() < 0.05).all(), ratio
    model.config.prior_temperature = 0.5  # the config's value is the default of every call
    torch.testing.assert_close(latents(), half)


def test_generate_with_given_latents_and_generator_is_reproducible(tiny_model):
    model = tiny_model().eval()
    input_ids = context_batch(2, 8)
    run = lambda seed: model.generate(  # noqa: E731
        input_ids, max_new_tokens=6, num_return_sequences=2, latent_generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(1), run(1))
    latents = random_latents(model, 2)
    a = model.generate(input_ids, latents=latents, max_new_tokens=6)
    b = model.generate(input_ids, latents=latents, max_new_tokens=6, num_inference_steps=3)
    assert torch.equal(a, b)  # given latents bypass the prior
    with pytest.raises(ValueError, match="latents"):
        model.generate(input_ids, latents=latents[:, :1], max_new_tokens=3)


def test_bad_contexts_raise(tiny_model):
    model = tiny_model().eval()
    input_ids = context_batch(2, 8)
    mask = torch.ones_like(input_ids)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"empty context.*\[1\]"):
        model.generate(input_ids, attention_mask=mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(context_batch(1, 65), max_new_tokens=3)


def test_guidance_is_applied_at_every_sampling_step(tiny_model, monkeypatch):
    """Every step of the sampler gets (1 + w)·f(z, λ, c) − w·f(z, λ, 0), computed here from plain denoiser calls:
    the sampling loop's precomputed noise-level and condition parts change nothing."""
    from dior_cvae.scheduling_dior import DiorScheduler

    model = tiny_model(prior_guidance_scale=0.5).eval()
    prior = model.diffusion_prior
    for parameter in prior.parameters():  # a denoiser whose output depends on z, λ and c (zero-init is constant)
        torch.nn.init.normal_(parameter, std=0.3)
    stepped = []
    original_step = DiorScheduler.step

    def step(self, out, step_index, sample, *args, **kwargs):
        stepped.append((out, step_index, sample, self.log_snrs[step_index]))
        return original_step(self, out, step_index, sample, *args, **kwargs)

    monkeypatch.setattr(DiorScheduler, "step", step)
    condition = torch.randn(3, 2 * 32)
    prior.sample(condition.view(3, 2, 32), num_inference_steps=5)
    assert [s[1] for s in stepped] == list(range(5))
    for output, _, sample, log_snr in stepped:
        log_snr = log_snr.expand(3)
        expected = (1.5 * prior.denoiser(sample, log_snr, condition)
                    - 0.5 * prior.denoiser(sample, log_snr, torch.zeros_like(condition)))
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(stepped[0][0], stepped[-1][0])


def test_cfg_dropout_zeroes_the_condition_per_example(tiny_model):
    model = tiny_model(cfg_dropout=0.5)
    seen = []
    model.diffusion_prior.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    model.diffusion_prior.nll_bound(torch.randn(400, 16), torch.randn(400, 64) + 3)
    dropped = (seen[0] == 0).all(-1)
    assert 0.4 < dropped.float().mean() < 0.6  # per example, not the whole batch at once


def test_from_bart_copies_the_backbone(tmp_path):
    bart_config = BartConfig(**{k: v for k, v in tiny_config_kwargs().items() if k in BartConfig.__dataclass_fields__})
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(bart_config).eval()
    bart.generation_config.num_beams, bart.generation_config.no_repeat_ngram_size = 4, 3  # like facebook/bart-base
    bart.save_pretrained(tmp_path / "bart")
    dior = DiorCVAEForConditionalGeneration.from_bart(
        tmp_path / "bart",
        latent_size=8,
        denoiser_hidden_size=32,
        self_attention_infusion=False,
        cross_attention_infusion=False,
        memory_dropout=0.0,
    ).eval()
    bart_state = bart.state_dict()
    for name, tensor in dior.state_dict().items():
        if name in bart_state:
            assert torch.equal(tensor, bart_state[name]), name
    assert set(bart_state) <= set(dior.state_dict())
    assert dior.generation_config.num_beams in (None, 1) and not dior.generation_config.no_repeat_ngram_size
    input_ids, decoder_input_ids = context_batch(), torch.randint(4, 96, (3, 5))
    with torch.no_grad():
        expected = bart(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits
        got = dior(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=random_latents(dior, 3)).logits
    torch.testing.assert_close(got, expected)
    # the new modules were initialised, not left as garbage
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in dior.hierarchy.parameters())


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("latent_size", 0, "latent_size"),
        ("memory_dropout", 1.5, "memory_dropout"),
        ("memory_dropout", -0.1, "memory_dropout"),
        ("cfg_dropout", 2.0, "cfg_dropout"),
        ("label_smoothing", -1.0, "label_smoothing"),
        ("ddim_eta", 1.5, "ddim_eta"),
        ("num_inference_steps", 0, "num_inference_steps"),
        ("log_snr_min", float("nan"), "log_snr_min"),
        ("log_snr_max", -1.0, "log_snr_max"),
        ("prior_type", "flow", "prior_type"),
        ("prediction_type", "v", "prediction_type"),
        ("sampler", "euler", "sampler"),
        ("prior_guidance_scale", -1.0, "prior_guidance_scale"),
        ("prior_guidance_scale", float("nan"), "prior_guidance_scale"),
        ("prior_temperature", -0.5, "prior_temperature"),
        ("prior_temperature", float("inf"), "prior_temperature"),
        ("denoiser_hidden_size", 0, "denoiser_hidden_size"),
        ("denoiser_layers", -1, "denoiser_layers"),
        ("kl_free_bits", -1.0, "kl_free_bits"),
        ("kl_free_bits", float("inf"), "kl_free_bits"),
        ("decoder_layers", 3, "encoder_layers"),
    ],
)
def test_invalid_config_values_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        DiorCVAEConfig(**{**tiny_config_kwargs(), field: value})


def test_a_schedule_that_ends_on_the_data_is_rejected():
    # the paper's β range 5e-6 … 1e-3 (T = 50) leaves ᾱ_T ≈ 0.97, i.e. log-SNR ≈ +3.5 at the "noisy" end
    with pytest.raises(ValueError, match="log_snr_min"):
        DiorCVAEConfig(log_snr_min=-1.0)
    with pytest.raises(ValueError, match="memory_dropout"):
        DiorCVAEConfig(memory_dropout=1.0, cross_attention_infusion=False)
    with pytest.raises(ValueError, match="never see the latent"):
        DiorCVAEConfig(self_attention_infusion=False, cross_attention_infusion=False)
    DiorCVAEConfig(prior_type="none", self_attention_infusion=False, cross_attention_infusion=False)
    DiorCVAEConfig()  # the defaults are valid


def test_denoiser_shapes(tiny_model):
    model = tiny_model()
    denoiser = model.diffusion_prior.denoiser
    assert isinstance(denoiser, DiorDenoiser)
    for parameter in denoiser.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    noisy, log_snr, condition = torch.randn(5, 16), torch.linspace(-10, 10, 5), torch.randn(5, 64)
    out = denoiser(noisy, log_snr, condition)
    assert out.shape == (5, 16)
    # the three parts of input_proj are its weight's columns for [z; time_mlp(λ) + condition_mlp(c)] (checkpoints
    # store that one Linear)
    from dior_cvae.prior_dior import noise_level_embedding

    time = denoiser.time_mlp(noise_level_embedding(log_snr, denoiser.time_mlp[0].in_features, model.config))
    hidden = denoiser.input_proj(torch.cat([noisy, time + denoiser.condition_mlp(condition)], dim=-1))
    torch.testing.assert_close(out, denoiser.denoise(hidden), rtol=1e-5, atol=1e-5)


def test_changing_the_sampler_on_the_config_takes_effect(tiny_model):
    model = tiny_model(sampler="ddpm").eval()
    context_vectors = torch.randn(2, 2, 32)
    ddpm = model.sample_latents(context_vectors, generator=torch.Generator().manual_seed(0))
    model.config.sampler = "ddim"
    ddim = model.sample_latents(context_vectors, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(ddpm, ddim)
    assert model.sample_latents(context_vectors, num_inference_steps=4).shape == (2, 2, 8)


def test_generate_feeds_a_streamer(tiny_model):
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.ended = True

    model = tiny_model().eval()
    streamer = Recorder()
    out = model.generate(context_batch(1, 8), max_new_tokens=5, do_sample=True, streamer=streamer)
    assert streamer.ended
    assert torch.equal(torch.cat([c.flatten() for c in streamer.chunks]), out[0])


def test_encoder_outputs_without_hidden_states_need_latents(tiny_model):
    model = tiny_model().eval()
    input_ids = context_batch(2, 8)
    bare = model.model.encoder(input_ids=input_ids)
    with pytest.raises(ValueError, match="output_hidden_states"):
        model.generate(encoder_outputs=bare, attention_mask=torch.ones_like(input_ids), max_new_tokens=3)
    full, _ = model.encode(input_ids, torch.ones_like(input_ids))
    assert model.generate(encoder_outputs=full, attention_mask=torch.ones_like(input_ids), max_new_tokens=3).shape[0] == 2


@pytest.mark.parametrize("infusion", [(True, True), (True, False), (False, True)])
def test_static_cache_gives_the_dynamic_cache_tokens(tiny_model, infusion):
    model = tiny_model(self_attention_infusion=infusion[0], cross_attention_infusion=infusion[1]).eval()
    input_ids = context_batch(3, 9)
    input_ids[1, 6:] = 1  # padding
    latents = random_latents(model, 3)
    kwargs = dict(latents=latents, max_new_tokens=7, do_sample=True, top_k=20)
    torch.manual_seed(5)
    dynamic = model.generate(input_ids, **kwargs)
    torch.manual_seed(5)
    static = model.generate(input_ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)
    torch.manual_seed(5)
    uncached = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(dynamic, uncached)


def test_unsupported_generation_modes_are_refused_by_name(tiny_model):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="assistant_model"):
        model.generate(context_batch(1, 6), assistant_model=tiny_model(), max_new_tokens=3)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate(context_batch(1, 6), prompt_lookup_num_tokens=2, max_new_tokens=3)


def test_reentrant_gradient_checkpointing_is_refused_and_the_default_works(tiny_model):
    model = tiny_model().train()
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_enable()
    labels = torch.randint(4, 96, (2, 5))
    model(input_ids=context_batch(2, 6), labels=labels).loss.backward()
    assert model.latent_to_memory.weight.grad.abs().sum() > 0


def test_explicit_none_generation_arguments_are_honoured(tiny_model):
    model = tiny_model().eval()
    model.generation_config.forced_eos_token_id = 2
    latents = random_latents(model, 1)
    forced = model.generate(context_batch(1, 6), latents=latents, max_new_tokens=4, min_new_tokens=4)
    free = model.generate(context_batch(1, 6), latents=latents, max_new_tokens=4, min_new_tokens=4,
                          forced_eos_token_id=None)
    assert forced[0, -1] == 2 and free[0, -1] != 2


def test_labels_with_given_latents_give_the_reconstruction_loss(tiny_model):
    model = tiny_model().eval()
    labels = torch.randint(4, 96, (3, 5))
    out = model(input_ids=context_batch(3, 6), labels=labels, latents=random_latents(model, 3))
    assert out.kl_loss is None and torch.equal(out.loss, out.rc_loss)


def test_outputs_carry_encoder_states_and_tuples_match(tiny_model):
    model = tiny_model().eval()
    model.set_attn_implementation("eager")
    input_ids, latents = context_batch(2, 6), random_latents(model, 2)
    decoder_input_ids = torch.randint(4, 96, (2, 4))
    out = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=latents,
                output_hidden_states=True, output_attentions=True)
    assert len(out.encoder_hidden_states) == 3 and len(out.encoder_attentions) == 2
    as_tuple = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, latents=latents, return_dict=False)
    torch.testing.assert_close(as_tuple[0], out.logits)
    gen = model.generate(input_ids, latents=latents, max_new_tokens=3, return_dict_in_generate=True,
                         output_hidden_states=True, output_attentions=True)
    assert len(gen.encoder_hidden_states) == 3 and len(gen.encoder_attentions) == 2


def test_prior_type_none_is_exactly_bart(tmp_path):
    bart_config = BartConfig(**{k: v for k, v in tiny_config_kwargs().items() if k in BartConfig.__dataclass_fields__})
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(bart_config).eval()
    bart.save_pretrained(tmp_path / "bart")
    plain = DiorCVAEForConditionalGeneration.from_bart(tmp_path / "bart", prior_type="none").eval()
    assert set(plain.state_dict()) == set(bart.state_dict())
    input_ids = context_batch()
    torch.manual_seed(1)
    expected = bart.generate(input_ids, do_sample=True, max_new_tokens=6, num_return_sequences=2)
    torch.manual_seed(1)
    got = plain.generate(input_ids, do_sample=True, max_new_tokens=6, num_return_sequences=2)
    assert torch.equal(got, expected)
    labels = torch.randint(4, 96, (3, 5))
    torch.testing.assert_close(plain(input_ids=input_ids, labels=labels).logits,
                               bart(input_ids=input_ids, labels=labels).logits)
    with pytest.raises(ValueError, match="`prior_temperature` was given, but this model has no latent"):
        plain.generate(input_ids, max_new_tokens=3, prior_temperature=0.5)


def test_older_transformers_refused_newer_ones_warned_once(monkeypatch):
    from dior_cvae import utils_dior
    from dior_cvae.utils_dior import TESTED_TRANSFORMERS, check_transformers_version

    for version in ("5.16.2", "4.57.0"):
        with pytest.raises(ImportError, match=f"needs transformers >= {TESTED_TRANSFORMERS[0]}"):
            check_transformers_version(version)
    monkeypatch.setattr(utils_dior, "_warned_untested", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in ("5.17.0", "5.25.0", "5.25.1.dev0"):
            check_transformers_version(version)
    with pytest.warns(UserWarning, match="this environment has transformers 6.0.0. Continuing"):
        check_transformers_version("6.0.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_transformers_version("6.1.0")  # once per process


def test_a_response_longer_than_the_positions_is_a_clear_error(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=context_batch(1, 6), labels=torch.randint(4, 96, (1, 65)))


@pytest.mark.compile
def test_torch_compile_of_the_training_forward_matches_eager(tiny_model):
    """`torch.compile(model, dynamic=True)` (as HF Trainer's `torch_compile=True` does) traces the training forward:
    random draws, memory dropout and the free-bits gate included. With the aot_eager backend (eager kernels and
    random draws, so it runs on the CPU) loss and gradients equal eager's over two shapes and two β given as
    tensors (a float β would be a constant of the graph, recompiled per value)."""
    model = tiny_model(memory_dropout=0.3, kl_free_bits=0.5).train()  # the diffusion prior
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    g = torch.Generator().manual_seed(0)
    for source, target, beta in ((12, 6, 0.3), (20, 9, 0.8)):
        ids = torch.randint(4, 96, (4, source), generator=g)
        labels = torch.randint(4, 96, (4, target), generator=g)
        results = []
        for forward in (model, compiled):
            torch.manual_seed(1)
            out = forward(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                          kl_weight=torch.tensor(beta))
            grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
            results.append((out.loss.detach(), out.kl_loss.detach(), grads))
        (loss_a, kl_a, grads_a), (loss_b, kl_b, grads_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl_b, kl_a, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads_a, grads_b):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
