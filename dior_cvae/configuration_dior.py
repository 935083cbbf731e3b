"""Dior-CVAE configuration: a BART configuration plus the latent-variable, prior and memory-dropout fields, each
checked in one place, `DiorCVAEConfig._check_dior_fields`."""

import math

from transformers import BartConfig

from .scheduling_dior import PREDICTION_TYPES, SAMPLERS
from .utils_dior import check_inference_steps, check_nonnegative_number, is_int

# Above this log-SNR (α² ≈ 0.05) the noisiest latent is still mostly data and sampling starts off the distribution.
MAX_TERMINAL_LOG_SNR = -3.0

PRIOR_TYPES = ("diffusion", "gaussian", "standard", "none")


class DiorCVAEConfig(BartConfig):
    r"""
    Configuration of [`DiorCVAEForConditionalGeneration`]. Every BART argument ([`BartConfig`]) is accepted; the
    defaults here are the `facebook/bart-base` shape (6+6 layers, d_model 768), the backbone of the paper.
    docs/design.md gives the reasons behind the defaults and where they depart from the paper or the authors' code.

    Latent variables (paper §3.1–3.2):
        latent_size (`int`, defaults to 32):
            Size of the latent variable of *each* layer; the diffusion prior works on all `encoder_layers` groups
            concatenated (`latent_size * encoder_layers` values).
        self_attention_infusion (`bool`, defaults to `True`):
            Add `Linear_l(z_l)` as one extra key/value position in the self-attention of decoder layer `l` (Eq. 11).
        cross_attention_infusion (`bool`, defaults to `True`):
            Prepend `Linear_l(z_l)` to the cross-attention memory of decoder layer `l` (Eq. 12).

    Memory dropout (paper §3.3):
        memory_dropout (`float`, defaults to 0.7):
            Probability of hiding each encoder-memory token from the decoder's cross-attention during training
            (token-level masking; the latent slot is never hidden).
        memory_dropout_at_inference (`bool`, defaults to `False`):
            Also drop memory tokens in `generate()`: one mask per returned sequence, drawn once. Off by default: a
            decoder that sees a random part of the context at test time answers a different context.

    Prior (paper §3.4):
        prior_type (`str`, defaults to `"diffusion"`):
            `"diffusion"`: conditional latent diffusion prior; `"gaussian"`: learned conditional hierarchical Gaussian
            p(z_l | z_<l, c) (the authors' "w/o diffusion"); `"standard"`: isotropic N(0, I) (the paper's wording);
            `"none"`: no latent at all — no pooling, posterior, prior, infusion or memory dropout, so the model is
            exactly `BartForConditionalGeneration` (the plain seq2seq control of every experiment).
        log_snr_min (`float`, defaults to -10.0), log_snr_max (`float`, defaults to 10.0):
            End points of the diffusion in log signal-to-noise ratio λ = log(α²/σ²) (variance preserving,
            continuous time; see `prior_dior`). At -10 the noisiest latent keeps α² = 4.5e-5 of the data; at 10 the
            cleanest is the data plus noise of std e^-5 ≈ 0.007. The bound depends on the schedule only through these
            end points, so training needs no step count.
        num_inference_steps (`int`, defaults to 20): Denoising steps at sampling time (per call in `generate()`).
        prediction_type (`str`, defaults to `"v_prediction"`):
            What the denoiser predicts: `"v_prediction"` (v = α ε − σ x, zero-initialised output: the prior starts
            as exactly N(0, I) and x̂0 stays bounded at high noise, see `prior_dior`), `"epsilon"` (the authors'
            code) or `"sample"` (x0, the paper's Eq. 5).
        sampler (`str`, defaults to `"dpmsolver++"`):
            `"dpmsolver++"` (DPM-Solver++(2M), second order), `"ddim"` (Alg. 1, with `ddim_eta`) or `"ddpm"`
            (ancestral, the authors' code). See `scheduling_dior`.
        ddim_eta (`float`, defaults to 0.0): Noise scale η of the DDIM update (0 = deterministic, 1 = DDPM).
        cfg_dropout (`float`, defaults to 0.1):
            Classifier-free-guidance condition dropout η: per training example, the context condition of the
            denoiser is replaced by zeros with this probability.
        prior_guidance_scale (`float`, defaults to 0.1):
            Guidance weight w: the sampler uses `(1 + w)·f(z_t, t, c) − w·f(z_t, t, 0)` at every step. `0` disables
            the unconditional pass.
        prior_temperature (`float`, defaults to 1.0):
            Scale τ of the prior's noise at sampling time (per call in `generate()`): the diffusion sampler starts
            from τ·ε (and scales DDPM/DDIM's per-step noise by τ), the Gaussian priors draw μ + τ·σ·ε. `1` samples
            the prior itself (the paper); `τ < 1` draws latents nearer the prior's conditional mode, trading the
            latent's diversity for relevance, as temperature does for tokens (`0`: one latent per context).
        denoiser_hidden_size (`int`, defaults to 512): Width of the denoising network.
        denoiser_layers (`int`, defaults to 2): Residual MLP blocks in the denoising network.

    Loss (paper Eq. 16):
        label_smoothing (`float`, defaults to 0.1): Label smoothing of the reconstruction cross-entropy (paper A).
        kl_free_bits (`float`, defaults to 1.0):
            Free bits (Kingma et al. 2016), in nats per latent dimension: in training the posterior pays no KL
            below `kl_free_bits · encoder_layers · latent_size` nats (batch mean), while the prior is always fit to
            the posterior samples (see `latent_dior.kl_loss`). `0` restores the plain ELBO. Evaluation losses never
            use the floor. The floor sets how much the latent carries, and so trades diversity for relevance.

    Example:

    ```python
    >>> from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration
    >>> config = DiorCVAEConfig(d_model=64, encoder_layers=2, decoder_layers=2, latent_size=8)
    >>> model = DiorCVAEForConditionalGeneration(config)
    ```
    """

    model_type = "dior_cvae"

    # bart-base shape
    vocab_size: int = 50265
    encoder_layers: int | None = 6
    encoder_ffn_dim: int | None = 3072
    encoder_attention_heads: int | None = 12
    decoder_layers: int | None = 6
    decoder_ffn_dim: int | None = 3072
    decoder_attention_heads: int | None = 12
    d_model: int | None = 768
    attention_dropout: float | int | None = 0.1
    activation_dropout: float | int | None = 0.1

    latent_size: int = 32
    self_attention_infusion: bool = True
    cross_attention_infusion: bool = True
    memory_dropout: float = 0.7
    memory_dropout_at_inference: bool = False
    prior_type: str = "diffusion"
    log_snr_min: float = -10.0
    log_snr_max: float = 10.0
    num_inference_steps: int = 20
    prediction_type: str = "v_prediction"
    sampler: str = "dpmsolver++"
    ddim_eta: float = 0.0
    cfg_dropout: float = 0.1
    prior_guidance_scale: float = 0.1
    prior_temperature: float = 1.0
    denoiser_hidden_size: int = 512
    denoiser_layers: int = 2
    label_smoothing: float = 0.1
    kl_free_bits: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_dior_fields()

    def _check_dior_fields(self):
        """A `ValueError` naming the field and its value for every Dior field out of its range, and for the
        combinations the model cannot build."""

        def positive_int(name):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")

        def probability(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}")

        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")

        for name in ("latent_size", "denoiser_hidden_size", "vocab_size", "d_model", "encoder_layers",
                     "encoder_attention_heads", "decoder_attention_heads", "max_position_embeddings"):
            positive_int(name)
        check_inference_steps("num_inference_steps", self.num_inference_steps)
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ValueError(f"`d_model` ({self.d_model}) must be divisible by `{name}` ({getattr(self, name)})")
        if not (is_int(self.denoiser_layers) and self.denoiser_layers >= 0):
            raise ValueError(f"`denoiser_layers` must be an integer >= 0, got {self.denoiser_layers!r}")
        for name in ("memory_dropout", "cfg_dropout", "label_smoothing", "ddim_eta", "dropout", "attention_dropout",
                     "activation_dropout"):
            probability(name)
        free_bits = self.kl_free_bits
        if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)) or not 0 <= free_bits < math.inf:
            raise ValueError(f"`kl_free_bits` must be a finite number >= 0 (nats per latent dimension), got {free_bits!r}")
        one_of("prior_type", PRIOR_TYPES)
        one_of("prediction_type", PREDICTION_TYPES)
        one_of("sampler", SAMPLERS)
        check_nonnegative_number("prior_guidance_scale", self.prior_guidance_scale)
        check_nonnegative_number("prior_temperature", self.prior_temperature)
        for name in ("log_snr_min", "log_snr_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        if not self.log_snr_min < 0 < self.log_snr_max:
            raise ValueError(
                f"`log_snr_min` ({self.log_snr_min}) must be < 0 < `log_snr_max` ({self.log_snr_max}): the diffusion must "
                "run from mostly noise to mostly data"
            )
        if self.log_snr_min > MAX_TERMINAL_LOG_SNR:
            raise ValueError(
                f"`log_snr_min` = {self.log_snr_min} leaves α² = {1 / (1 + math.exp(-self.log_snr_min)):.3g} of the data "
                f"in the noisiest latent (> {MAX_TERMINAL_LOG_SNR}): sampling would start from the wrong distribution"
            )
        if self.encoder_layers != self.decoder_layers:
            raise ValueError(
                f"`encoder_layers` ({self.encoder_layers}) must equal `decoder_layers` ({self.decoder_layers}): "
                "the latent of encoder layer l is infused into decoder layer l"
            )
        if self.prior_type != "none" and not (self.self_attention_infusion or self.cross_attention_infusion):
            raise ValueError(
                "`self_attention_infusion` and `cross_attention_infusion` are both off: the decoder would never see "
                'the latent (for a model without one, use prior_type="none")'
            )
        if self.memory_dropout == 1.0 and not self.cross_attention_infusion and self.prior_type != "none":
            raise ValueError(
                "`memory_dropout` = 1 with `cross_attention_infusion` off would leave the cross-attention nothing "
                "to attend to"
            )

    @property
    def has_latent(self) -> bool:
        """False for `prior_type="none"`: the model is plain BART."""
        return self.prior_type != "none"

    @property
    def total_latent_size(self) -> int:
        """Size of all layers' latents concatenated: the space the diffusion prior works in."""
        return self.latent_size * self.encoder_layers


__all__ = ["DiorCVAEConfig"]
