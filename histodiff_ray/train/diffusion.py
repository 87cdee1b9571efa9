"""Stage 2: the latent diffusion model: pre-training without labels, then fine-tuning on the target.

    histodiff pretrain --latents s3://bucket/latents/pool --run s3://bucket/runs/pretrain
    histodiff finetune --pretrained s3://bucket/runs/pretrain --latents s3://bucket/latents/crc5 --run s3://bucket/runs/finetune

DDPM ε- (or v-) prediction of the latent UNet with min-SNR-γ weighting, latent flips/rot90 and an EMA of its
weights. Pre-training mixes one or more latent sets by weight (``--latents URI=WEIGHT``); fine-tuning
continues from a pre-trained run's EMA weights with its own LR and step budget
(``diffusion.finetune_*``) and, for ``guidance.kind: classifier_free``, learns a class embedding
with label dropout. A finished run holds::

    RUN/model/unet/        UNet2DModel.from_pretrained(RUN/model/unet), the EMA weights
    RUN/model/scheduler/   DDPMScheduler.from_pretrained(RUN/model/scheduler)
    RUN/model/vae/         the autoencoder the latents came from
    RUN/run.json           what it was trained on: latent sets, scale factor, config
"""

from __future__ import annotations

import copy
import tempfile

import ray.train
import ray.train.torch
import torch
from diffusers import DDPMScheduler

from histodiff_ray.augment import random_dihedral
from histodiff_ray.config import Config
from histodiff_ray.console import logger
from histodiff_ray.data.latents import load_latent_manifest, read_latents
from histodiff_ray.diffusion.schedule import NoiseSchedule
from histodiff_ray.errors import HistodiffError
from histodiff_ray.models import bf16_is_native
from histodiff_ray.models.unet import build_unet
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import download_dir, open_location, read_run_info
from histodiff_ray.train.runner import (
    StepRunner,
    export,
    fit,
    load_unet_weights,
    min_epoch_rows,
    mix_by_weight,
    warmup_cosine,
)

log = logger(__name__)


def pretrain(cfg: Config, latents: list[tuple[str, float]], run: str) -> dict:
    """Pre-train the latent UNet on one or more (latent set, weight) pairs, mixed by weight; labels unused."""
    init_ray(cfg)
    manifests = _latent_manifests(cfg, latents)
    d = cfg.diffusion
    budget = {"name": "pretrain", "lr": d.lr, "max_steps": d.max_steps, "warmup_steps": d.warmup_steps}
    return _train(cfg, latents, manifests, run, budget, manifests[0]["scale_factor"], init_weights=None, parent=None)


def finetune(
    cfg: Config, latents: list[tuple[str, float]], run: str, pretrained: str, pseudo_labels_from: str | None = None
) -> dict:
    """Fine-tune a finished diffusion run (``pretrained``) on the target's latent set(s), from its EMA
    weights and at its latent scale. With ``guidance.kind: classifier_free`` the UNet gains a class
    embedding and trains on the labels of the one labeled latent set, and with ``pseudo_labels_from``
    (a judge) on its pseudo-labels of the unlabeled train tiles too; otherwise labels are unused."""
    init_ray(cfg)
    manifests = _latent_manifests(cfg, latents)
    parent_loc = open_location(pretrained, cfg.storage)
    parent = read_run_info(parent_loc)
    if parent.get("autoencoder") != manifests[0]["autoencoder"]:
        raise HistodiffError(
            f"{pretrained} was trained on latents of {parent.get('autoencoder')}, not {manifests[0]['autoencoder']}"
        )
    parent_prediction = parent["config"]["diffusion"]["prediction_type"]
    if parent_prediction != cfg.diffusion.prediction_type:
        raise HistodiffError(
            f"{pretrained} predicts {parent_prediction}, this fine-tune diffusion.prediction_type="
            f"{cfg.diffusion.prediction_type}: set diffusion.prediction_type={parent_prediction}, "
            "or pre-train with the one you want"
        )
    classes, pseudo = None, None
    if cfg.guidance.kind == "classifier_free":
        labeled = [m["classes"] for m in manifests if m.get("classes")]
        if len(labeled) != 1 or sum(sum(m["labeled_train"].values()) for m in manifests) == 0:
            raise HistodiffError(
                "guidance.kind=classifier_free fine-tunes on the labels of exactly one labeled latent set; "
                f"got {len(labeled)} labeled sets among {[uri for uri, _ in latents]}"
            )
        classes = labeled[0]
    if pseudo_labels_from is not None:
        if classes is None:
            raise HistodiffError(
                "--pseudo-labels serves a class-conditional fine-tune: set guidance.kind=classifier_free"
            )
        # Here, on the driver, not at the top: the Train workers import this module, and need none of
        # the judge's timm and torchmetrics (about a CPU-second of each one's start, bench/imports.py).
        from histodiff_ray.judge import pseudo_labels  # noqa: PLC0415

        pseudo = pseudo_labels(cfg, pseudo_labels_from, next(m["tiles"] for m in manifests if m.get("classes")))
    d = cfg.diffusion
    budget = {
        "name": "finetune",
        "lr": d.finetune_lr,
        "max_steps": d.finetune_steps,
        "warmup_steps": d.finetune_warmup_steps,
    }
    # The pre-trained model's input scale is kept, whatever the target latents' own std.
    return _train(
        cfg,
        latents,
        manifests,
        run,
        budget,
        parent["scale_factor"],
        init_weights=load_unet_weights(parent_loc),
        parent=pretrained,
        classes=classes,
        pseudo=pseudo,
    )


