"""One typed configuration for every stage.

A config is a tree of dataclasses. It is loaded from a YAML profile (``configs/cpu.yaml``,
``configs/paper.yaml`` or a path) and then patched with dotted ``key=value`` overrides, e.g.::

    cfg = load_config("cpu", ["data.label_fraction=0.05", "ray.cpus_per_worker=0.5"])

Every value is checked against its field's type and the field's constraints; a bad key or value
raises :class:`ConfigError` with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from histodiff_ray.errors import HistodiffError

PROFILE_DIR = Path(__file__).parent / "configs"


class ConfigError(HistodiffError):
    """A config key or value that cannot be used; the message says which and what is allowed."""


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config: {key}={value!r} is not allowed; expected {allowed}")


@dataclass
class RayConfig:
    address: str | None = (
        None  # None: RAY_ADDRESS if set (`ray job submit` sets it), else a new local cluster; "auto" joins `ray start`
    )
    num_workers: int = 2  # Ray Train workers
    cpus_per_worker: float = 0.5  # fractional: whole-CPU workers starve Ray Data on small hosts
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    max_failures: int = 2  # Ray Train restarts the worker group from the latest checkpoint this often
    keep_checkpoints: int = 2

    def validate(self, p: str) -> None:
        _check(self.num_workers >= 1, f"{p}.num_workers", self.num_workers, "an integer >= 1")
        _check(self.max_failures >= 0, f"{p}.max_failures", self.max_failures, "an integer >= 0")
        _check(self.keep_checkpoints >= 1, f"{p}.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _check(self.gpus_per_worker > 0, f"{p}.gpus_per_worker", self.gpus_per_worker, "a number > 0")


@dataclass
class StorageConfig:
    # S3 endpoint, e.g. http://127.0.0.1:8333. None: AWS_ENDPOINT_URL(_S3) or AWS itself.
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Credentials; None falls back to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Never printed.
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    retries: int = 5  # attempts on transient S3 errors (throttling, 5xx, resets), with backoff
    connect_timeout_s: float = 5.0

    def validate(self, p: str) -> None:
        _check(self.retries >= 1, f"{p}.retries", self.retries, "an integer >= 1")
        _check(self.connect_timeout_s > 0, f"{p}.connect_timeout_s", self.connect_timeout_s, "a number > 0")
        if self.endpoint_url is not None:
            _check(
                self.endpoint_url.startswith(("http://", "https://")),
                f"{p}.endpoint_url",
                self.endpoint_url,
                "an http:// or https:// URL",
            )


@dataclass
class DataConfig:
    tile_size: int = 64  # pixels per side of every stored tile
    microns_per_pixel: float = 1.75  # the profile's resolution; sources with a known µm/px are resampled to it
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    label_fraction: float = 1.0  # share of each class's train tiles that keep their label
    tissue_fraction: float = 0.5  # region tiles need at least this share of tissue pixels
    max_image_pixels: int = 50_000_000  # larger images are rejected as decompression bombs
    tiles_per_shard: int = 4096
    files_per_chunk: int = 4096  # ingest commits shards + manifest after each chunk of source files
    batch_size: int = 64
    augment: bool = True  # random flips and 90° rotations of train tiles and latents (tissue has no orientation)

    def validate(self, p: str) -> None:
        _check(
            self.tile_size >= 8 and self.tile_size % 8 == 0, f"{p}.tile_size", self.tile_size, "a multiple of 8, >= 8"
        )
        _check(self.microns_per_pixel > 0, f"{p}.microns_per_pixel", self.microns_per_pixel, "a number > 0")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0 <= v < 1, f"{p}.{name}", v, "a number in [0, 1)")
        _check(
            self.val_fraction + self.test_fraction < 1,
            f"{p}.val_fraction+test_fraction",
            self.val_fraction + self.test_fraction,
            "a sum below 1 (train needs tiles)",
        )
        _check(0 < self.label_fraction <= 1, f"{p}.label_fraction", self.label_fraction, "a number in (0, 1]")
        _check(0 <= self.tissue_fraction <= 1, f"{p}.tissue_fraction", self.tissue_fraction, "a number in [0, 1]")
        _check(self.max_image_pixels > 0, f"{p}.max_image_pixels", self.max_image_pixels, "an integer > 0")
        for name in ("tiles_per_shard", "files_per_chunk", "batch_size"):
            v = getattr(self, name)
            _check(v >= 1, f"{p}.{name}", v, "an integer >= 1")


@dataclass
class AutoencoderConfig:
    """diffusers AutoencoderKL; len(channels) - 1 downsamplings give the factor f."""

    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    # GroupNorm groups in every block. 32 groups on a 32-channel first stage normalise each channel
    # alone and throw away each tile's colour balance; fewer groups keep it (docs/fidelity.md).
    norm_groups: int = 8  # 4 channels a group: +2.5 dB and 3x smaller colour error than 32 groups
    # On LDM's scale: reconstruction summed over pixels, KL summed over latent dimensions, per tile.
    kl_weight: float = 1e-6
    lr: float = 1e-3
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0 at max_steps
    max_steps: int = 1_200
    # Then this many steps train the decoder alone, on L1 + MSE, with the encoder frozen: the latents
    # do not change, so a latent set or diffusion model trained on them stays valid (Stability AI's
    # sd-vae-ft-mse recipe). PSNR is an MSE measure: 400 such steps took the cpu profile's
    # autoencoder from 22.5 to 24.4 dB over all val tiles (docs/fidelity.md).
    decoder_steps: int = 400
    decoder_lr: float = 3e-4  # warm-up 50 steps, cosine to 0 at max_steps + decoder_steps
    # Then this many steps train the decoder alone against a PatchGAN discriminator (LDM / Stable
    # Diffusion practice; the latents are unchanged): L1 + MSE, feature matching on the
    # discriminator's features (weight gan_feature_matching; pix2pixHD) and the hinge generator loss
    # at LDM's adaptive weight × gan_weight. Sharper reconstructions at the same PSNR (docs/fidelity.md).
    # The cpu recipe's 600 steps: all val PSNR kept (26.91 -> 26.97 dB), and the same generated latents decode
    # into tiles the oracle agrees with more (0.880 -> 0.913), recall 0.120 -> 0.175, FID 215 -> 204.
    gan_steps: int = 600
    gan_lr: float = 5e-5  # decoder and discriminator, Adam betas (0.5, 0.9); warm-up, cosine to 0
    gan_weight: float = 0.1
    gan_feature_matching: float = 1.0
    gan_channels: int = 64  # the discriminator's first width (then 2x, 4x, ...)
    gan_layers: int = 2  # its stride-2 stages (pix2pix's n_layers): 2 at 64 px, LDM's 3 at 256 px
    checkpoint_every: int = 200
    log_every: int = 25
    val_tiles: int = 512  # PSNR/SSIM at each checkpoint on the first val tiles (all of them at the end)
    batch_size: int | None = None  # tiles per Train worker and step; None: data.batch_size

    def validate(self, p: str) -> None:
        for name in ("max_steps", "checkpoint_every", "log_every", "val_tiles"):
            _check(getattr(self, name) >= 1, f"{p}.{name}", getattr(self, name), "an integer >= 1")
        _check(
            self.batch_size is None or self.batch_size >= 1,
            f"{p}.batch_size",
            self.batch_size,
            "an integer >= 1, or null",
        )
        _check(self.decoder_steps >= 0, f"{p}.decoder_steps", self.decoder_steps, "an integer >= 0")
        _check(self.decoder_lr > 0, f"{p}.decoder_lr", self.decoder_lr, "a number > 0")
        _check(self.gan_steps >= 0, f"{p}.gan_steps", self.gan_steps, "an integer >= 0")
        _check(self.gan_lr > 0, f"{p}.gan_lr", self.gan_lr, "a number > 0")
        for name in ("gan_weight", "gan_feature_matching"):
            _check(getattr(self, name) >= 0, f"{p}.{name}", getattr(self, name), "a number >= 0")
        _check(self.gan_channels >= 1, f"{p}.gan_channels", self.gan_channels, "an integer >= 1")
        _check(self.gan_layers >= 1, f"{p}.gan_layers", self.gan_layers, "an integer >= 1")
        _check(self.latent_channels >= 1, f"{p}.latent_channels", self.latent_channels, "an integer >= 1")
        _check(
            len(self.block_out_channels) >= 1, f"{p}.block_out_channels", self.block_out_channels, "a non-empty list"
        )
        _check(self.layers_per_block >= 1, f"{p}.layers_per_block", self.layers_per_block, "an integer >= 1")
        _check(
            self.norm_groups >= 1 and all(c % self.norm_groups == 0 for c in self.block_out_channels),
            f"{p}.norm_groups",
            self.norm_groups,
            f"an integer >= 1 that divides every block width {self.block_out_channels}",
        )
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(self.kl_weight >= 0, f"{p}.kl_weight", self.kl_weight, "a number >= 0")
        _check(self.lr > 0, f"{p}.lr", self.lr, "a number > 0")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class UNetConfig:
    """diffusers UNet2DModel in latent space."""

    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    attention_resolutions: list[int] = field(default_factory=lambda: [4])  # downsample rates with attention
    num_heads: int = 4
    layers_per_block: int = 1
    resnet_time_scale_shift: str = "scale_shift"  # "default" or "scale_shift" (the paper's scale-shift norm)
    resblock_updown: bool = True
    dropout: float = 0.0

    def validate(self, p: str) -> None:
        _check(self.base_channels >= 8, f"{p}.base_channels", self.base_channels, "an integer >= 8")
        _check(len(self.channel_mult) >= 1, f"{p}.channel_mult", self.channel_mult, "a non-empty list")
        _check(
            all(r in [2**i for i in range(len(self.channel_mult))] for r in self.attention_resolutions),
            f"{p}.attention_resolutions",
            self.attention_resolutions,
            f"downsample rates among {[2**i for i in range(len(self.channel_mult))]}",
        )
        _check(self.num_heads >= 1, f"{p}.num_heads", self.num_heads, "an integer >= 1")
        _check(self.layers_per_block >= 1, f"{p}.layers_per_block", self.layers_per_block, "an integer >= 1")
        _check(
            self.resnet_time_scale_shift in ("default", "scale_shift"),
            f"{p}.resnet_time_scale_shift",
            self.resnet_time_scale_shift,
            "'default' or 'scale_shift'",
        )
        _check(0 <= self.dropout < 1, f"{p}.dropout", self.dropout, "a number in [0, 1)")


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    # LDM's (and the paper's) "linear" is linspace(√β₀, √β₁)², which diffusers calls "scaled_linear";
    # diffusers' "linear" is a true linspace (ᾱ_T 1.9e-4 instead of 6.7e-4). Names follow diffusers,
    # so the exported scheduler folder means the same thing.
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0155
    prediction_type: str = "epsilon"
    loss: str = "l1"
    # Min-SNR-γ loss weighting (Hang et al. 2023): min(SNR_t, γ) / SNR_t per sample; 0 turns it off.
    min_snr_gamma: float = 5.0
    lr: float = 2e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    # Pre-training on the unlabeled pool; raise it and re-run the same --run to continue. 1,000 steps on the cpu
    # profile: longer pre-training on the non-colon pool moved samples away from crc5 (docs/fidelity.md).
    max_steps: int = 1_000
    grad_accum_steps: int = 1
    checkpoint_every: int = 250
    log_every: int = 25
    bf16: bool = False  # autocast where it pays: CUDA (a CPU gains nothing with attention)
    # Target-domain fine-tuning continues from the pre-trained EMA weights with its own budget.
    finetune_lr: float = 1e-4
    finetune_steps: int = 1_200  # where the cpu profile's fidelity curve has flattened (docs/fidelity.md)
    finetune_warmup_steps: int = 50
    batch_size: int | None = None  # latents per Train worker and step; None: data.batch_size

    def validate(self, p: str) -> None:
        _check(
            self.batch_size is None or self.batch_size >= 1,
            f"{p}.batch_size",
            self.batch_size,
            "an integer >= 1, or null",
        )
        _check(self.finetune_lr > 0, f"{p}.finetune_lr", self.finetune_lr, "a number > 0")
        _check(self.finetune_steps >= 1, f"{p}.finetune_steps", self.finetune_steps, "an integer >= 1")
        _check(
            self.finetune_warmup_steps >= 0, f"{p}.finetune_warmup_steps", self.finetune_warmup_steps, "an integer >= 0"
        )
        _check(self.num_train_timesteps >= 1, f"{p}.num_train_timesteps", self.num_train_timesteps, "an integer >= 1")
        _check(
            self.beta_schedule in ("linear", "scaled_linear"),
            f"{p}.beta_schedule",
            self.beta_schedule,
            "'linear' or 'scaled_linear'",
        )
        _check(
            0 < self.beta_start < self.beta_end < 1,
            f"{p}.beta_start/beta_end",
            (self.beta_start, self.beta_end),
            "0 < beta_start < beta_end < 1",
        )
        _check(self.prediction_type == "epsilon", f"{p}.prediction_type", self.prediction_type, "'epsilon'")
        _check(self.loss in ("l1", "l2"), f"{p}.loss", self.loss, "'l1' or 'l2'")
        _check(self.min_snr_gamma >= 0, f"{p}.min_snr_gamma", self.min_snr_gamma, "a number >= 0 (0: off)")
        _check(self.lr > 0, f"{p}.lr", self.lr, "a number > 0")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(0 <= self.ema_decay < 1, f"{p}.ema_decay", self.ema_decay, "a number in [0, 1)")
        for name in ("max_steps", "grad_accum_steps", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            _check(v >= 1, f"{p}.{name}", v, "an integer >= 1")


@dataclass
class ClassifierConfig:
    """Noise-aware latent classifier: UNet encoder half + timestep embedding + attention pooling."""

    # Start from the latent UNet's own encoder half (timestep embedding, down and middle blocks) as
    # trained by the diffusion run it guides; width, depth, channel_mult, attention_resolutions and
    # num_heads are then the UNet's. Denoiser features see through the noise at every t.
    # 0.54 -> 0.70 val accuracy at t < 250 on the cpu profile (docs/fidelity.md), for a guidance overhead of
    # 50 % instead of the width-16 guide's 28-29 % (docs/benchmarks.md).
    init_from_unet: bool = True
    width: int = 16  # base channel count (width .. num_heads: used with init_from_unet: false)
    depth: int = 1  # ResBlocks per level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # one level per entry
    attention_resolutions: list[int] = field(default_factory=lambda: [4])  # downsample rates with attention
    num_heads: int = 1  # heads at the base width; wider levels get more (fixed head size, as in unet)
    pool: str = "attention"
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 0 at max_steps
    max_steps: int = 3_000
    checkpoint_every: int = 500
    log_every: int = 50
    batch_size: int | None = None  # latents per Train worker and step; None: data.batch_size

    def validate(self, p: str) -> None:
        _check(self.width >= 8, f"{p}.width", self.width, "an integer >= 8")
        _check(
            self.batch_size is None or self.batch_size >= 1,
            f"{p}.batch_size",
            self.batch_size,
            "an integer >= 1, or null",
        )
        _check(self.depth >= 1, f"{p}.depth", self.depth, "an integer >= 1")
        _check(
            len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult),
            f"{p}.channel_mult",
            self.channel_mult,
            "a non-empty list of integers >= 1",
        )
        rates = [2**i for i in range(len(self.channel_mult))]
        _check(
            all(r in rates for r in self.attention_resolutions),
            f"{p}.attention_resolutions",
            self.attention_resolutions,
            f"downsample rates among {rates}",
        )
        _check(
            self.num_heads >= 1 and self.width % self.num_heads == 0,
            f"{p}.num_heads",
            self.num_heads,
            f"an integer >= 1 that divides width ({self.width})",
        )
        _check(self.pool in ("attention", "mean"), f"{p}.pool", self.pool, "'attention' or 'mean'")
        _check(self.lr > 0, f"{p}.lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.warmup_steps >= 0, f"{p}.warmup_steps", self.warmup_steps, "an integer >= 0")
        for name in ("max_steps", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            _check(v >= 1, f"{p}.{name}", v, "an integer >= 1")


@dataclass
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

    kind: str = "classifier"
    label_dropout: float = 0.1
    pseudo_label_threshold: float = 0.95

    def validate(self, p: str) -> None:
        _check(
            self.kind in ("classifier", "classifier_free"), f"{p}.kind", self.kind, "'classifier' or 'classifier_free'"
        )
        _check(0 <= self.label_dropout < 1, f"{p}.label_dropout", self.label_dropout, "a number in [0, 1)")
        _check(
            0 < self.pseudo_label_threshold <= 1,
            f"{p}.pseudo_label_threshold",
            self.pseudo_label_threshold,
            "a number in (0, 1]",
        )


@dataclass
class SamplingConfig:
    # "ddim" or "dpmsolver++" (DPM-Solver++(2M), deterministic: ~20 steps match 50 of DDIM; eta unused).
    sampler: str = "ddim"
    ddim_steps: int = 50  # the sampler's step count
    eta: float = 1.0
    # s = 3 kept s = 10's oracle agreement at twice its precision and a lower FID (docs/fidelity.md)
    guidance_scale: float = 3.0  # classifier guidance: s in ε − s·√(1 − ᾱ)·∇ log p(y | z_t)
    cfg_scale: float = 2.0  # classifier-free guidance: w in ε_∅ + w·(ε_y − ε_∅); 1 = the plain conditional model

    def validate(self, p: str) -> None:
        _check(self.sampler in ("ddim", "dpmsolver++"), f"{p}.sampler", self.sampler, "'ddim' or 'dpmsolver++'")
        _check(1 <= self.ddim_steps <= 1000, f"{p}.ddim_steps", self.ddim_steps, "an integer in [1, 1000]")
        _check(0 <= self.eta <= 1, f"{p}.eta", self.eta, "a number in [0, 1]")
        _check(self.guidance_scale >= 0, f"{p}.guidance_scale", self.guidance_scale, "a number >= 0")
        _check(self.cfg_scale >= 0, f"{p}.cfg_scale", self.cfg_scale, "a number >= 0")


@dataclass
class SelectionConfig:
    confidence_threshold: float = 0.9
    max_per_class: int = 500
    # Memorization audit: drop synthetic tiles closer than this to a real train tile (RMS grey levels
    # of 16×16 thumbnails, any rotation/flip). 4.0 is ingest's near-copy threshold: crc5's re-encoded
    # rotated copies all fall below 2, and no tile pair falls between 2 and 8 (docs/data.md).
    min_real_distance: float = 4.0

    def validate(self, p: str) -> None:
        _check(
            0 <= self.confidence_threshold <= 1,
            f"{p}.confidence_threshold",
            self.confidence_threshold,
            "a number in [0, 1]",
        )
        _check(self.max_per_class >= 1, f"{p}.max_per_class", self.max_per_class, "an integer >= 1")
        _check(self.min_real_distance >= 0, f"{p}.min_real_distance", self.min_real_distance, "a number >= 0")


@dataclass
class GenerateConfig:
    """`histodiff generate`: how many tiles, in which units of work, on how many actors."""

    per_class: int = 500  # tiles generated per class (kept + dropped)
    shard_size: int = 32  # tiles per shard: one sampling batch, and the unit a rerun resumes at
    actors: int = 2  # sampling actors in the pool (each loads the models once)
    threads_per_actor: int = 1  # torch threads per actor on CPU: actors, not threads, scale across cores
    compile: bool = (
        False  # torch.compile the UNet in each actor (~45 s per actor; 1.0-1.1x faster sampling on this CPU)
    )

    def validate(self, p: str) -> None:
        for name in ("per_class", "shard_size", "actors", "threads_per_actor"):
            v = getattr(self, name)
            _check(v >= 1, f"{p}.{name}", v, "an integer >= 1")


@dataclass
class DownstreamConfig:
    """Pixel-space tile classifiers (timm, built from config): the selection judge and the
    evaluation's downstream classifier. The budget is optimizer steps: ``epochs`` passes over the
    real labeled tiles, the same for every arm of an evaluation; the epoch is chosen on val
    macro-F1 among those scored (early stopping)."""

    arch: str = "resnet18"
    epochs: int = 40
    # Val scored at epochs 5, 10, ..., 40 (and after the last): a run trains in 2.3 min on 2 cores, not 3.4.
    val_every: int = 5
    patience: int = (
        40  # scored epochs without a better val macro-F1 before stopping; 40: never (one-cycle needs its whole budget)
    )
    batch_size: int = 64
    lr: float = 2e-3  # the one-cycle peak
    weight_decay: float = 0.05
    # HED jitter of classic augmentation (after Tellez et al. 2019; σ on optical densities), chosen on crc5's
    # val split at 5 % labels, one seed: σ = 0.05 0.848 accuracy, 0.02 0.881 (no jitter: 0.896; docs/results.md).
    stain_jitter: float = 0.02
    # Brightness / contrast / saturation jitter after the stain jitter; off: on crc5 at 5 % labels it cost
    # another 3.4 points of test accuracy on top of the stain jitter's 5.2 (docs/results.md).
    colour_jitter: float = 0.0
    # Evaluation: score the test sets averaged over the eight rotations and flips of each tile (8x the
    # scoring cost); model selection on val and the pseudo-label arm's teacher do not use it.
    tta: bool = True  # crc5's val split, 5 % labels, one seed: 0.881 -> 0.895 with σ = 0.02, 0.848 -> 0.859 with 0.05

    def validate(self, p: str) -> None:
        import timm  # noqa: PLC0415 — here, not at the top: every command loads a config, `--help` included

        _check(
            self.arch in timm.list_models(),
            f"{p}.arch",
            self.arch,
            "a timm model name, e.g. resnet18 or vit_tiny_patch16_224",
        )
        for name in ("epochs", "val_every", "patience", "batch_size"):
            v = getattr(self, name)
            _check(v >= 1, f"{p}.{name}", v, "an integer >= 1")
        _check(self.lr > 0, f"{p}.lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "a number >= 0")
        _check(0 <= self.stain_jitter < 1, f"{p}.stain_jitter", self.stain_jitter, "a number in [0, 1)")
        _check(0 <= self.colour_jitter < 1, f"{p}.colour_jitter", self.colour_jitter, "a number in [0, 1)")


@dataclass
class EvaluateConfig:
    """`histodiff evaluate`: the downstream comparison (see histodiff_ray/evaluate.py)."""

    seeds: int = 3  # downstream trainings per arm
    # Nested fractions of the train labels to evaluate at (the label-efficiency curve), each at most the
    # tile set's own data.label_fraction; empty: the tile set's labeled tiles only.
    label_fractions: list[float] = field(default_factory=list)
    arms: list[str] = field(default_factory=lambda: ["real", "real+aug", "pseudo-label"])  # besides the synthetic ones
    synthetic_uses: list[str] = field(default_factory=lambda: ["mix", "first"])  # per --synthetic set
    synthetic_ratio: float = 1.0  # synthetic tiles per real labeled tile, per class
    pseudo_label_threshold: float = 0.95  # the pseudo-label arm keeps unlabeled tiles its teacher is this sure of
    cpus_per_run: float = 1.0  # each (arm, seed) is a Ray task with one torch thread
    gpus_per_run: float = 0.0  # and this many GPUs (a fraction shares one); it trains on the GPU when given one

    def validate(self, p: str) -> None:
        _check(self.seeds >= 1, f"{p}.seeds", self.seeds, "an integer >= 1")
        _check(self.gpus_per_run >= 0, f"{p}.gpus_per_run", self.gpus_per_run, "a number >= 0")
        _check(
            all(0 < f <= 1 for f in self.label_fractions)
            and len(set(self.label_fractions)) == len(self.label_fractions),
            f"{p}.label_fractions",
            self.label_fractions,
            "distinct numbers in (0, 1], e.g. [0.01, 0.05, 0.1, 1.0]",
        )
        _check(set(self.arms) <= set(BASE_ARMS), f"{p}.arms", self.arms, f"a list drawn from {list(BASE_ARMS)}")
        _check(
            set(self.synthetic_uses) <= set(SYNTHETIC_USES),
            f"{p}.synthetic_uses",
            self.synthetic_uses,
            f"a list drawn from {list(SYNTHETIC_USES)}",
        )
        _check(self.synthetic_ratio > 0, f"{p}.synthetic_ratio", self.synthetic_ratio, "a number > 0")
        _check(
            0 < self.pseudo_label_threshold < 1,
            f"{p}.pseudo_label_threshold",
            self.pseudo_label_threshold,
            "a number in (0, 1)",
        )
        _check(self.cpus_per_run > 0, f"{p}.cpus_per_run", self.cpus_per_run, "a number > 0")


# The evaluation's arms without synthetic tiles (histodiff_ray/evaluate.py explains each) ...
BASE_ARMS = ("real", "real+aug", "pseudo-label")
# ... and the ways each synthetic set is used: mixed into real+aug, or trained on first, then real.
SYNTHETIC_USES = ("mix", "first")


@dataclass
class SweepConfig:
    """`histodiff sweep`: Ray Tune over guidance scale, selection threshold and synthetic ratio."""

    trials: int = 12
    guidance_scales: list[float] = field(
        default_factory=lambda: [0.0, 2.5, 5.0, 10.0, 20.0, 30.0]
    )  # a grid: trials share generated sets
    confidence_threshold_range: list[float] = field(default_factory=lambda: [0.5, 0.99])
    synthetic_ratio_range: list[float] = field(default_factory=lambda: [0.25, 2.0])
    per_class: int = 64  # tiles generated per class for each guidance scale
    epochs: int = 8  # downstream epochs per trial (ASHA may stop a trial earlier)
    grace_epochs: int = 2  # ASHA's grace period
    concurrency: int = 1  # trials at once (each trains a downstream classifier); 1 on small machines
    gpus_per_trial: float = 0.0  # GPUs a trial asks for (a fraction shares one); it trains on the GPU when given one

    def validate(self, p: str) -> None:
        for name in ("trials", "per_class", "epochs", "grace_epochs", "concurrency"):
            v = getattr(self, name)
            _check(v >= 1, f"{p}.{name}", v, "an integer >= 1")
        _check(self.gpus_per_trial >= 0, f"{p}.gpus_per_trial", self.gpus_per_trial, "a number >= 0")
        _check(
            self.guidance_scales and all(g >= 0 for g in self.guidance_scales),
            f"{p}.guidance_scales",
            self.guidance_scales,
            "a non-empty list of numbers >= 0",
        )
        for name, lo, hi in (("confidence_threshold_range", 0.0, 1.0), ("synthetic_ratio_range", 0.0, 100.0)):
            v = getattr(self, name)
            _check(
                len(v) == 2 and lo <= v[0] <= v[1] <= hi,
                f"{p}.{name}",
                v,
                f"[low, high] with {lo} <= low <= high <= {hi}",
            )
        _check(
            self.grace_epochs <= self.epochs,
            f"{p}.grace_epochs",
            self.grace_epochs,
            f"at most sweep.epochs ({self.epochs})",
        )


@dataclass
class Config:
    profile: str = "cpu"
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        latent = self.data.tile_size // self.autoencoder.downsample_factor
        _check(
            self.data.tile_size % self.autoencoder.downsample_factor == 0,
            "data.tile_size",
            self.data.tile_size,
            f"a multiple of the autoencoder's downsample factor {self.autoencoder.downsample_factor}",
        )
        _check(
            latent % (2 ** (len(self.unet.channel_mult) - 1)) == 0,
            "unet.channel_mult",
            self.unet.channel_mult,
            f"at most log2 of the latent size ({latent}) downsamplings",
        )
        _check(
            latent % (2 ** (len(self.classifier.channel_mult) - 1)) == 0,
            "classifier.channel_mult",
            self.classifier.channel_mult,
            f"at most log2 of the latent size ({latent}) downsamplings",
        )
        return self

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


# Keys added after results were cached under hashes of their sections: at the value that keeps the
# old behaviour, and the GPU requests (where work runs, not what it makes), they are left out of
# stage and plan hashes, so that pipeline folders and synthetic sets made before are still reused.
# The same holds for the settings of a phase that is off (gan_* while gan_steps is 0).
NEUTRAL_KEYS = {"batch_size": None, "sampler": "ddim"}
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


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/override value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # from an override: "1,2,4" or "[1, 2, 4]"
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, list):
            raise ConfigError(f"config: {key}={value!r} is not allowed; expected a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config: {key}={value!r} is not allowed; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config: {key}={value!r} is not allowed; expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {key}={value!r} is not allowed; expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(f"config: {key}={value!r} is not allowed; expected an integer")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config: {key}={value!r} is not allowed; expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config: {key}={value!r} is not allowed; expected a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config: {key}={value!r} is not allowed; expected a string")
        return str(value)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _apply(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"config: unknown key {dotted!r}; allowed here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config: {dotted}={value!r} is not allowed; expected a mapping of {dotted}.* keys")
            _apply(current, value, f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def parse_override(text: str) -> dict:
    """'data.label_fraction=0.05' -> {'data': {'label_fraction': '0.05'}}; _coerce types the value."""
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


def config_from_dict(values: dict) -> Config:
    """The inverse of ``Config.to_dict`` (how configs travel to Ray workers)."""
    cfg = Config()
    _apply(cfg, values, "")
    return cfg.validate()


def load_config(name_or_path: str = "cpu", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a profile (name or YAML path), apply dotted overrides, validate."""
    path = resolve_profile(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, not {type(values).__name__}")
    cfg = Config()
    _apply(cfg, values, "")
    for text in overrides:
        _apply(cfg, parse_override(text), "")
    return cfg.validate()
