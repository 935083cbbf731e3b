"""Dior-CVAE configuration: a BART configuration plus the latent-variable, prior and memory-dropout fields."""

from transformers import BartConfig

from .scheduling_dior import BETA_SCHEDULES, make_betas

# Above this, the last diffusion step is barely noise and sampling starts far from the training distribution.
MAX_TERMINAL_ALPHA_CUMPROD = 0.1

PRIOR_TYPES = ("diffusion", "gaussian", "standard")
PREDICTION_TYPES = ("epsilon", "sample")
SAMPLERS = ("ddpm", "ddim")


class DiorCVAEConfig(BartConfig):
    r"""
    Configuration of [`DiorCVAEForConditionalGeneration`]. Every BART argument ([`BartConfig`]) is accepted; the
    defaults here are the `facebook/bart-base` shape (6+6 layers, d_model 768), the backbone of the paper.

    Latent variables (paper §3.1–3.2):
        latent_size (`int`, defaults to 32):
            Size of the latent variable of *each* layer; the diffusion prior works on all `encoder_layers` groups
            concatenated (`latent_size * encoder_layers` values). 32 is the authors' code default; the paper's
            "latent size 64" cannot be resolved to per-layer or total from the authors' repository.
        self_attention_infusion (`bool`, defaults to `True`):
            Add `Linear_l(z_l)` as one extra key/value position in the self-attention of decoder layer `l` (Eq. 11).
        cross_attention_infusion (`bool`, defaults to `True`):
            Prepend `Linear_l(z_l)` to the cross-attention memory of decoder layer `l` (Eq. 12).

    Memory dropout (paper §3.3):
        memory_dropout (`float`, defaults to 0.7):
            Probability of hiding each encoder-memory token from the decoder's cross-attention during training
            (token-level masking; the latent slot is never hidden). 0.7 is the paper's value; the authors' code
            draws `randn < 0.5`, which drops only ≈31%.
        memory_dropout_at_inference (`bool`, defaults to `False`):
            Also drop memory tokens in `generate()`: one mask per returned sequence, drawn once. The authors' code
            never switches it off and redraws it at every decoding step; we default to off because a decoder that
            sees a random 30% of the context at test time answers a different context.

    Prior (paper §3.4):
        prior_type (`str`, defaults to `"diffusion"`):
            `"diffusion"`: conditional latent diffusion prior; `"gaussian"`: learned conditional hierarchical Gaussian
            p(z_l | z_<l, c) (the authors' "w/o diffusion"); `"standard"`: isotropic N(0, I) (the paper's wording).
        num_train_timesteps (`int`, defaults to 50): Diffusion steps T used in training (paper and code: 50).
        num_inference_steps (`int`, defaults to 50): Denoising steps at sampling time (≤ `num_train_timesteps`;
            can be lowered per call in `generate()`).
        beta_schedule (`str`, defaults to `"linear"`): `"linear"`, `"scaled_linear"` or `"squaredcos_cap_v2"`.
        beta_start (`float`, defaults to 0.002), beta_end (`float`, defaults to 0.4):
            Linear-schedule endpoints. These are the authors' effective values (1e-4·1000/T … 0.02·1000/T for
            T = 50), giving ᾱ_T ≈ 8e-6. The paper's stated 5e-6 … 1e-3 leaves ᾱ_T ≈ 0.97, i.e. the "noise" end is
            still the data; schedules with ᾱ_T > 0.1 are rejected.
        prediction_type (`str`, defaults to `"epsilon"`):
            What the denoiser predicts: `"epsilon"` (the authors' code) or `"sample"` (x0, the paper's Eq. 5).
        sampler (`str`, defaults to `"ddpm"`): `"ddpm"` (ancestral, the authors' code) or `"ddim"` (Alg. 1).
        ddim_eta (`float`, defaults to 0.0): Noise scale σ of the DDIM update (0 = deterministic).
        prior_loss_weighting (`str`, defaults to `"vlb"`):
            Weight of the denoiser's squared error in the KL term. `"vlb"`: DDPM's variational-bound weights, so
            that E[log q(z)] + this term estimates KL(q ‖ p) and cannot go below zero on average. `"simple"`: unit
            weight as in the authors' code — not a bound: the E[log q(z)] term then keeps widening the posterior
            (we saw the KL term reach −577 within 300 updates, posterior σ at its clamp), drowning the latent in
            noise.
        clip_sample (`bool`, defaults to `False`):
            Clamp the predicted x0 to [-1, 1] at every sampling step. The authors do; posterior samples are not
            bounded, so clipping shifts prior samples away from what the decoder was trained on.
        cfg_dropout (`float`, defaults to 0.1):
            Classifier-free-guidance condition dropout η: per training example, the context condition of the
            denoiser is replaced by zeros with this probability (the authors drop it for the whole batch at once).
        prior_guidance_scale (`float`, defaults to 0.1):
            Guidance weight w: the sampler uses `(1 + w)·f(z_t, t, c) − w·f(z_t, t, 0)` at every step (the authors'
            code applies it only at the first step by accident). `0` disables the unconditional pass.
        denoiser_hidden_size (`int`, defaults to 512): Width of the denoising network.
        denoiser_layers (`int`, defaults to 2): Residual MLP blocks in the denoising network.

    Loss (paper Eq. 16):
        label_smoothing (`float`, defaults to 0.1): Label smoothing of the reconstruction cross-entropy (paper A).

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
    num_train_timesteps: int = 50
    num_inference_steps: int = 50
    beta_schedule: str = "linear"
    beta_start: float = 0.002
    beta_end: float = 0.4
    prediction_type: str = "epsilon"
    prior_loss_weighting: str = "vlb"
    sampler: str = "ddpm"
    ddim_eta: float = 0.0
    clip_sample: bool = False
    cfg_dropout: float = 0.1
    prior_guidance_scale: float = 0.1
    denoiser_hidden_size: int = 512
    denoiser_layers: int = 2
    label_smoothing: float = 0.1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_dior_fields()

    def _check_dior_fields(self):
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")

        def probability(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be a probability in [0, 1], got {value!r}")

        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")

        for name in ("latent_size", "num_train_timesteps", "num_inference_steps", "denoiser_hidden_size"):
            positive_int(name)
        if isinstance(self.denoiser_layers, bool) or not isinstance(self.denoiser_layers, int) or self.denoiser_layers < 0:
            raise ValueError(f"`denoiser_layers` must be an integer >= 0, got {self.denoiser_layers!r}")
        for name in ("memory_dropout", "cfg_dropout", "label_smoothing", "ddim_eta"):
            probability(name)
        one_of("prior_type", PRIOR_TYPES)
        one_of("prediction_type", PREDICTION_TYPES)
        one_of("prior_loss_weighting", ("vlb", "simple"))
        one_of("sampler", SAMPLERS)
        one_of("beta_schedule", BETA_SCHEDULES)
        if not isinstance(self.prior_guidance_scale, (int, float)) or self.prior_guidance_scale < 0:
            raise ValueError(f"`prior_guidance_scale` must be a number >= 0, got {self.prior_guidance_scale!r}")
        if self.num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` ({self.num_inference_steps}) must be <= `num_train_timesteps` "
                f"({self.num_train_timesteps})"
            )
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"`beta_start`/`beta_end` must satisfy 0 < beta_start <= beta_end < 1, got "
                f"{self.beta_start!r} / {self.beta_end!r}"
            )
        terminal = float((1.0 - make_betas(self)).prod())
        if terminal > MAX_TERMINAL_ALPHA_CUMPROD:
            raise ValueError(
                f"`beta_schedule`/`beta_start`/`beta_end`/`num_train_timesteps` leave alpha_cumprod at the last step "
                f"= {terminal:.3g} > {MAX_TERMINAL_ALPHA_CUMPROD}: the most-noised latent is still mostly data, so "
                "sampling would start from the wrong distribution. Raise `beta_end` or `num_train_timesteps`."
            )
        if self.encoder_layers != self.decoder_layers:
            raise ValueError(
                f"`encoder_layers` ({self.encoder_layers}) must equal `decoder_layers` ({self.decoder_layers}): "
                "the latent of encoder layer l is infused into decoder layer l"
            )
        if self.memory_dropout == 1.0 and not self.cross_attention_infusion:
            raise ValueError(
                "`memory_dropout` = 1 with `cross_attention_infusion` off would leave the cross-attention nothing "
                "to attend to"
            )

    @property
    def total_latent_size(self) -> int:
        """Size of all layers' latents concatenated: the space the diffusion prior works in."""
        return self.latent_size * self.encoder_layers


__all__ = ["DiorCVAEConfig"]
