"""One typed configuration for every stage.

A config is a tree of pydantic dataclasses. It is loaded from a YAML profile (``configs/cpu.yaml``,
``configs/paper.yaml`` or a path) and then patched with dotted ``key=value`` overrides, e.g.::

    cfg = load_config("cpu", ["data.label_fraction=0.05", "ray.cpus_per_worker=0.5"])

pydantic checks every value against its field's type and constraints (the aliases below: ``Count`` is
an integer >= 1, ``Fraction`` a number in [0, 1), ...); :func:`_check_relations` checks what one field
cannot say alone (a sum below 1, a width a group count divides). A bad key or value raises
:class:`ConfigError` with the key, the value and what is allowed, written from the same constraints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, Lt, MinLen, MultipleOf
from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

from histodiff_ray.errors import HistodiffError

PROFILE_DIR = Path(__file__).parent / "configs"


class ConfigError(HistodiffError):
    """A config key or value that cannot be used; the message says which and what is allowed."""


def _integral(value: Any) -> Any:
    # Budgets read naturally in overrides (max_steps=1e3); a boolean is not an integer.
    if isinstance(value, bool):
        raise ValueError("a boolean is not an integer")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else value
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _text(value: Any) -> Any:
    # A YAML scalar is text where the field wants text (region: 1, profile: 2024).
    return str(value) if isinstance(value, (int, float)) else value


def _list_from_text(value: Any) -> Any:
    # An override's "1,2,4" or "[1, 2, 4]" is a list.
    if isinstance(value, str):
        try:
            return yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        except yaml.YAMLError:
            return value
    return value


Int = Annotated[int, BeforeValidator(_integral)]
Number = Annotated[float, BeforeValidator(_number)]
Text = Annotated[str, BeforeValidator(_text)]
Count = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
Positive = Annotated[Number, Field(gt=0)]
NonNegative = Annotated[Number, Field(ge=0)]
Fraction = Annotated[Number, Field(ge=0, lt=1)]
Probability = Annotated[Number, Field(ge=0, le=1)]
Share = Annotated[Number, Field(gt=0, le=1)]  # of something that must not be empty
OptionalCount = Count | None  # None: the value named in the field's comment
IntList = Annotated[list[Int], BeforeValidator(_list_from_text)]
Multipliers = Annotated[list[Count], BeforeValidator(_list_from_text), MinLen(1)]
FloatList = Annotated[list[Number], BeforeValidator(_list_from_text)]
Arm = Literal["real", "real+aug", "pseudo-label"]
SyntheticUse = Literal["mix", "first"]

# Unknown keys are errors (a typo must not silently keep a default).
section = dataclass(config=ConfigDict(extra="forbid"))


@section
class RayConfig:
    # None: RAY_ADDRESS if set (`ray job submit` sets it), else a new local cluster; "auto" joins `ray start`
    address: Text | None = None
    num_workers: Count = 2  # Ray Train workers
    cpus_per_worker: Positive = 0.5  # fractional: whole-CPU workers starve Ray Data on small hosts
    use_gpu: bool = False
    gpus_per_worker: Positive = 1.0
    max_failures: NonNegativeInt = 2  # Ray Train restarts the worker group from the latest checkpoint this often
    keep_checkpoints: Count = 2


@section
class StorageConfig:
    # S3 endpoint, e.g. http://127.0.0.1:8333. None: AWS_ENDPOINT_URL(_S3) or AWS itself.
    endpoint_url: Text | None = None
    region: Text = "us-east-1"
    # Credentials; None falls back to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Never printed.
    access_key_id: Text | None = Field(default=None, repr=False)
    secret_access_key: Text | None = Field(default=None, repr=False)
    retries: Count = 5  # attempts on transient S3 errors (throttling, 5xx, resets), with backoff
    connect_timeout_s: Positive = 5.0


@section
class DataConfig:
    tile_size: Annotated[Int, Field(ge=8, multiple_of=8)] = 64  # pixels per side of every stored tile
    microns_per_pixel: Positive = 1.75  # the profile's resolution; sources with a known µm/px are resampled to it
    split_seed: Int = 0
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.2
    label_fraction: Share = 1.0  # share of each class's train tiles that keep their label
    tissue_fraction: Probability = 0.5  # region tiles need at least this share of tissue pixels
    max_image_pixels: Count = 50_000_000  # larger images are rejected as decompression bombs
    tiles_per_shard: Count = 4096
    files_per_chunk: Count = 4096  # ingest commits shards + manifest after each chunk of source files
    batch_size: Count = 64
    augment: bool = True  # random flips and 90° rotations of train tiles and latents (tissue has no orientation)


@section
class AutoencoderConfig:
    """diffusers AutoencoderKL; len(channels) - 1 downsamplings give the factor f."""

    # 8 channels, not 4: the same generated set reaches twice the k-NN precision and recall on the oracle's
    # features (0.10 -> 0.24, 0.18 -> 0.36) and class S is kept at all (7 -> 34 of 300; docs/fidelity.md).
    latent_channels: Count = 8
    block_out_channels: Multipliers = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: Count = 1
    # GroupNorm groups in every block. 32 groups on a 32-channel first stage normalise each channel
    # alone and throw away each tile's colour balance; fewer groups keep it (docs/fidelity.md).
    norm_groups: Count = 8  # 4 channels a group: +2.5 dB and 3x smaller colour error than 32 groups
    # On LDM's scale: reconstruction summed over pixels, KL summed over latent dimensions, per tile.
    kl_weight: NonNegative = 1e-6
    lr: Positive = 1e-3
    warmup_steps: NonNegativeInt = 100  # linear warm-up, then cosine decay to 0 at max_steps
    max_steps: Count = 1_200
    # Then this many steps train the decoder alone, on L1 + MSE, with the encoder frozen: the latents
    # do not change, so a latent set or diffusion model trained on them stays valid (Stability AI's
    # sd-vae-ft-mse recipe). PSNR is an MSE measure: 400 such steps took the cpu profile's
    # autoencoder from 22.5 to 24.4 dB over all val tiles (docs/fidelity.md).
    decoder_steps: NonNegativeInt = 400
    decoder_lr: Positive = 3e-4  # warm-up 50 steps, cosine to 0 at max_steps + decoder_steps
    # Then this many steps train the decoder alone against a PatchGAN discriminator (LDM / Stable
    # Diffusion practice; the latents are unchanged): L1 + MSE, feature matching on the
    # discriminator's features (weight gan_feature_matching; pix2pixHD) and the hinge generator loss
    # at LDM's adaptive weight × gan_weight. Sharper reconstructions at the same PSNR (docs/fidelity.md).
    # The cpu recipe's 600 steps: all val PSNR kept (26.91 -> 26.97 dB), and the same generated latents decode
    # into tiles the oracle agrees with more (0.880 -> 0.913), recall 0.120 -> 0.175, FID 215 -> 204.
    gan_steps: NonNegativeInt = 600
    gan_lr: Positive = 5e-5  # decoder and discriminator, Adam betas (0.5, 0.9); warm-up, cosine to 0
    gan_weight: NonNegative = 0.1
    gan_feature_matching: NonNegative = 1.0
    gan_channels: Count = 64  # the discriminator's first width (then 2x, 4x, ...)
    gan_layers: Count = 2  # its stride-2 stages (pix2pix's n_layers): 2 at 64 px, LDM's 3 at 256 px
    checkpoint_every: Count = 200
    log_every: Count = 25
    val_tiles: Count = 512  # PSNR/SSIM at each checkpoint on the first val tiles (all of them at the end)
    batch_size: OptionalCount = None  # tiles per Train worker and step; None: data.batch_size

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@section
class UNetConfig:
    """diffusers UNet2DModel in latent space."""

    base_channels: Annotated[Int, Field(ge=8)] = 64
    channel_mult: Multipliers = Field(default_factory=lambda: [1, 2, 2])
    attention_resolutions: IntList = Field(default_factory=lambda: [4])  # downsample rates with attention
    num_heads: Count = 4
    layers_per_block: Count = 1
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "scale_shift"  # the paper's scale-shift norm
    resblock_updown: bool = True
    dropout: Fraction = 0.0


@section
class DiffusionConfig:
    num_train_timesteps: Count = 1000
    # LDM's (and the paper's) "linear" is linspace(√β₀, √β₁)², which diffusers calls "scaled_linear";
    # diffusers' "linear" is a true linspace (ᾱ_T 1.9e-4 instead of 6.7e-4). Names follow diffusers,
    # so the exported scheduler folder means the same thing.
    beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear"
    beta_start: Annotated[Number, Field(gt=0, lt=1)] = 0.0015
    beta_end: Annotated[Number, Field(gt=0, lt=1)] = 0.0155
    # What the UNet predicts: the noise ε, or v = √ᾱ ε − √(1 − ᾱ) z₀ (Salimans & Ho 2022). A fine-tune keeps
    # its pre-trained run's choice.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    loss: Literal["l1", "l2"] = "l1"
    # Min-SNR-γ loss weighting (Hang et al. 2023): min(SNR_t, γ) / SNR_t per sample; 0 turns it off.
    min_snr_gamma: NonNegative = 5.0
    lr: Positive = 2e-4
    warmup_steps: NonNegativeInt = 200
    ema_decay: Fraction = 0.999
    # The EMA's decay starts low and rises as (1 + step) / (10 + step) to ema_decay (diffusers' EMAModel), so
    # early averages forget the starting weights fast; false: ema_decay from the first step.
    ema_warmup: bool = True
    # Pre-training on the unlabeled pool; raise it and re-run the same --run to continue. 1,000 steps on the cpu
    # profile: longer pre-training on the non-colon pool moved samples away from crc5 (docs/fidelity.md).
    max_steps: Count = 1_000
    grad_accum_steps: Count = 1
    checkpoint_every: Count = 250
    log_every: Count = 25
    # Autocast where it pays: CUDA. A CPU gains little even with bf16 units, and without them (AVX2;
    # models.bf16_is_native) it emulates bf16 many times slower than fp32: the loop then warns.
    bf16: bool = False
    # Target-domain fine-tuning continues from the pre-trained EMA weights with its own budget.
    finetune_lr: Positive = 1e-4
    # The cpu recipe's fidelity curve: FID flat from ~3,000 steps, precision and recall still creeping up at
    # 6,000; the kept set's oracle agreement 0.895 -> 0.961 against 1,800 (docs/fidelity.md, eighteenth session).
    finetune_steps: Count = 6_000
    finetune_warmup_steps: NonNegativeInt = 50
    batch_size: OptionalCount = None  # latents per Train worker and step; None: data.batch_size


@section
class ClassifierConfig:
    """Noise-aware latent classifier: UNet encoder half + timestep embedding + attention pooling."""

    # Start from the latent UNet's own encoder half (timestep embedding, down and middle blocks) as
    # trained by the diffusion run it guides; width, depth, channel_mult, attention_resolutions and
    # num_heads are then the UNet's. Denoiser features see through the noise at every t.
    # 0.54 -> 0.70 val accuracy at t < 250 on the cpu profile (docs/fidelity.md), for a guidance overhead of
    # 50 % instead of the width-16 guide's 28-29 % (docs/benchmarks.md).
    init_from_unet: bool = True
    width: Annotated[Int, Field(ge=8)] = 16  # base channel count (width .. num_heads: used with init_from_unet: false)
    depth: Count = 1  # ResBlocks per level
    channel_mult: Multipliers = Field(default_factory=lambda: [1, 2, 2])  # one level per entry
    attention_resolutions: IntList = Field(default_factory=lambda: [4])  # downsample rates with attention
    num_heads: Count = 1  # heads at the base width; wider levels get more (fixed head size, as in unet)
    pool: Literal["attention", "mean"] = "attention"
    lr: Positive = 3e-4
    weight_decay: NonNegative = 0.05
    warmup_steps: NonNegativeInt = 100  # linear warm-up, then cosine decay to 0 at max_steps
    # 9,000 steps: 0.805 -> 0.860 val accuracy at t < 250 against 3,000 (judge 0.878), on the cpu recipe
    # (docs/fidelity.md, eighteenth session); the longer cosine keeps learning where 3,000 had flattened.
    max_steps: Count = 9_000
    checkpoint_every: Count = 500
    log_every: Count = 50
    batch_size: OptionalCount = None  # latents per Train worker and step; None: data.batch_size


@section
class GuidanceConfig:
    """How sampling is steered to a class.

    ``classifier``: a noise-aware latent classifier's gradient (Dhariwal & Nichol 2021), trained by
    `histodiff train-classifier`; the UNet stays unconditional. ``classifier_free`` (Ho & Salimans
    2022): `histodiff finetune` gives the pre-trained UNet a class embedding (zero-initialised, so it
    starts as the unconditional model) and trains it on the target latents, labeled ones with their
    class and unlabeled ones with the null class, dropping labels with ``label_dropout``.

    Either model may also learn from the judge on unlabeled target train tiles (``--pseudo-labels
    JUDGE``): the guide learns its class probabilities on all of them (distillation); the
    class-conditional UNet, which needs one class per tile, takes its class where its confidence
    reaches ``pseudo_label_threshold``.
    """

    kind: Literal["classifier", "classifier_free"] = "classifier"
    label_dropout: Fraction = 0.1
    pseudo_label_threshold: Share = 0.95


@section
class SamplingConfig:
    # DPM-Solver++(2M) is deterministic (eta unused): on the exact model of Gaussian data 20 steps match 50
    # of DDIM, but classifier-guided on the cpu recipe it kept fewer tiles at lower fidelity (docs/fidelity.md).
    # sde-dpmsolver++ is its stochastic form: fresh noise at every step, as DDIM at eta = 1. With
    # karras_sigmas it matched 50-step DDIM's fidelity at 15 steps on the cpu recipe, 2.7x as fast
    # (docs/fidelity.md, seventeenth session); DDIM 50 stays the default the recipe's numbers were made with.
    sampler: Literal["ddim", "dpmsolver++", "sde-dpmsolver++"] = "ddim"
    ddim_steps: Annotated[Int, Field(ge=1, le=1000)] = 50  # the sampler's step count
    # The DPM solvers on Karras et al. (2022)'s noise levels (diffusers' use_karras_sigmas) instead of
    # evenly spaced timesteps: more of the steps at low noise, where the last even step jumps to the clean sample.
    karras_sigmas: bool = False
    eta: Probability = 1.0
    # s = 3 kept s = 10's oracle agreement at twice its precision and a lower FID (docs/fidelity.md)
    guidance_scale: NonNegative = 3.0  # classifier guidance: s in ε − s·√(1 − ᾱ)·∇ log p(y | z_t)
    cfg_scale: NonNegative = 2.0  # classifier-free guidance: w in ε_∅ + w·(ε_y − ε_∅); 1 = the plain conditional model


@section
class SelectionConfig:
    confidence_threshold: Probability = 0.9
    max_per_class: Count = 500
    # Memorization audit: drop synthetic tiles closer than this to a real train tile (RMS grey levels
    # of 16×16 thumbnails, any rotation/flip). 4.0 is ingest's near-copy threshold: crc5's re-encoded
    # rotated copies all fall below 2, and no tile pair falls between 2 and 8 (docs/data.md).
    min_real_distance: NonNegative = 4.0


@section
class GenerateConfig:
    """`histodiff generate`: how many tiles, in which units of work, on how many actors."""

    per_class: Count = 500  # tiles generated per class (kept + dropped)
    shard_size: Count = 32  # tiles per shard: one sampling batch, and the unit a rerun resumes at
    actors: Count = 2  # sampling actors in the pool (each loads the models once)
    threads_per_actor: Count = 1  # torch threads per actor on CPU: actors, not threads, scale across cores
    compile: bool = False  # torch.compile the UNet in each actor (~45 s per actor; 1.0-1.1x faster sampling here)


@section
class DownstreamConfig:
    """Pixel-space tile classifiers (timm, built from config): the selection judge and the
    evaluation's downstream classifier. The budget is optimizer steps: ``epochs`` passes over the
    real labeled tiles, the same for every arm of an evaluation; the epoch is chosen on val
    macro-F1 among those scored (early stopping)."""

    arch: Text = "resnet18"  # a timm model name
    epochs: Count = 40
    # Val scored at epochs 5, 10, ..., 40 (and after the last): a run trains in 2.3 min on 2 cores, not 3.4.
    val_every: Count = 5
    # Scored epochs without a better val macro-F1 before stopping; 40: never (one-cycle needs its whole budget).
    patience: Count = 40
    batch_size: Count = 64
    lr: Positive = 2e-3  # the one-cycle peak
    weight_decay: NonNegative = 0.05
    # HED jitter of classic augmentation (after Tellez et al. 2019; σ on optical densities), chosen on crc5's
    # val split at 5 % labels, one seed: σ = 0.05 0.848 accuracy, 0.02 0.881 (no jitter: 0.896; docs/results.md).
    stain_jitter: Fraction = 0.02
    # Brightness / contrast / saturation jitter after the stain jitter; off: on crc5 at 5 % labels it cost
    # another 3.4 points of test accuracy on top of the stain jitter's 5.2 (docs/results.md).
    colour_jitter: Fraction = 0.0
    # Evaluation: score the test sets averaged over the eight rotations and flips of each tile (8x the
    # scoring cost); model selection on val and the pseudo-label arm's teacher do not use it.
    tta: bool = True  # crc5's val split, 5 % labels, one seed: 0.881 -> 0.895 with σ = 0.02, 0.848 -> 0.859 with 0.05


@section
class EvaluateConfig:
    """`histodiff evaluate`: the downstream comparison (see histodiff_ray/evaluate.py)."""

    seeds: Count = 3  # downstream trainings per arm
    # Nested fractions of the train labels to evaluate at (the label-efficiency curve), each at most the
    # tile set's own data.label_fraction; empty: the tile set's labeled tiles only.
    label_fractions: Annotated[list[Share], BeforeValidator(_list_from_text)] = Field(default_factory=list)
    # Besides the synthetic ones (histodiff_ray/evaluate.py explains each arm).
    arms: Annotated[list[Arm], BeforeValidator(_list_from_text)] = Field(default_factory=lambda: list(BASE_ARMS))
    # Per --synthetic set: mixed into real+aug, or trained on first, then real.
    synthetic_uses: Annotated[list[SyntheticUse], BeforeValidator(_list_from_text)] = Field(
        default_factory=lambda: list(SYNTHETIC_USES)
    )
    synthetic_ratio: Positive = 1.0  # synthetic tiles per real labeled tile, per class
    # The pseudo-label arm keeps unlabeled tiles its teacher is this sure of.
    pseudo_label_threshold: Annotated[Number, Field(gt=0, lt=1)] = 0.95
    cpus_per_run: Positive = 1.0  # each (arm, seed) is a Ray task with one torch thread
    gpus_per_run: NonNegative = 0.0  # and this many GPUs (a fraction shares one); it trains on the GPU when given one


BASE_ARMS = typing.get_args(Arm)  # the evaluation's arms without synthetic tiles
SYNTHETIC_USES = typing.get_args(SyntheticUse)


@section
class SweepConfig:
    """`histodiff sweep`: Ray Tune over guidance scale, selection threshold and synthetic ratio."""

    trials: Count = 12
    # A grid: trials share generated sets.
    guidance_scales: Annotated[list[NonNegative], BeforeValidator(_list_from_text), MinLen(1)] = Field(
        default_factory=lambda: [0.0, 2.5, 5.0, 10.0, 20.0, 30.0]
    )
    confidence_threshold_range: FloatList = Field(default_factory=lambda: [0.5, 0.99])  # [low, high] in [0, 1]
    synthetic_ratio_range: FloatList = Field(default_factory=lambda: [0.25, 2.0])  # [low, high] in [0, 100]
    per_class: Count = 64  # tiles generated per class for each guidance scale
    epochs: Count = 8  # downstream epochs per trial (ASHA may stop a trial earlier)
    grace_epochs: Count = 2  # ASHA's grace period
    concurrency: Count = 1  # trials at once (each trains a downstream classifier); 1 on small machines
    gpus_per_trial: NonNegative = (
        0.0  # GPUs a trial asks for (a fraction shares one); it trains on the GPU when given one
    )


@section
class Config:
    profile: Text = "cpu"
    seed: Int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    downstream: DownstreamConfig = Field(default_factory=DownstreamConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    def to_dict(self, include_secrets: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not include_secrets:
            d["storage"]["access_key_id"] = None
            d["storage"]["secret_access_key"] = None
        return d

    def hash(self, *sections: str) -> str:
        """A short stable hash of the given sections (all when none), for naming runs and caching."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config: {key}={value!r} is not allowed; expected {allowed}")


