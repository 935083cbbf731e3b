import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tripwire: no test may reach the Hub
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the tests' subprocesses share 2 cores; spinning threads thrash

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_config_kwargs(**overrides):
    kwargs = dict(
        vocab_size=96,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        latent_size=8,
        denoiser_hidden_size=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_model():
    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

    def build(**overrides):
        torch.manual_seed(0)
        return DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs(**overrides)))

    return build
