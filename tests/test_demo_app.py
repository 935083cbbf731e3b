"""The Gradio playground (demo/app.py): its calls on a tiny saved model, and the running app driven in headless
Chromium as a person would (demo/browser.py). CI installs Chromium (.ci/run); elsewhere the browser test is skipped
when Chromium or its driver is absent."""

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_kwargs

from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
from dior_cvae.training.data import train_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "demo"
sys.path.insert(0, str(DEMO))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TURNS = ["Hi , how are you ?", "Fine , thanks . And you ?", "I am good .", "Where is the station ?"]
SETTINGS = dict(prior_temperature=1.0, solver="dpmsolver++", steps=5, do_sample=True, top_p=0.9, temperature=1.0,
                max_new_tokens=12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "model"
    tokenizer = train_tokenizer(TURNS * 10, vocab_size=300)
    torch.manual_seed(0)
    model = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(vocab_size=len(tokenizer))))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def play():
    import app

    return app.Playground()


def test_each_response_has_its_own_latent_and_its_seed_reproduces_it(folder, play):
    model, tokenizer = play.load(folder)
    inputs = play.context(tokenizer, "\n".join(TURNS[:2]))
    latents = torch.cat([play.latent(model, inputs, seed, SETTINGS) for seed in (5, 6, 7, 5)])
    flat = latents.flatten(1)
    assert torch.cdist(flat[:3], flat[:3]).add(torch.eye(3) * 1e9).min() > 1e-3  # three seeds, three draws
    assert torch.equal(latents[0], latents[3])
    rows = play.respond(folder, "\n".join(TURNS[:2]), 3, 5, SETTINGS)
    assert [seed for seed, _ in rows] == [5, 6, 7]
    assert len({text for _, text in rows}) == 3
    assert play.respond(folder, "\n".join(TURNS[:2]), 1, 6, SETTINGS) == [rows[1]]  # a seed shown is reusable
    # the solver setting reaches the prior: DDPM's steps add noise that DPM-Solver++ does not
    ddpm = play.latent(model, inputs, 5, dict(SETTINGS, solver="ddpm"))
    assert (ddpm - latents[0]).abs().max() > 1e-3
    assert torch.equal(play.latent(model, inputs, 5, SETTINGS), latents[:1])
    # τ = 0: the prior's mode, the same latent whatever the seed
    modal = dict(SETTINGS, prior_temperature=0.0)
    assert torch.equal(play.latent(model, inputs, 1, modal), play.latent(model, inputs, 2, modal))


def test_same_latent_in_another_context_and_interpolation(folder, play):
    here, there = "\n".join(TURNS[:2]), TURNS[3]
    (_, mine), (_, other) = play.transplant(folder, here, there, 6, SETTINGS)
    assert mine == play.respond(folder, here, 1, 6, SETTINGS)[0][1]  # the seed's own response, and one elsewhere
    greedy = dict(SETTINGS, do_sample=False)
    rows = play.interpolate(folder, here, 5, 7, 4, greedy)
    assert [t for t, _ in rows] == ["0.00", "0.33", "0.67", "1.00"]
    assert rows[0][1] == play.respond(folder, here, 1, 5, greedy)[0][1]
    assert rows[-1][1] == play.respond(folder, here, 1, 7, greedy)[0][1]


def test_the_app_in_a_headless_browser(folder, tmp_path):
    import browser

    chromium, driver_path = browser.chromium_paths()
    if not (chromium and driver_path):
        missing = "chromium" if not chromium else "chromedriver"
        if IN_CI:
            pytest.fail(f"{missing} is not installed; .ci/run installs Debian's chromium and chromium-driver")
        pytest.skip(f"{missing} is not installed (apt-get install chromium chromium-driver); CI runs this test")
    port = browser.free_port()
    app = browser.start_app(folder, port, tmp_path / "app.log")
    driver = None
    try:
        driver = browser.open_browser()
        url = f"http://127.0.0.1:{port}/"
        cards = browser.ask(driver, url, TURNS[:2], k=3)
        assert len(cards) == 3
        seeds = [int(card["label"]) for card in cards]
        assert seeds == list(range(seeds[0], seeds[0] + 3)) and seeds[0] > 0  # a random first seed
        assert len({card["text"] for card in cards}) == 3, cards  # three prior draws, three responses
        again = browser.ask(driver, url, TURNS[:2], k=1, seed=seeds[1])  # reuse a shown seed
        assert again == [cards[1]]
    finally:
        if driver is not None:
            driver.quit()
        app.terminate()
        app.wait(30)