def _check_relations(cfg: Config) -> Config:
    """What no single field's type can say: values that depend on each other, or on a library."""
    import timm  # noqa: PLC0415 — here, not at the top: every command loads a config, `--help` included

    url = cfg.storage.endpoint_url
    _check(
        url is None or url.startswith(("http://", "https://")),
        "storage.endpoint_url",
        url,
        "an http:// or https:// URL",
    )
    d = cfg.data
    _check(
        d.val_fraction + d.test_fraction < 1,
        "data.val_fraction+test_fraction",
        d.val_fraction + d.test_fraction,
        "a sum below 1 (train needs tiles)",
    )
    _check(
        not (cfg.sampling.karras_sigmas and cfg.sampling.sampler == "ddim"),
        "sampling.karras_sigmas",
        True,
        "false with sampling.sampler=ddim (Karras noise levels are for dpmsolver++ and sde-dpmsolver++)",
    )
    ae = cfg.autoencoder
    _check(
        all(c % ae.norm_groups == 0 for c in ae.block_out_channels),
        "autoencoder.norm_groups",
        ae.norm_groups,
        f"an integer >= 1 that divides every block width {ae.block_out_channels}",
    )
    _check(
        cfg.diffusion.beta_start < cfg.diffusion.beta_end,
        "diffusion.beta_start/beta_end",
        (cfg.diffusion.beta_start, cfg.diffusion.beta_end),
        "0 < beta_start < beta_end < 1",
    )
    _check(
        cfg.classifier.width % cfg.classifier.num_heads == 0,
        "classifier.num_heads",
        cfg.classifier.num_heads,
        f"an integer >= 1 that divides width ({cfg.classifier.width})",
    )
    latent = d.tile_size // ae.downsample_factor
    _check(
        d.tile_size % ae.downsample_factor == 0,
        "data.tile_size",
        d.tile_size,
        f"a multiple of the autoencoder's downsample factor {ae.downsample_factor}",
    )
    for name in ("unet", "classifier"):
        net = getattr(cfg, name)
        rates = [2**i for i in range(len(net.channel_mult))]
        _check(
            latent % rates[-1] == 0,
            f"{name}.channel_mult",
            net.channel_mult,
            f"at most log2 of the latent size ({latent}) downsamplings",
        )
        _check(
            all(r in rates for r in net.attention_resolutions),
            f"{name}.attention_resolutions",
            net.attention_resolutions,
            f"downsample rates among {rates}",
        )
    _check(
        cfg.downstream.arch in timm.list_models(),
        "downstream.arch",
        cfg.downstream.arch,
        "a timm model name, e.g. resnet18 or vit_tiny_patch16_224",
    )
    fractions = cfg.evaluate.label_fractions
    _check(
        len(set(fractions)) == len(fractions),
        "evaluate.label_fractions",
        fractions,
        "distinct numbers in (0, 1], e.g. [0.01, 0.05, 0.1, 1.0]",
    )
    s = cfg.sweep
    for name, lo, hi in (("confidence_threshold_range", 0.0, 1.0), ("synthetic_ratio_range", 0.0, 100.0)):
        v = getattr(s, name)
        _check(
            len(v) == 2 and lo <= v[0] <= v[1] <= hi,
            f"sweep.{name}",
            v,
            f"[low, high] with {lo} <= low <= high <= {hi}",
        )
    _check(s.grace_epochs <= s.epochs, "sweep.grace_epochs", s.grace_epochs, f"at most sweep.epochs ({s.epochs})")
    return cfg