def _latent_manifests(cfg: Config, latents: list[tuple[str, float]]) -> list[dict]:
    """The latent sets' manifests, once they are known to come from one autoencoder."""
    manifests = [load_latent_manifest(open_location(uri, cfg.storage)) for uri, _ in latents]
    autoencoders = {m["autoencoder"] for m in manifests}
    if len(autoencoders) != 1:
        raise HistodiffError(
            f"latent sets were encoded by different autoencoders {sorted(autoencoders)}; encode them with one"
        )
    return manifests


def _train(
    cfg: Config,
    latents: list[tuple[str, float]],
    manifests: list[dict],
    run: str,
    budget: dict,
    scale_factor: float,
    init_weights: dict | None,
    parent: str | None,
    classes: list[str] | None = None,
    pseudo=None,
) -> dict:
    vae_dir = manifests[0]["autoencoder"]
    run_loc = open_location(run, cfg.storage)
    locs = [open_location(uri, cfg.storage) for uri, _ in latents]
    labels, pseudo_summary = pseudo if pseudo is not None else (None, None)
    # Latents are small (a few KB per tile): materialising them once spares every epoch a re-read.
    parts = [
        (read_latents(loc, "train", pseudo_labels=labels).materialize(), sum(m["counts"]["train"].values()), w)
        for loc, m, (_, w) in zip(locs, manifests, latents)
    ]
    loop_config = {
        "latent_shape": manifests[0]["latent_shape"],
        "scale_factor": scale_factor,
        "init_weights": init_weights,
        "budget": budget,
        "num_classes": len(classes) if classes else None,
    }
    train = mix_by_weight(parts, min_rows=min_epoch_rows(cfg, cfg.diffusion.batch_size or cfg.data.batch_size))
    result = fit(cfg, diffusion_loop, loop_config, {"train": train}, run_loc)
    d = cfg.diffusion
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(prefix="vae-") as vae_tmp:
        DDPMScheduler(
            num_train_timesteps=d.num_train_timesteps,
            beta_start=d.beta_start,
            beta_end=d.beta_end,
            beta_schedule=d.beta_schedule,
            prediction_type=d.prediction_type,
            clip_sample=False,
        ).save_pretrained(tmp)
        vae_local = download_dir(open_location(vae_dir, cfg.storage), vae_tmp)
        export(
            result,
            run_loc,
            {"unet_ema": "unet"},
            {
                "kind": "ldm",
                "autoencoder": vae_dir,
                "scale_factor": scale_factor,
                "latent_shape": manifests[0]["latent_shape"],
                "latents": [{"uri": loc.uri, "weight": w} for loc, (_, w) in zip(locs, latents)],
                "finetuned_from": parent,
                "classes": classes,
                "pseudo_labels": pseudo_summary,
                "config": cfg.to_dict(),
            },
            extra_dirs={"scheduler": tmp, "vae": vae_local},
        )
    return read_run_info(run_loc)


