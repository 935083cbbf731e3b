"""Dior-CVAE playground: a Gradio app that shows what the latent does.

Type a conversation; k responses appear side by side, each decoded from its own draw of the prior p(z | context)
with its latent seed shown. A seed reproduces its response exactly (the latent draw and the token sampling both
follow it), so a seed can be reused: the same latent under other settings, in another context, or as an end of an
interpolation between two latents.

Runs on the CPU. Locally, from the repository (`pip install -e ".[demo]"`):

    python demo/app.py --model outputs/dior-cvae-dailydialog-sample     # a model folder or a Hub id

As a Hugging Face Space: this folder is the Space (README.md holds the Space's metadata, requirements.txt its
packages); set the Space variable DIOR_MODEL to a Hub model id. The model's own code comes with its weights
(`trust_remote_code=True`), so the app needs neither this repository nor the `dior_cvae` package.
"""

from __future__ import annotations

import argparse
import html
import os
import random
import threading

import gradio as gr
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

DEFAULT_MODEL = os.environ.get("DIOR_MODEL", "outputs/dior-cvae-dailydialog-sample")
MAX_RESPONSES = 8
SOLVERS = ("dpmsolver++", "ddim", "ddpm")  # DiorCVAEConfig.sampler's choices
EXAMPLE = "Hi , how are you doing today ?\nNot bad . I just got back from the gym ."


class Playground:
    """Loaded models (by name) and the calls the app makes; one call at a time, since a call sets the prior's solver
    on the shared model and seeds torch's global generator for token sampling."""

    def __init__(self):
        self.models: dict[str, tuple] = {}
        self.lock = threading.Lock()

    def load(self, name: str):
        name = (name or "").strip()
        if not name:
            raise gr.Error("Give a model: a folder written by save_pretrained, or a Hub id.")
        if name not in self.models:
            try:
                tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=True)
                model = AutoModelForSeq2SeqLM.from_pretrained(name, trust_remote_code=True).eval()
            except (OSError, ValueError) as error:
                raise gr.Error(f"Could not load {name!r}: {error}") from error
            if not getattr(model.config, "has_latent", False):
                raise gr.Error(f"{name!r} has no latent (prior_type={model.config.prior_type!r}): nothing to show here.")
            self.models[name] = (model, tokenizer)
        return self.models[name]

    def describe(self, name: str) -> str:
        model, tokenizer = self.load(name)
        c = model.config
        params = sum(p.numel() for p in model.parameters()) / 1e6
        return (f"**{html.escape(name.strip())}**: {params:.1f}M parameters, `{c.prior_type}` prior, "
                f"{c.encoder_layers} latent layers × {c.latent_size} dimensions, vocabulary {len(tokenizer)}.")

    @staticmethod
    def context(tokenizer, conversation: str):
        """One turn per line, oldest first, joined with the eos token as in training."""
        turns = [line.strip() for line in (conversation or "").splitlines() if line.strip()]
        if not turns:
            raise gr.Error("Type a conversation: one turn per line, oldest first.")
        return tokenizer(tokenizer.eos_token.join(turns), return_tensors="pt", truncation=True)

    @staticmethod
    def latent(model, inputs, seed: int, settings: dict) -> torch.Tensor:
        """z ~ p(z | context) drawn with `seed`: (1, layers, latent_size)."""
        with torch.no_grad():
            _, context_vectors = model.encode(inputs["input_ids"], inputs["attention_mask"])
        model.config.sampler = settings["solver"]
        return model.sample_latents(context_vectors, num_inference_steps=settings["steps"],
                                    generator=torch.Generator().manual_seed(seed),
                                    prior_temperature=settings["prior_temperature"])

    @staticmethod
    def decode(model, tokenizer, inputs, latent, seed: int, settings: dict) -> str:
        torch.manual_seed(seed)  # token sampling follows torch's global generator
        sampling = dict(do_sample=True, top_p=settings["top_p"], temperature=settings["temperature"], top_k=0) \
            if settings["do_sample"] else dict(do_sample=False)
        out = model.generate(**inputs, latents=latent, max_new_tokens=settings["max_new_tokens"], **sampling)
        return tokenizer.decode(out[0], skip_special_tokens=True).strip()

    def respond(self, name, conversation, count, seed, settings) -> list[tuple[int, str]]:
        model, tokenizer = self.load(name)
        inputs = self.context(tokenizer, conversation)
        with self.lock:
            return [(s, self.decode(model, tokenizer, inputs, self.latent(model, inputs, s, settings), s, settings))
                    for s in range(seed, seed + count)]

    def transplant(self, name, conversation, other, seed, settings) -> list[tuple[str, str]]:
        """The latent drawn with `seed` for `conversation`, decoded there and in `other`."""
        model, tokenizer = self.load(name)
        here, there = self.context(tokenizer, conversation), self.context(tokenizer, other)
        with self.lock:
            z = self.latent(model, here, seed, settings)
            return [("this conversation", self.decode(model, tokenizer, here, z, seed, settings)),
                    ("the other conversation", self.decode(model, tokenizer, there, z, seed, settings))]

    def interpolate(self, name, conversation, seed_a, seed_b, points, settings) -> list[tuple[str, str]]:
        """Responses along the straight line between the latents of `seed_a` and `seed_b` (same context; the tokens
        sampled with `seed_a` throughout, so only the latent changes)."""
        model, tokenizer = self.load(name)
        inputs = self.context(tokenizer, conversation)
        with self.lock:
            a, b = self.latent(model, inputs, seed_a, settings), self.latent(model, inputs, seed_b, settings)
            rows = []
            for t in torch.linspace(0, 1, points).tolist():
                rows.append((f"{t:.2f}", self.decode(model, tokenizer, inputs, (1 - t) * a + t * b, seed_a, settings)))
            return rows


