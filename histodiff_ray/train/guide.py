"""Stage 3: the noise-aware latent classifier that guides sampling (classifier guidance).

    histodiff train-classifier --latents s3://bucket/latents/crc5 --ldm s3://bucket/runs/finetune \
        --run s3://bucket/runs/guide --pseudo-labels s3://bucket/runs/judge

Cross-entropy on z_t = q_sample(z_0, t) at uniform random t, so that its gradient means something
along the whole sampling trajectory (guided-diffusion's recipe; HistoDiffAug's official code trains
at t = 0 only), on the labeled train latents at the diffusion run's latent scale and noise schedule.
With ``classifier.init_from_unet`` its encoder starts from the diffusion run's UNet down path. Val
accuracy is scored per band of t. A finished run holds ``RUN/model/classifier`` (diffusers folder)
and ``RUN/run.json``.
"""

from __future__ import annotations

import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from histodiff_ray.augment import random_dihedral
from histodiff_ray.config import Config, UNetConfig
from histodiff_ray.data.latents import load_latent_manifest, read_latents
from histodiff_ray.diffusion.schedule import NoiseSchedule
from histodiff_ray.errors import HistodiffError
from histodiff_ray.models.classifier import UNET_ENCODER, build_classifier
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import open_location, read_run_info
from histodiff_ray.train.runner import (
    StepRunner,
    export,
    fit,
    load_unet_weights,
    min_epoch_rows,
    mix_by_weight,
    warmup_cosine,
)

T_BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # as fractions of 1000 train timesteps


def train_classifier(cfg: Config, latents: str, ldm_run: str, run: str, pseudo_labels_from: str | None = None) -> dict:
    """Train the guide for ``ldm_run`` on the labeled train latents of ``latents``. With
    ``pseudo_labels_from`` (a judge) it also learns the judge's class probabilities on every
    unlabeled train tile (knowledge distillation, Hinton et al. 2015): all of them carry signal,
    where a confidence threshold keeps a third and only the judge's easy cases."""
    init_ray(cfg)
    run_loc, latents_loc = open_location(run, cfg.storage), open_location(latents, cfg.storage)
    manifest = load_latent_manifest(latents_loc)
    ldm = read_run_info(open_location(ldm_run, cfg.storage))
    if ldm.get("autoencoder") != manifest["autoencoder"]:
        raise HistodiffError(
            f"{latents} was encoded by {manifest['autoencoder']}, but {ldm_run} "
            f"generates latents of {ldm.get('autoencoder')}; encode the labeled tiles with that autoencoder"
        )
    labeled = sum(manifest["labeled_train"].values())
    batch_size = cfg.classifier.batch_size or cfg.data.batch_size
    if labeled < batch_size * cfg.ray.num_workers:
        key = "classifier.batch_size" if cfg.classifier.batch_size else "data.batch_size"
        raise HistodiffError(
            f"{latents} has {labeled} labeled train tiles, fewer than one batch per worker "
            f"({key}={batch_size} × ray.num_workers={cfg.ray.num_workers}); lower {key}"
        )
    classes = manifest["classes"]
    soft, pseudo_summary = None, None
    if pseudo_labels_from is not None:
        # Here, on the driver, not at the top: the Train workers import this module, and need none of
        # the judge's timm and torchmetrics (about a CPU-second of each one's start, bench/imports.py).
        from histodiff_ray.judge import judge_probabilities  # noqa: PLC0415

        soft, pseudo_summary = judge_probabilities(cfg, pseudo_labels_from, manifest["tiles"])
    loop_config = {
        "latent_shape": manifest["latent_shape"],
        "scale_factor": ldm["scale_factor"],
        "num_classes": len(classes),
    }
    if cfg.classifier.init_from_unet:
        loop_config["unet"] = ldm["config"]["unet"]
        weights = load_unet_weights(open_location(ldm_run, cfg.storage))
        loop_config["init_weights"] = {k: v for k, v in weights.items() if k.startswith(UNET_ENCODER)}
    train = read_latents(latents_loc, "train", labeled_only=True, soft_labels=soft).materialize()
    datasets = {
        "train": mix_by_weight([(train, train.count(), 1.0)], min_rows=min_epoch_rows(cfg, batch_size)),
        "val": read_latents(latents_loc, "val").materialize(),
    }
    result = fit(cfg, classifier_loop, loop_config, datasets, run_loc)
    export(
        result,
        run_loc,
        {"classifier": "classifier"},
        {
            "kind": "classifier",
            "latents": latents_loc.uri,
            "ldm": ldm_run,
            "autoencoder": manifest["autoencoder"],
            "classes": classes,
            "scale_factor": ldm["scale_factor"],
            "latent_shape": manifest["latent_shape"],
            "pseudo_labels": pseudo_summary,
            "config": cfg.to_dict(),
        },
    )
    return read_run_info(run_loc)


