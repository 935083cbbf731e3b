"""The model card of examples/train.py's no-argument demo says it is a smoke test: a banner, and no model-index
results, which the Hub would show as the model's scores."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_config_kwargs

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def card_info():
    return {
        "results": {"loss": 80.1, "bleu1": 12.3, "bleu2": 4.5, "distinct1": 3.0, "distinct2": 20.0},
        "results_split": "test", "splits": {"train": [{}] * 10, "test": [{}] * 5},
        "meta": {"dataset_name": "DailyDialog (sample)", "hub_dataset": None, "skipped_lines": 0},
        "data_description": "A sample", "samples": [], "samples_split": "validation", "total_batch_size": 32,
        "completed_steps": 57, "epochs": 0.61, "turn_separator": "</s>", "training_time_s": 240.0,
    }


def write_card(train, args, folder):
    model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs()))
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), mixed_precision="no")
    train.write_model_card(args, folder, model, accelerator, card_info())


def card_parts(folder: Path):
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1]), text


def test_the_demo_card_says_smoke_test_and_reports_no_results(train, tmp_path):
    args = train.parse_args(train.DEFAULT_ARGS)  # the no-argument demo's own arguments
    assert args.smoke_test
    write_card(train, args, tmp_path)
    meta, text = card_parts(tmp_path)
    assert "model-index" not in meta
    assert "Smoke test, not a usable model" in text and "57 updates, 0.61 epochs" in text
    assert "they are not results" in text


def test_a_real_run_card_keeps_its_results(train, tmp_path):
    args = train.parse_args([a for a in train.DEFAULT_ARGS if a != "--smoke_test"])
    write_card(train, args, tmp_path)
    meta, text = card_parts(tmp_path)
    (index,) = meta["model-index"]
    assert {m["value"] for m in index["results"][0]["metrics"]} >= {12.3, 4.5}
    assert "Smoke test" not in text