def _allowed(annotation: Any, metadata: list | tuple = (), plural: bool = False) -> str:
    """What a field allows, in words, from its type and its constraints."""
    if typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata = [*metadata, *extra]
    metadata = [m for x in metadata for m in (x.metadata if isinstance(x, FieldInfo) else [x])]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return f"{_allowed(inner, metadata, plural)}, or null"
    if origin is Literal:
        names = [repr(a) for a in typing.get_args(annotation)]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    if origin is list:
        (item,) = typing.get_args(annotation)
        if typing.get_origin(item) is Literal:
            return f"a list drawn from {list(typing.get_args(item))}"
        non_empty = any(isinstance(m, MinLen) and m.min_length >= 1 for m in metadata)
        return f"{'a non-empty list' if non_empty else 'a list'} of {_allowed(item, plural=True)}"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "strings" if plural else "a string"
    noun = {int: ("an integer", "integers"), float: ("a number", "numbers")}[annotation][plural]
    low = next(((f"{m.ge}", "[", ">=") for m in metadata if isinstance(m, Ge)), None) or next(
        ((f"{m.gt}", "(", ">") for m in metadata if isinstance(m, Gt)), None
    )
    high = next(((f"{m.le}", "]", "<=") for m in metadata if isinstance(m, Le)), None) or next(
        ((f"{m.lt}", ")", "<") for m in metadata if isinstance(m, Lt)), None
    )
    step = next((m.multiple_of for m in metadata if isinstance(m, MultipleOf)), None)
    if step is not None:
        noun = f"{noun} multiple of {step}" + ("," if low else "")
    if low and high:
        return f"{noun} in {low[1]}{low[0]}, {high[0]}{high[1]}"
    bound = low or high
    return f"{noun} {bound[2]} {bound[0]}" if bound else noun


