"""What a new user meets first: weight files others can read, `accelerate launch` without its defaults warning,
and a single example's loss that can be negative (a one-sample estimate of the diffusion KL)."""

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_saved_weights_get_the_umask_permissions_of_any_new_file(tiny_model, tmp_path):
    old = os.umask(0o022)
    try:
        model = tiny_model()
        model.save_pretrained(tmp_path / "one")
        model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    finally:
        os.umask(old)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    for path in [tmp_path / "one" / "model.safetensors", *shards]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, (path.name, oct(path.stat().st_mode))
    assert stat.S_IMODE((tmp_path / "one" / "config.json").stat().st_mode) == 0o644


def test_accelerate_launch_with_the_shipped_config_prints_no_defaults_warning(tmp_path):
    """README's commands pass `--config_file accelerate_config.yaml`; with it (and no user config in HF_HOME)
    accelerate fills nothing with defaults."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is not installed beside this Python"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([accelerate, "launch", "--config_file", "accelerate_config.yaml", "examples/train.py",
                             "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage: train.py" in result.stdout
    assert "defaults used instead" not in result.stderr, result.stderr[-3000:]
    # every accelerate launch of the README (train.py) names the shipped config
    readme = (REPO / "README.md").read_text()
    launches = re.findall(r"accelerate launch[^\n`]*", readme)
    assert launches and all("--config_file accelerate_config.yaml" in line for line in launches), launches


def test_one_example_kl_is_a_one_sample_estimate_that_can_be_negative(tiny_model):
    """`DiorCVAEOutput.kl_loss` documents it: one example's diffusion KL (posterior sample, noise level, noise) can be
    negative (its expectation, the KL, is ≥ 0; one example's draws spread far wider than that mean)."""
    model = tiny_model().eval()
    input_ids, labels = torch.tensor([[0, 5, 6, 7, 8, 2]]), torch.tensor([[0, 9, 10, 11, 2]])
    draws = []
    with torch.no_grad():
        for seed in range(50):
            torch.manual_seed(seed)
            draws.append(float(model(input_ids=input_ids, labels=labels).kl_loss))
    draws = torch.tensor(draws, dtype=torch.float64)
    assert (draws < 0).any() and (draws > 0).any()
    assert "can be negative" in type(model(input_ids=input_ids, labels=labels)).__doc__
