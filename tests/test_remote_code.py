"""save_pretrained → a folder that loads with trust_remote_code=True where `dior_cvae` is not importable."""

import json
import os
import subprocess
import sys
import textwrap

import torch

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
    scheduler = model.diffusion_prior.scheduler
    json.dump({"tokens": tokens.tolist(), "alphas_cumprod": scheduler.alphas_cumprod.tolist(),
               "model_type": config.model_type,
               "final_logits_bias": model.final_logits_bias.abs().max().item()}, open(out, "w"))
    """
)


def test_save_and_load_as_remote_code_in_a_fresh_process(tiny_model, tmp_path):
    model = tiny_model(num_inference_steps=7).eval()
    folder = tmp_path / "dior"
    model.save_pretrained(folder)
    files = set(os.listdir(folder))
    code_files = {"configuration_dior.py", "modeling_dior.py", "dior_latent.py", "dior_prior.py", "scheduling_dior.py"}
    assert code_files | {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert {f for f in files if not f.endswith((".py", ".json"))} == {"model.safetensors", "README.md"}  # + the card
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM"}

    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_GENERATE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    # -I: isolated mode, and run from / so neither the repo nor an editable install of it is on sys.path
    site_hidden = tmp_path / "site_hidden.py"
    site_hidden.write_text(
        "import sys\nsys.meta_path.insert(0, type('Block', (), {'find_spec': staticmethod("
        "lambda name, path=None, target=None: (_ for _ in ()).throw(ImportError(name)) "
        "if name == 'dior_cvae' or name.startswith('dior_cvae.') else None)})())\n"
        f"exec(open({str(script)!r}).read())\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", str(site_hidden), str(folder), str(tmp_path / "out.json")],
        cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads((tmp_path / "out.json").read_text())

    input_ids = torch.tensor([[0, 5, 6, 7, 8, 2], [0, 9, 10, 2, 1, 1]])
    torch.manual_seed(123)
    expected = model.generate(
        input_ids, do_sample=True, num_return_sequences=2, max_new_tokens=6,
        latent_generator=torch.Generator().manual_seed(7),
    )
    assert loaded["tokens"] == expected.tolist()
    assert loaded["model_type"] == "dior_cvae"
    assert loaded["final_logits_bias"] == 0.0
    torch.testing.assert_close(
        torch.tensor(loaded["alphas_cumprod"], dtype=torch.float64), model.diffusion_prior.scheduler.alphas_cumprod
    )