def _as_given(raw: Any, info: FieldInfo) -> str:
    """A value for an error message: a number as typed (0, not '0'), a list as read, never a secret."""
    if info.repr is False:
        return "***"
    if isinstance(raw, str):
        if typing.get_origin(info.annotation) is list:
            return repr(_list_from_text(raw))
        try:
            float(raw)
            return raw
        except ValueError:
            pass
    return repr(raw)


def _config_error(exc: ValidationError, values: dict) -> ConfigError:
    """The first of pydantic's errors, said as the key, the value given and what is allowed."""
    error = exc.errors()[0]
    cls, keys, raw = Config, [], values
    for part in error["loc"]:
        if isinstance(part, int):  # an item of a list field: the message is about the whole field
            break
        fields = cls.__pydantic_fields__
        keys.append(str(part))
        key = ".".join(keys)
        if part not in fields:
            return ConfigError(f"config: unknown key {key!r}; allowed here: {', '.join(fields)}")
        raw = raw.get(part, error["input"]) if isinstance(raw, dict) else error["input"]
        info = fields[part]
        if not dataclasses.is_dataclass(info.annotation):
            allowed = _allowed(info.annotation, info.metadata)
            return ConfigError(f"config: {key}={_as_given(raw, info)} is not allowed; expected {allowed}")
        if not isinstance(raw, (dict, info.annotation)):
            return ConfigError(f"config: {key}={raw!r} is not allowed; expected a mapping of {key}.* keys")
        cls = info.annotation
    return ConfigError(f"config: {error['msg']} at {'.'.join(keys)}")


