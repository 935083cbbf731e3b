"""The captured decoding step (dior_cvae/generation_dior.py), checked on the CPU: the loop and the processors give
transformers' tokens under the same seed, through the eager step and through a torch.compile'd one (aot_eager: the
same tracing as on CUDA, without the CUDA graph), with one graph per setting; what it cannot serve goes to
transformers' loop; the memory padding changes no token. On CUDA, where it is the default, tests/test_cuda.py."""

import pytest
import torch

import dior_cvae.generation_dior as generation_dior
import dior_cvae.modeling_dior as modeling_dior
from conftest import tiny_config_kwargs
from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs())).eval()


@pytest.fixture
def contexts(model):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, model.config.vocab_size, (5, 9), generator=g)
    ids[:, -1] = model.config.eos_token_id
    return ids


@pytest.fixture
def graph_path(monkeypatch):
    """Take the captured-step path on the CPU (it is gated on CUDA), with `step` for the steps after the first;
    returns the list of `decode` calls."""
    calls = []

    def use(step):
        real_decode = generation_dior.decode

        def spy(*args, **kwargs):
            calls.append(args[3])  # the processor specs
            return real_decode(*args, step=step, **kwargs)

        monkeypatch.setattr(modeling_dior, "decode", spy)
        monkeypatch.setattr(generation_dior, "captures_decoding", lambda model, config: not config.disable_compile)
        return calls

    return use


def generate(model, ids, seed=3, **kwargs):
    torch.manual_seed(seed)
    settings = dict(do_sample=True, top_k=20, top_p=0.9, max_new_tokens=NEW_TOKENS, cache_implementation="static")
    return model.generate(ids, latent_generator=torch.Generator().manual_seed(1), **{**settings, **kwargs})


SETTINGS = {
    "top-k / top-p": {},
    "temperature + min_new_tokens": dict(temperature=0.7, min_new_tokens=6),
    "min_p + min_length": dict(top_k=None, top_p=None, min_p=0.1, min_length=5),
    "greedy + min_new_tokens": dict(do_sample=False, min_new_tokens=8),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_captured_step_gives_transformers_tokens(model, contexts, graph_path, name):
    reference = generate(model, contexts, **SETTINGS[name])  # transformers' loop (CPU, static cache)
    calls = graph_path(generation_dior.decoding_step)
    eager = generate(model, contexts, **SETTINGS[name])
    assert len(calls) >= 1
    assert reference.shape[1] > 2, "the setting must decode more than one token"
    assert torch.equal(eager, reference), (eager, reference)


@pytest.mark.compile
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_compiled_captured_step_gives_transformers_tokens(model, contexts, graph_path, name):
    reference = generate(model, contexts, **SETTINGS[name])
    compiled_step = torch.compile(generation_dior.decoding_step, backend="aot_eager", dynamic=False)
    calls = graph_path(compiled_step)
    compiled = generate(model, contexts, **SETTINGS[name])
    assert len(calls) >= 1
    assert torch.equal(compiled, reference), (compiled, reference)


def test_rows_that_end_are_padded_and_decoding_stops_when_all_have_ended(model, contexts, graph_path):
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.final_logits_bias[0, eos] += 4.0  # EOS likely: rows end at different steps, all before the limit
        try:
            reference = generate(model, contexts, top_k=None, top_p=None)
            graph_path(generation_dior.decoding_step)
            ours = generate(model, contexts, top_k=None, top_p=None)
        finally:
            model.final_logits_bias[0, eos] -= 4.0
    assert reference.shape[1] < NEW_TOKENS + 1, "every row should end before the length limit"
    assert torch.equal(ours, reference), (ours, reference)
    ended_at = (reference[:, 1:] == eos).int().argmax(1)
    assert len(set(ended_at.tolist())) > 1, "rows should end at different steps"
    for row, end in zip(ours, ended_at):
        assert (row[end + 2:] == model.config.pad_token_id).all()


@pytest.mark.compile
def test_one_graph_per_setting_not_per_step(model, contexts, graph_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graph_path(torch.compile(generation_dior.decoding_step, backend="aot_eager", dynamic=False))
    generate(model, contexts)
    generate(model, contexts, seed=4)  # a second call: the same graph
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    generate(model, contexts, do_sample=False)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.parametrize("unsupported", [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2),
                                         dict(return_dict_in_generate=True, output_scores=True)])
def test_what_the_step_cannot_serve_goes_to_transformers_loop(model, contexts, graph_path, unsupported):
    calls = graph_path(generation_dior.decoding_step)
    out = generate(model, contexts, **unsupported)
    assert calls == []
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert sequences.shape[0] == contexts.shape[0]


def test_processor_specs_refuse_unknown_processors():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

    assert generation_dior.processor_specs([TopKLogitsWarper(5)]) == (("top_k", 5, float("-inf")),)
    assert generation_dior.processor_specs([TopKLogitsWarper(5), RepetitionPenaltyLogitsProcessor(1.2)]) is None


def test_padding_the_memory_to_a_bucket_changes_no_token(model, contexts):
    from transformers.modeling_outputs import BaseModelOutput

    ids = contexts
    mask = torch.ones_like(ids)
    with torch.no_grad():
        encoder_outputs, context_vectors = model.encode(ids, mask)
        latents = model.sample_latents(context_vectors, generator=torch.Generator().manual_seed(0))
        memory, padded_mask = generation_dior.pad_memory_to_bucket(
            BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state), mask, 1024)
    assert memory.last_hidden_state.shape[1] == padded_mask.shape[1] == 32
    assert padded_mask[:, ids.shape[1]:].sum() == 0

    def run(states, memory_mask):
        torch.manual_seed(3)
        return model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=memory_mask,
                              latents=latents, do_sample=True, max_new_tokens=NEW_TOKENS)

    assert torch.equal(run(memory.last_hidden_state, padded_mask), run(encoder_outputs.last_hidden_state, mask))