def classifier_loop(config: dict) -> None:
    """The worker loop."""
    runner = StepRunner(config, "classifier", seed_offset=2000)
    cfg = runner.cfg
    c, d = cfg.classifier, cfg.diffusion
    channels, side, _ = config["latent_shape"]
    unet = UNetConfig(**config["unet"]) if config.get("unet") else None
    classifier = build_classifier(c, channels, side, config["num_classes"], unet=unet)
    if config.get("init_weights") is not None:
        classifier.init_from_unet(config["init_weights"])
    runner.restore({"classifier": classifier}, list(classifier.parameters()), lr=c.lr, weight_decay=c.weight_decay)
    model = ray.train.torch.prepare_model(classifier)
    schedule = NoiseSchedule.from_config(d)
    scale = float(config["scale_factor"])
    batch_size = c.batch_size or cfg.data.batch_size
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    for batch in runner.batches(train, batch_size, until=c.max_steps, local_shuffle_buffer_size=4 * batch_size):
        z0 = batch["latent"] * scale
        # Class probabilities to match: the judge's for distilled tiles, one-hot for labeled ones.
        target = batch["target"] if "target" in batch else F.one_hot(batch["label"], config["num_classes"]).float()
        if cfg.data.augment:
            z0 = random_dihedral(z0)
        t = torch.randint(0, d.num_train_timesteps, (len(z0),), device=runner.device)
        logits = model(schedule.q_sample(z0, t, torch.randn_like(z0)), t)
        loss = F.cross_entropy(logits, target)
        # No clipping: cross-entropy's gradient is bounded by the logits' (guided-diffusion's classifier has none).
        runner.optimizer_step(loss, warmup_cosine(c.lr, runner.step, c.warmup_steps, cosine_to=c.max_steps))
        runner.record(len(z0), loss=loss.item(), train_acc=(logits.argmax(1) == target.argmax(1)).float().mean().item())
        runner.log(
            total=c.max_steps,
            log_every=c.log_every,
            checkpoint_every=c.checkpoint_every,
            phase_end=runner.step >= c.max_steps,
            evaluate=lambda: evaluate_classifier(classifier, val, schedule, scale, runner.device, batch_size, cfg.seed),
        )


@torch.no_grad()
def evaluate_classifier(
    classifier, val, schedule: NoiseSchedule, scale: float, device, batch_size: int, seed: int
) -> dict:
    """Val accuracy per t bucket (t drawn uniformly inside each bucket, with a fixed seed so
    checkpoints are compared on the same noise)."""
    classifier.eval()
    T = schedule.num_timesteps
    buckets = [(lo * T // 1000, hi * T // 1000) for lo, hi in T_BUCKETS]
    correct, n = [0.0] * len(buckets), 0
    g = torch.Generator().manual_seed(seed)
    for batch in val.iter_torch_batches(batch_size=batch_size, device=device):
        z0, y = batch["latent"] * scale, batch["label"]
        for i, (lo, hi) in enumerate(buckets):
            t = torch.randint(lo, hi, (len(z0),), generator=g).to(device)
            noise = torch.randn(z0.shape, generator=g).to(device)
            correct[i] += (classifier(schedule.q_sample(z0, t, noise), t).argmax(1) == y).sum().item()
        n += len(z0)
    classifier.train()
    row = {f"val_acc_t{lo}_{hi}": correct[i] / max(n, 1) for i, (lo, hi) in enumerate(buckets)}
    row["val_acc"] = sum(correct) / max(n * len(buckets), 1)
    row["val_tiles"] = n
    return row