_CONFIG = TypeAdapter(Config)


def config_from_dict(values: dict, check_relations: bool = True) -> Config:
    """A checked Config from nested sections of values (missing keys keep their defaults); also the
    inverse of ``Config.to_dict`` (how configs travel to Ray workers). ``check_relations=False`` is
    for the ``to_dict`` of a config the driver has checked already: a Train worker's, where the check
    would import timm to find what the driver found (little next to diffusers' imports, which
    share most of timm's; within the noise of bench/imports.py)."""
    try:
        cfg = _CONFIG.validate_python(values)
    except ValidationError as exc:
        raise _config_error(exc, values) from None
    return _check_relations(cfg) if check_relations else cfg


# Keys added after results were cached under hashes of their sections: at the value that keeps the
# old behaviour, and the GPU requests (where work runs, not what it makes), they are left out of
# stage and plan hashes, so that pipeline folders and synthetic sets made before are still reused.
# The same holds for the settings of a phase that is off (gan_* while gan_steps is 0).
NEUTRAL_KEYS = {"batch_size": None, "sampler": "ddim", "karras_sigmas": False, "ema_warmup": True}
PLACEMENT_KEYS = ("gpus_per_run", "gpus_per_trial")


def hashable(section: dict) -> dict:
    """A config section as it enters a cache hash (see NEUTRAL_KEYS)."""
    gan_off = section.get("gan_steps") == 0
    return {
        k: v
        for k, v in section.items()
        if k not in PLACEMENT_KEYS
        and not (k in NEUTRAL_KEYS and v == NEUTRAL_KEYS[k])
        and not (gan_off and k.startswith("gan_"))
    }


def parse_override(text: str) -> dict:
    """'data.label_fraction=0.05' -> {'data': {'label_fraction': '0.05'}}; pydantic types the value."""
    if "=" not in text:
        raise ConfigError(f"config: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    value = None if raw.strip().lower() in ("", "null", "none", "~") else raw.strip()
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def _merge(base: dict, update: dict) -> dict:
    """``update`` laid over ``base``, section by section."""
    merged = dict(base)
    for key, value in update.items():
        both_sections = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = _merge(merged[key], value) if both_sections else value
    return merged


def resolve_profile(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config: file {str(path)!r} does not exist")
        return path
    candidate = PROFILE_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"config: unknown profile {name_or_path!r}; use a YAML path or one of {known}")
    return candidate


def load_config(name_or_path: str = "cpu", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a profile (name or YAML path), apply dotted overrides, check."""
    path = resolve_profile(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, not {type(values).__name__}")
    for text in overrides:
        values = _merge(values, parse_override(text))
    return config_from_dict(values)
