import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tripwire: no test may reach the Hub
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the tests' subprocesses share 2 cores; spinning threads thrash

import pytest  # noqa: E402
import torch  # noqa: E402

# The timeout of every subprocess a test starts: a guard against a hung child, not a speed check (a busy shared
# machine can take many times the usual minute; no test may fail for being slow).
SUBPROCESS_HANG_S = 3600


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


class ForwardDenoiser(torch.nn.Module):
    """Base of the tests' hand-written denoisers (`forward(noisy, log_snr, condition)` only): the sampling loop's
    `sampling_predictor` from plain forward calls, (1 + w)·f(z, λ, c) − w·f(z, λ, 0) at every step."""

    def sampling_predictor(self, log_snrs, condition, guidance):
        def predict(step_index, noisy):
            log_snr = log_snrs[step_index].expand(len(noisy))
            conditional = self(noisy, log_snr, condition)
            if guidance == 0:
                return conditional
            return (1 + guidance) * conditional - guidance * self(noisy, log_snr, torch.zeros_like(condition))

        return predict
