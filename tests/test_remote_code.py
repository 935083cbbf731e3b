"""save_pretrained → a folder that loads with trust_remote_code=True where `dior_cvae` is not importable."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import SUBPROCESS_HANG_S

LOAD_AND_GENERATE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM
    try:
        import dior_cvae
        raise SystemExit("dior_cvae must not be importable here")
    except ImportError:
        pass
    folder, out = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "DiorCVAEForConditionalGeneration"
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    input_ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    torch.manual_seed(123)
    tokens = model.generate(input_ids, do_sample=True, num_return_sequences=2, max_new_tokens=6,
                            latent_generator=torch.Generator().manual_seed(7))
    latents = model.sample_latents(torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(3)),
                                   generator=torch.Generator().manual_seed(4))
    json.dump({"tokens": tokens.tolist(), "latents": latents.tolist(),
               "model_type": config.model_type,
               "final_logits_bias": model.final_logits_bias.abs().max().item()}, open(out, "w"))
    """
)


SAVE = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[1])  # the repository (this script runs with -I)
    sys.path.insert(0, sys.argv[1] + "/tests")
    from conftest import tiny_config_kwargs
    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
    torch.manual_seed(0)
    DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(num_inference_steps=7))).save_pretrained(sys.argv[2])
    """
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_isolated(python, script_text, args, tmp_path, hide_package=True):
    """Run a script in a fresh `python -I` process from /, with `dior_cvae` not importable (unless it adds it)."""
    script = tmp_path / f"script_{abs(hash(script_text))}.py"
    script.write_text(script_text)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    runner = script
    if hide_package:
        runner = tmp_path / "site_hidden.py"
        runner.write_text(
            "import sys\nsys.meta_path.insert(0, type('Block', (), {'find_spec': staticmethod("
            "lambda name, path=None, target=None: (_ for _ in ()).throw(ImportError(name)) "
            "if name == 'dior_cvae' or name.startswith('dior_cvae.') else None)})())\n"
            f"sys.argv = [{str(script)!r}] + sys.argv[1:]\nexec(open({str(script)!r}).read())\n"
        )
    result = subprocess.run([python, "-I", str(runner), *map(str, args)], cwd="/", env=env, capture_output=True,
                            text=True, timeout=SUBPROCESS_HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]


def expected_outputs(model):
    input_ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    torch.manual_seed(123)
    tokens = model.generate(
        input_ids, do_sample=True, num_return_sequences=2, max_new_tokens=6,
        latent_generator=torch.Generator().manual_seed(7),
    )
    latents = model.sample_latents(torch.randn(2, 2, 32, generator=torch.Generator().manual_seed(3)),
                                   generator=torch.Generator().manual_seed(4))
    return tokens.tolist(), latents


def test_save_and_load_as_remote_code_in_a_fresh_process(tiny_model, tmp_path):
    model = tiny_model(num_inference_steps=7).eval()
    folder = tmp_path / "dior"
    model.save_pretrained(folder)
    files = set(os.listdir(folder))
    code_files = {"configuration_dior.py", "modeling_dior.py", "attention_dior.py", "latent_dior.py", "prior_dior.py",
                  "scheduling_dior.py", "generation_dior.py", "hub_dior.py", "pipeline_dior.py", "utils_dior.py"}
    assert {f for f in files if f.endswith(".py")} == code_files  # every shipped module, and nothing else
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert {f for f in files if not f.endswith((".py", ".json"))} == {"model.safetensors", "README.md"}  # + the card
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM"}

    run_isolated(sys.executable, LOAD_AND_GENERATE, [folder, tmp_path / "out.json"], tmp_path)
    loaded = json.loads((tmp_path / "out.json").read_text())
    tokens, latents = expected_outputs(model)
    assert loaded["tokens"] == tokens
    assert loaded["model_type"] == "dior_cvae"
    assert loaded["final_logits_bias"] == 0.0
    torch.testing.assert_close(torch.tensor(loaded["latents"]), latents)


OTHER_PYTHON = os.environ.get("DIOR_OTHER_PYTHON")


@pytest.mark.skipif(not OTHER_PYTHON, reason="set DIOR_OTHER_PYTHON to a Python with another transformers (CI does)")
def test_a_folder_saved_under_one_transformers_generates_the_same_under_the_other(tiny_model, tmp_path):
    """Both directions: saved here → loaded there, and saved there → loaded here (both must give these tokens)."""
    model = tiny_model(num_inference_steps=7).eval()
    tokens, latents = expected_outputs(model)
    versions = {}
    for python in (sys.executable, OTHER_PYTHON):
        versions[python] = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                                          capture_output=True, text=True).stdout.strip()
    assert versions[sys.executable] != versions[OTHER_PYTHON], versions
    for saver, loader in ((sys.executable, OTHER_PYTHON), (OTHER_PYTHON, sys.executable)):
        folder = tmp_path / f"saved_by_{versions[saver]}"
        run_isolated(saver, SAVE, [ROOT, folder], tmp_path, hide_package=False)
        assert json.loads((folder / "config.json").read_text())["transformers_version"] == versions[saver]
        out = tmp_path / f"loaded_by_{versions[loader]}.json"
        run_isolated(loader, LOAD_AND_GENERATE, [folder, out], tmp_path)
        loaded = json.loads(out.read_text())
        assert loaded["tokens"] == tokens, (versions[saver], versions[loader])
        torch.testing.assert_close(torch.tensor(loaded["latents"]), latents)


NEWER_TRANSFORMERS = textwrap.dedent(
    """
    import sys, warnings
    import transformers
    import transformers.models.bart.modeling_bart  # (importing a submodule resets the lazy module's attributes)
    transformers.__version__ = "9.0.0"  # a release above the tested range
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        exec(open(sys.argv[3]).read())
    messages = [str(w.message) for w in caught if "Dior-CVAE is tested with" in str(w.message)]
    assert len(messages) == 1, messages
    assert "transformers 9.0.0. Continuing" in messages[0], messages
    """
)


def test_a_saved_folder_loads_above_the_tested_range_with_one_warning(tiny_model, tmp_path):
    model = tiny_model(num_inference_steps=7).eval()
    folder = tmp_path / "dior"
    model.save_pretrained(folder)
    load = tmp_path / "load_and_generate.py"
    load.write_text(LOAD_AND_GENERATE.replace("folder, out = sys.argv[1], sys.argv[2]",
                                              "folder, out = sys.argv[1], sys.argv[2]  # noqa"))
    run_isolated(sys.executable, NEWER_TRANSFORMERS, [folder, tmp_path / "out.json", load], tmp_path)
    loaded = json.loads((tmp_path / "out.json").read_text())
    assert loaded["tokens"] == expected_outputs(model)[0]