class EMA:
    """Exponential moving average of a model's weights (kept as a full model, so it saves as one)."""

    def __init__(self, model, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.warmup = warmup

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        # Warm-up as in diffusers' EMAModel: early averages forget the starting weights fast.
        decay = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        # One multi-tensor kernel over all parameters, not a Python loop of small ones.
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout: oneDNN's (CPU) and cuDNN's (tensor cores) fast path for convolutions."""
    return x.contiguous(memory_format=torch.channels_last)


def diffusion_loop(config: dict) -> None:
    """The worker loop. With ``config["num_classes"]`` the UNet has a class embedding (started at
    zero, so the fine-tune begins as the unconditional model): labeled latents train with their
    class (dropped to the null class with ``guidance.label_dropout``), unlabeled ones (label −1)
    with the null class."""
    budget = config["budget"]
    runner = StepRunner(config, budget["name"], rank_stride=1000)
    cfg = runner.cfg
    d = cfg.diffusion
    c, side, _ = config["latent_shape"]
    num_classes = config.get("num_classes")
    unet = build_unet(cfg.unet, side, c, d.num_train_timesteps, num_classes=num_classes)
    if config.get("init_weights") is not None:
        missing, unexpected = unet.load_state_dict(config["init_weights"], strict=False)
        new = {"class_embedding.weight"} if num_classes is not None else set()
        if set(missing) != new or unexpected:
            raise RuntimeError(f"pre-trained weights do not fit this UNet: missing {missing}, unexpected {unexpected}")
        if num_classes is not None:
            torch.nn.init.zeros_(unet.class_embedding.weight)
    unet.to(memory_format=torch.channels_last)
    ema = EMA(unet, d.ema_decay, d.ema_warmup)
    runner.restore({"unet": unet, "unet_ema": ema.model}, list(unet.parameters()), lr=budget["lr"])
    model = ray.train.torch.prepare_model(unet)
    if d.bf16 and runner.rank == 0 and not bf16_is_native(runner.device):
        # Still autocast (the code a GPU runs), but say what it costs.
        log.warning(
            f"[{budget['name']}] diffusion.bf16 on {runner.device.type} without bf16 hardware: autocast emulates it, "
            "many times slower than fp32; set diffusion.bf16=false on this machine"
        )
    schedule = NoiseSchedule.from_config(d)
    scale = float(config["scale_factor"])
    batch_size = d.batch_size or cfg.data.batch_size
    train = ray.train.get_dataset_shard("train")
    for batch in runner.batches(train, batch_size, until=budget["max_steps"], local_shuffle_buffer_size=4 * batch_size):
        z0 = batch["latent"] * scale
        if cfg.data.augment:
            z0 = random_dihedral(z0)
        noise = torch.randn_like(z0)
        t = torch.randint(0, d.num_train_timesteps, (len(z0),), device=runner.device)
        class_labels = None
        if num_classes is not None:
            y = batch["label"]
            dropped = torch.rand(len(y), device=runner.device) < cfg.guidance.label_dropout
            class_labels = torch.where((y < 0) | dropped, num_classes, y)
        with torch.autocast(runner.device.type, dtype=torch.bfloat16, enabled=d.bf16):
            pred = model(channels_last(schedule.q_sample(z0, t, noise)), t, class_labels=class_labels).sample
        diff = pred.float() - schedule.target(z0, noise, t, d.prediction_type)
        per_sample = (diff.abs() if d.loss == "l1" else diff**2).mean(dim=(1, 2, 3))
        if d.min_snr_gamma > 0:
            per_sample = per_sample * schedule.min_snr_weight(t, d.min_snr_gamma, d.prediction_type)
        loss = per_sample.mean()
        runner.record(len(z0), loss=loss.item())
        # Clipped at 1: the ε-loss's gradient spikes at small t early in training (guided-diffusion and
        # DiT train without, at far larger batches).
        lr = warmup_cosine(budget["lr"], runner.step, budget["warmup_steps"])
        if runner.optimizer_step(loss, lr, accumulate=d.grad_accum_steps, clip=1.0):
            ema.update(unet, runner.step - 1)
            runner.log(
                total=budget["max_steps"],
                log_every=d.log_every,
                checkpoint_every=d.checkpoint_every,
                phase_end=runner.step >= budget["max_steps"],
            )