def test_buckets():
    from transformers.modeling_outputs import BaseModelOutput

    for length, bucket in [(5, 32), (32, 32), (33, 64), (96, 128), (200, 256), (700, 1000), (1000, 1000)]:
        memory = BaseModelOutput(last_hidden_state=torch.zeros(1, length, 2))
        padded, mask = generation_dior.pad_memory_to_bucket(memory, torch.ones(1, length), 1000)
        assert padded.last_hidden_state.shape[1] == mask.shape[1] == bucket


def test_the_cpu_default_is_transformers_loop(model, contexts, monkeypatch):
    calls = []
    monkeypatch.setattr(modeling_dior, "decode", lambda *a, **k: calls.append(1))
    torch.manual_seed(0)
    model.generate(contexts, do_sample=True, max_new_tokens=4)
    assert calls == [] and not generation_dior.captures_decoding(model, model.generation_config)


def test_the_captured_step_is_gated_on_cuda(model, monkeypatch):
    from transformers import GenerationConfig

    assert not generation_dior.captures_decoding(model, GenerationConfig())  # a CPU model
    monkeypatch.setattr(DiorCVAEForConditionalGeneration, "device", property(lambda self: torch.device("cuda")))
    assert generation_dior.captures_decoding(model, GenerationConfig())
    assert not generation_dior.captures_decoding(model, GenerationConfig(disable_compile=True))


@pytest.fixture
def transformers_loop_inputs(monkeypatch):
    """Records the cache class and the memory length of every call of transformers' own `_sample`."""
    from transformers import GenerationMixin

    seen, real = [], GenerationMixin._sample

    def spy(self, input_ids, *args, **model_kwargs):
        cache = model_kwargs[modeling_dior.CACHE_NAME]
        seen.append((type(cache.self_attention_cache).__name__, model_kwargs["encoder_outputs"][0].shape[1]))
        return real(self, input_ids, *args, **model_kwargs)

    monkeypatch.setattr(GenerationMixin, "_sample", spy)
    return seen


@pytest.mark.parametrize("opt_out", [dict(repetition_penalty=1.3), dict(return_dict_in_generate=True),
                                     dict(disable_compile=True), dict(cache_implementation="dynamic")])
def test_where_the_step_cannot_serve_transformers_loop_runs_as_transformers_sets_it_up(
        model, contexts, graph_path, transformers_loop_inputs, opt_out):
    """On CUDA (the gate emulated) a call the captured step cannot serve decodes in transformers' loop with
    transformers' default dynamic cache and the memory as encoded (no static cache, no padding: transformers would
    then compile its forward), giving the tokens of the same call on the CPU."""
    def run():
        torch.manual_seed(3)
        out = model.generate(contexts, latent_generator=torch.Generator().manual_seed(1), do_sample=True,
                             max_new_tokens=NEW_TOKENS, **opt_out)
        return out.sequences if hasattr(out, "sequences") else out

    reference = run()
    calls = graph_path(generation_dior.decoding_step)
    ours = run()
    assert calls == []
    assert transformers_loop_inputs == [("DynamicCache", contexts.shape[1])] * 2
    assert torch.equal(ours, reference)


def test_the_global_rng_after_generate_is_transformers_loops(model, contexts, graph_path):
    """The captured loop looks at "every row ended?" only every SYNC_EVERY steps; the draws of the steps it ran past
    the end are undone, so two consecutive calls (with the prior's noise from the global RNG too) and a later
    draw give what they give after transformers' loop."""
    eos = model.config.eos_token_id

    def two_calls_and_a_draw():
        torch.manual_seed(11)
        first = model.generate(contexts, do_sample=True, max_new_tokens=NEW_TOKENS)
        second = model.generate(contexts, do_sample=True, max_new_tokens=NEW_TOKENS)
        return first, second, torch.rand(4)

    with torch.no_grad():
        model.final_logits_bias[0, eos] += 5.0  # every row ends within a few steps: before the first look
        try:
            reference = two_calls_and_a_draw()
            calls = graph_path(generation_dior.decoding_step)
            ours = two_calls_and_a_draw()
        finally:
            model.final_logits_bias[0, eos] -= 5.0
    assert len(calls) == 2
    assert reference[0].shape[1] - 1 < generation_dior.SYNC_EVERY, "rows must end before the loop's first look"
    for reference_part, our_part in zip(reference, ours):
        assert torch.equal(our_part, reference_part), (our_part, reference_part)