def cards(rows, label) -> str:
    """Responses side by side, each with its label (seed or position) above."""
    items = "".join(
        f'<div class="dior-response" data-label="{html.escape(str(key))}" style="border:1px solid #ccc;'
        f'border-radius:8px;padding:8px;min-width:0">'
        f'<div class="dior-label" style="font-size:0.8em;opacity:0.7">{label} {html.escape(str(key))}</div>'
        f'<div class="dior-text">{html.escape(text) if text else "<i>(empty)</i>"}</div></div>'
        for key, text in rows)
    return ('<div class="dior-responses" style="display:grid;grid-template-columns:repeat(auto-fit,'
            f'minmax(160px,1fr));gap:8px">{items}</div>')


def build_app(default_model: str = DEFAULT_MODEL, playground: Playground | None = None) -> gr.Blocks:
    play = playground or Playground()
    with gr.Blocks(title="Dior-CVAE playground") as app:
        gr.Markdown("# Dior-CVAE playground\nEach response is decoded from its own draw of the latent prior "
                    "p(z | context). Response *i* uses latent seed *seed + i*; a seed gives the same response again "
                    "(put it in **Latent seed** with 1 response), and the tabs below reuse it.")
        with gr.Row():
            model_name = gr.Textbox(default_model, label="Model (folder or Hub id)", elem_id="model", scale=4)
            load = gr.Button("Load", elem_id="load", scale=1)
        status = gr.Markdown(elem_id="status")
        conversation = gr.Textbox(EXAMPLE, lines=4, label="Conversation (one turn per line, oldest first)",
                                  elem_id="conversation")
        with gr.Row():
            count = gr.Slider(1, MAX_RESPONSES, value=4, step=1, label="Responses (k prior draws)", elem_id="count")
            seed = gr.Number(-1, precision=0, minimum=-1, label="Latent seed (-1: a random one)", elem_id="seed")
        with gr.Accordion("Prior and decoding", open=False):
            with gr.Row():
                prior_temperature = gr.Slider(0, 1.5, value=1.0, step=0.05, label="Prior temperature τ "
                                              "(0: the prior's mode, one latent per context)", elem_id="tau")
                solver = gr.Dropdown(list(SOLVERS), value=SOLVERS[0], label="Prior solver", elem_id="solver")
                steps = gr.Slider(1, 50, value=20, step=1, label="Solver steps", elem_id="steps")
            with gr.Row():
                do_sample = gr.Checkbox(True, label="Sample tokens (off: greedy given the latent)",
                                        elem_id="do-sample")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Token top-p", elem_id="top-p")
                temperature = gr.Slider(0.1, 2.0, value=1.0, step=0.05, label="Token temperature",
                                        elem_id="temperature")
                max_new_tokens = gr.Slider(4, 60, value=30, step=1, label="Max new tokens", elem_id="max-new-tokens")
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        responses = gr.HTML(elem_id="responses")
        used_seed = gr.Markdown(elem_id="used-seed")
        with gr.Tab("Same latent, another context"):
            gr.Markdown("The latent drawn with a seed for the conversation above, decoded there and in another "
                        "conversation: what stays is what the latent carries.")
            with gr.Row():
                other = gr.Textbox("Can you help me find the station ?", lines=3, label="Other conversation",
                                   elem_id="other", scale=3)
                transplant_seed = gr.Number(0, precision=0, label="Latent seed", elem_id="transplant-seed")
            transplant = gr.Button("Decode in both", elem_id="transplant")
            transplanted = gr.HTML(elem_id="transplanted")
        with gr.Tab("Interpolate two latents"):
            gr.Markdown("Responses along the line between the latents of two seeds, for the conversation above "
                        "(tokens sampled with the first seed throughout: only the latent moves).")
            with gr.Row():
                seed_a = gr.Number(0, precision=0, label="From seed", elem_id="seed-a")
                seed_b = gr.Number(1, precision=0, label="To seed", elem_id="seed-b")
                points = gr.Slider(2, 8, value=5, step=1, label="Points", elem_id="points")
            interpolate = gr.Button("Interpolate", elem_id="interpolate")
            interpolated = gr.HTML(elem_id="interpolated")

        settings_inputs = [prior_temperature, solver, steps, do_sample, top_p, temperature, max_new_tokens]

        def settings(tau, solver_name, n_steps, sample, p, temp, max_new):
            return dict(prior_temperature=float(tau), solver=solver_name, steps=int(n_steps), do_sample=bool(sample),
                        top_p=float(p), temperature=float(temp), max_new_tokens=int(max_new))

        def on_generate(name, text, k, base_seed, *values):
            base = random.randrange(2**31) if base_seed is None or base_seed < 0 else int(base_seed)
            rows = play.respond(name, text, int(k), base, settings(*values))
            return cards(rows, "latent seed"), f"Seeds {base} … {base + int(k) - 1}", play.describe(name)

        def on_transplant(name, text, other_text, s, *values):
            return cards(play.transplant(name, text, other_text, int(s or 0), settings(*values)), "in")

        def on_interpolate(name, text, a, b, n, *values):
            return cards(play.interpolate(name, text, int(a or 0), int(b or 0), int(n), settings(*values)), "t =")

        load.click(play.describe, model_name, status)
        generate.click(on_generate, [model_name, conversation, count, seed, *settings_inputs],
                       [responses, used_seed, status])
        transplant.click(on_transplant, [model_name, conversation, other, transplant_seed, *settings_inputs],
                         transplanted)
        interpolate.click(on_interpolate, [model_name, conversation, seed_a, seed_b, points, *settings_inputs],
                          interpolated)
    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder or Hub id (default: $DIOR_MODEL or the "
                                                               "demo model's folder)")
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    args = parser.parse_args(argv)
    # local fonts only: the browser of a test, or of a user behind a firewall, may have no internet
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["monospace"])
    build_app(args.model).launch(server_name=args.host, server_port=args.port, theme=theme)


if __name__ == "__main__":
    main()
