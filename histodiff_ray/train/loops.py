"""Ray Train loops (``train_loop_per_worker`` functions) for the autoencoder and the diffusion model.

They follow one pattern: build the model from config; put it on its device, build the optimizer
and resume both from ``ray.train.get_checkpoint()`` when Ray Train restarts or a run is
re-launched under the same name (``start_or_resume``, in that order); wrap with
``prepare_model`` (DDP over gloo on CPU, NCCL on GPU: the same code); stream batches from
``get_dataset_shard``; report metrics every ``log_every`` steps and a checkpoint every
``checkpoint_every`` steps. Every worker reports at the same steps (``report`` is a barrier).

A checkpoint folder holds diffusers-format model folders (safetensors), ``optimizer.pt`` (tensors
only, read back with ``weights_only=True``), ``state.json`` (step, metrics history) and the
metrics as ``metrics.csv`` and TensorBoard events. No checkpoint is ever unpickled.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from histodiff_ray.augment import random_dihedral
from histodiff_ray.config import UNetConfig, config_from_dict
from histodiff_ray.diffusion.schedule import NoiseSchedule
from histodiff_ray.metrics import psnr, ssim
from histodiff_ray.models.autoencoder import (PatchDiscriminator, adversarial_decoder_loss, autoencoder_loss,
                                              build_autoencoder, decoder_loss)
from histodiff_ray.models.unet import build_unet


class AutoencoderObjective(torch.nn.Module):
    """Reconstruction and KL in one forward, so DDP sees (and syncs) the whole computation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return recon, posterior.kl()  # KL summed over latent dimensions, one value per tile


def write_checkpoint(folder: str, models: dict, optimizer, state: dict) -> None:
    """Models as diffusers folders (safetensors), the optimizer's state and the loop's ``state``."""
    for name, model in models.items():
        # safetensors stores contiguous tensors only: save a copy in the default layout.
        copy.deepcopy(model).to(memory_format=torch.contiguous_format).save_pretrained(
            os.path.join(folder, name), safe_serialization=True)
    torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(state, f)
    write_metrics(state["history"], folder)


def _save_checkpoint(models: dict, optimizer, state: dict):
    import ray.train

    folder = tempfile.mkdtemp(prefix="ckpt-")  # deleted by ray.train.report once it is in storage
    write_checkpoint(folder, models, optimizer, state)
    return ray.train.Checkpoint.from_directory(folder)


def place_and_restore(models: dict, make_optimizer, device, folder: str | None):
    """Put ``models`` on ``device``, then build their optimizer (``make_optimizer()``), then restore
    both from the checkpoint ``folder`` if there is one; returns (optimizer, the loop's state).

    The order is the point: ``Optimizer.load_state_dict`` puts each state tensor where its
    parameter is at that moment, so state restored before the model moves stays behind on the CPU
    and the first step after a restart fails on a GPU. (``device`` may be anything ``Module.to``
    takes; the test moves to another dtype, which a CPU can show.)"""
    from safetensors.torch import load_file

    if folder is not None:  # weights load on the CPU, before the move
        for name, model in models.items():
            weights = os.path.join(folder, name, "diffusion_pytorch_model.safetensors")
            if os.path.exists(weights):  # a model that a later phase adds (a discriminator) starts fresh
                model.load_state_dict(load_file(weights))
    for model in models.values():
        model.to(device)
    optimizer = make_optimizer()
    if folder is None:
        return optimizer, {}
    saved = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, map_location="cpu")
    # Parameter groups that a later phase adds start fresh; parameters are numbered across groups in
    # order, so the new groups' numbers follow the saved ones.
    saved["param_groups"] += optimizer.state_dict()["param_groups"][len(saved["param_groups"]):]
    optimizer.load_state_dict(saved)
    with open(os.path.join(folder, "state.json")) as f:
        return optimizer, json.load(f)


def start_or_resume(models: dict, make_optimizer, device):
    """``place_and_restore`` from Ray Train's latest checkpoint of this run, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return place_and_restore(models, make_optimizer, device, None)
    # Each worker downloads its own copy: `as_directory` shares one local folder between the
    # workers of a node, and one of them may clean it up while another is still reading.
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        return place_and_restore(models, make_optimizer, device, checkpoint.to_directory(tmp))


def write_metrics(history: list[dict], folder: str) -> None:
    """metrics.csv and a TensorBoard events file, rewritten from the whole history (so a run that
    was restarted still has one continuous curve)."""
    if not history:
        return
    keys = sorted({k for row in history for k in row})
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    from tensorboardX import SummaryWriter

    with SummaryWriter(os.path.join(folder, "tensorboard"), flush_secs=1) as tb:
        for row in history:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])


def _progress(kind: str, row: dict, max_steps: int) -> None:
    """One line per logged step on rank 0; Ray forwards worker output to the driver's console."""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))
    print(f"[{kind}] step {row['step']}/{max_steps}: {shown}", flush=True)


def _set_lr(optimizer, base_lr: float, step: int, warmup: int, cosine_to: int | None = None) -> float:
    """Linear warm-up over ``warmup`` steps; then constant, or a cosine decay to 0 at step ``cosine_to``."""
    lr = base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr
    if cosine_to is not None and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, cosine_to - warmup))
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class AdversarialDecoderObjective(torch.nn.Module):
    """The adversarial decoder phase's forward (encoder frozen): the reconstruction, the
    discriminator's logits and features of it through *detached* discriminator weights (so that the
    decoder's terms move the decoder only), its features of the real tiles, and its logits for the
    real tiles and the detached reconstructions (its own hinge loss). One forward and one backward
    for both models, as DDP wants."""

    def __init__(self, vae, disc):
        super().__init__()
        self.vae, self.disc = vae, disc

    def forward(self, x):
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample()
        recon = self.vae.decode(z).sample
        detached = {name: p.detach() for name, p in self.disc.named_parameters()}
        fake_logits, fake_features = torch.func.functional_call(self.disc, detached, (recon,))
        with torch.no_grad():
            _, real_features = self.disc(x)
        disc_logits, _ = self.disc(torch.cat([x, recon.detach()]))
        return recon, fake_logits, fake_features, real_features, disc_logits


def autoencoder_loop(config: dict) -> None:
    """``max_steps`` of the whole autoencoder on LDM's objective, then ``decoder_steps`` of the decoder
    alone on L1 + MSE, then ``gan_steps`` of the decoder alone against a PatchGAN discriminator; the
    encoder is frozen after the first phase, so the latents stay as they were."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    ae = cfg.autoencoder
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    vae = build_autoencoder(ae, cfg.data.tile_size)
    models, groups = {"vae": vae}, [{"params": list(vae.parameters())}]
    if ae.gan_steps:  # a run may gain this phase after it finished: the discriminator then starts fresh
        disc = models["disc"] = PatchDiscriminator(channels=ae.gan_channels, n_layers=ae.gan_layers)
        groups.append({"params": list(disc.parameters()), "weight_decay": 0.0})
    optimizer, state = start_or_resume(models, lambda: torch.optim.AdamW(groups, lr=ae.lr), device)
    step, history = state.get("step", 0), state.get("history", [])
    decoder_end = ae.max_steps + ae.decoder_steps
    total = decoder_end + ae.gan_steps
    batch_size = ae.batch_size or cfg.data.batch_size
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    for phase, end in (("joint", ae.max_steps), ("decoder", decoder_end), ("adversarial", total)):
        if step >= end:
            continue
        # Frozen parameters get no gradient, so AdamW leaves them (and their weight decay) alone. DDP
        # syncs the parameters that require grad when it is built: one wrapper per phase.
        for frozen in (vae.encoder, vae.quant_conv):
            frozen.requires_grad_(phase == "joint")
        if phase == "adversarial":
            model = ray.train.torch.prepare_model(AdversarialDecoderObjective(vae, disc))
            for group in optimizer.param_groups:
                group["betas"] = (0.5, 0.9)  # LDM's and pix2pix's for adversarial training
        else:
            model = ray.train.torch.prepare_model(AutoencoderObjective(vae))
        window, started = [], time.perf_counter()
        while step < end:
            for batch in train.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device):
                x = batch["image"]
                extra = {}
                if phase == "adversarial":
                    recon, *disc_out = model(x)
                    loss, _, gen, dis, weight = adversarial_decoder_loss(
                        x, recon, *disc_out, vae.decoder.conv_out.weight, gan_weight=ae.gan_weight,
                        feature_matching=ae.gan_feature_matching)
                    extra = {"gen_loss": gen.item(), "disc_loss": dis.item(), "gan_weight": weight.item()}
                    _set_lr(optimizer, ae.gan_lr, step - decoder_end, min(50, ae.gan_steps // 10), cosine_to=ae.gan_steps)
                elif phase == "decoder":
                    recon, _ = model(x)
                    loss, _, _ = decoder_loss(x, recon)
                    _set_lr(optimizer, ae.decoder_lr, step - ae.max_steps, min(50, ae.decoder_steps // 10), cosine_to=ae.decoder_steps)
                else:
                    recon, kl_per_tile = model(x)
                    loss, _, _ = autoencoder_loss(x, recon, kl_per_tile, ae.kl_weight)
                    extra = {"kl": kl_per_tile.mean().item()}
                    _set_lr(optimizer, ae.lr, step, ae.warmup_steps, cosine_to=ae.max_steps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                window.append({"l1": (x - recon).abs().mean().item(), "mse": ((x - recon) ** 2).mean().item(), **extra,
                               "tiles": len(x)})
                # The end of each phase is checkpointed and scored on all val tiles.
                phase_end = step >= end
                if step % ae.log_every == 0 or step % ae.checkpoint_every == 0 or phase_end:
                    elapsed = time.perf_counter() - started
                    row = {"step": step, **{k: sum(w[k] for w in window) / len(window) for k in window[0] if k != "tiles"},
                           "tiles_per_s": sum(w["tiles"] for w in window) / max(elapsed, 1e-9)}
                    window, started = [], time.perf_counter()
                    checkpoint = None
                    if step % ae.checkpoint_every == 0 or phase_end:
                        if rank == 0:
                            row.update(evaluate_autoencoder(vae, val, device, batch_size, None if phase_end else ae.val_tiles))
                            history.append(row)
                            checkpoint = _save_checkpoint(models, optimizer, {"step": step, "history": history})
                    elif rank == 0:
                        history.append(row)
                    if rank == 0:
                        _progress("autoencoder", row, total)
                    ray.train.report(row, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
                if step >= end:
                    break


@torch.no_grad()
def evaluate_autoencoder(vae, val, device, batch_size: int, max_tiles: int | None = None) -> dict:
    """Reconstruction PSNR and SSIM over the val split, or its first ``max_tiles`` (images in [0, 1])."""
    vae.eval()
    total_psnr = total_ssim = n = 0.0
    for batch in val.iter_torch_batches(batch_size=batch_size, device=device):
        if max_tiles is not None and n >= max_tiles:
            break
        x = batch["image"]
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        a, b = (x + 1) / 2, (recon + 1) / 2
        total_psnr += psnr(a, b).sum().item()
        total_ssim += ssim(a, b).sum().item()
        n += len(x)
    vae.train()
    return {"val_psnr": total_psnr / max(n, 1), "val_ssim": total_ssim / max(n, 1), "val_tiles": int(n)}


class EMA:
    """Exponential moving average of a model's weights (kept as a full model, so it saves as one)."""

    def __init__(self, model, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        # Warm-up as in diffusers' EMAModel: early averages forget the random initialisation fast.
        decay = min(self.decay, (1 + step) / (10 + step))
        # One multi-tensor kernel over all parameters, not a Python loop of small ones.
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def adamw(params, lr: float, weight_decay: float = 0.0):
    """AdamW with torch's fused kernel (CPU and CUDA): the default on CPU is a Python loop over
    the parameters, which costs a tenth of a small UNet's step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC layout: oneDNN's (CPU) and cuDNN's (tensor cores) fast path for convolutions."""
    return x.contiguous(memory_format=torch.channels_last)


def diffusion_loop(config: dict) -> None:
    """DDPM ε-prediction training of the latent UNet: pre-training, or fine-tuning when
    ``config["init_weights"]`` holds a pre-trained state dict (and ``config["finetune"]`` is set).
    With ``config["num_classes"]`` the UNet gets a class embedding for classifier-free guidance:
    labeled latents train with their class (dropped to the null class with
    ``guidance.label_dropout``), unlabeled ones (label −1) with the null class."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    d = cfg.diffusion
    lr, max_steps, warmup = (d.finetune_lr, d.finetune_steps, d.finetune_warmup_steps) if config.get("finetune") else (d.lr, d.max_steps, d.warmup_steps)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed + 1000 * rank)
    device = ray.train.torch.get_device()
    c, side, _ = config["latent_shape"]
    num_classes = config.get("num_classes")
    unet = build_unet(cfg.unet, side, c, d.num_train_timesteps, num_classes=num_classes)
    if config.get("init_weights") is not None:
        missing, unexpected = unet.load_state_dict(config["init_weights"], strict=False)
        new = {"class_embedding.weight"} if num_classes is not None else set()
        if set(missing) != new or unexpected:
            raise RuntimeError(f"pre-trained weights do not fit this UNet: missing {missing}, unexpected {unexpected}")
        if num_classes is not None:  # zero class embedding: the fine-tune starts as the unconditional model
            torch.nn.init.zeros_(unet.class_embedding.weight)
    unet.to(memory_format=torch.channels_last)
    ema = EMA(unet, d.ema_decay)
    optimizer, state = start_or_resume({"unet": unet, "unet_ema": ema.model}, lambda: adamw(unet.parameters(), lr=lr), device)
    step, history = state.get("step", 0), state.get("history", [])
    resumed_from = step if state else None
    model = ray.train.torch.prepare_model(unet)
    schedule = NoiseSchedule.from_config(d)
    scale = float(config["scale_factor"])
    use_bf16 = d.bf16
    batch_size = d.batch_size or cfg.data.batch_size
    train = ray.train.get_dataset_shard("train")
    window, micro, started = [], 0, time.perf_counter()
    while step < max_steps:
        for batch in train.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                              local_shuffle_buffer_size=4 * batch_size):
            z0 = batch["latent"] * scale
            if cfg.data.augment:
                z0 = random_dihedral(z0)
            noise = torch.randn_like(z0)
            t = torch.randint(0, d.num_train_timesteps, (len(z0),), device=device)
            class_labels = None
            if num_classes is not None:
                y = batch["label"]
                dropped = torch.rand(len(y), device=device) < cfg.guidance.label_dropout
                class_labels = torch.where((y < 0) | dropped, num_classes, y)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                pred = model(channels_last(schedule.q_sample(z0, t, noise)), t, class_labels=class_labels).sample
            err = (pred.float() - noise).abs() if d.loss == "l1" else (pred.float() - noise) ** 2
            per_sample = err.mean(dim=(1, 2, 3))
            if d.min_snr_gamma > 0:
                per_sample = per_sample * schedule.min_snr_weight(t, d.min_snr_gamma)
            loss = per_sample.mean()
            (loss / d.grad_accum_steps).backward()
            window.append((loss.item(), len(z0)))
            micro += 1
            if micro % d.grad_accum_steps:
                continue
            current_lr = _set_lr(optimizer, lr, step, warmup)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(unet, step)
            step += 1
            last = step >= max_steps
            if step % d.log_every == 0 or step % d.checkpoint_every == 0 or last:
                elapsed = time.perf_counter() - started
                row = {"step": step, "loss": sum(w[0] for w in window) / len(window), "lr": current_lr,
                       "samples_per_s": sum(w[1] for w in window) / max(elapsed, 1e-9)}
                if resumed_from is not None:
                    row["resumed_from_step"] = resumed_from
                window, started = [], time.perf_counter()
                if rank == 0:
                    history.append(row)
                    _progress("finetune" if config.get("finetune") else "pretrain", row, max_steps)
                checkpoint = None
                if rank == 0 and (step % d.checkpoint_every == 0 or last):
                    checkpoint = _save_checkpoint({"unet": unet, "unet_ema": ema.model}, optimizer,
                                                  {"step": step, "history": history, "resumed_from_step": resumed_from})
                ray.train.report(row, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
            if last:
                break


T_BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))  # as fractions of 1000 train timesteps


def classifier_loop(config: dict) -> None:
    """The noise-aware latent classifier: cross-entropy on z_t = q_sample(z_0, t) at uniform random
    t, so its gradient is meaningful along the whole sampling trajectory (guided-diffusion's recipe;
    HistoDiffAug's official code trains at t=0 only)."""
    import ray.train
    import ray.train.torch

    from histodiff_ray.models.classifier import build_classifier

    cfg = config_from_dict(config["cfg"])
    c, d = cfg.classifier, cfg.diffusion
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed + 2000 + rank)
    device = ray.train.torch.get_device()
    channels, side, _ = config["latent_shape"]
    unet = UNetConfig(**config["unet"]) if config.get("unet") else None
    classifier = build_classifier(c, channels, side, config["num_classes"], unet=unet)
    if config.get("init_weights") is not None:
        classifier.init_from_unet(config["init_weights"])
    optimizer, state = start_or_resume(
        {"classifier": classifier}, lambda: torch.optim.AdamW(classifier.parameters(), lr=c.lr, weight_decay=c.weight_decay), device)
    step, history = state.get("step", 0), state.get("history", [])
    model = ray.train.torch.prepare_model(classifier)
    schedule = NoiseSchedule.from_config(d)
    scale = float(config["scale_factor"])
    batch_size = c.batch_size or cfg.data.batch_size
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    window, started = [], time.perf_counter()
    while step < c.max_steps:
        for batch in train.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                              local_shuffle_buffer_size=4 * batch_size):
            z0 = batch["latent"] * scale
            # Class probabilities to match: the judge's for distilled tiles, one-hot for labeled ones.
            target = batch["target"] if "target" in batch else F.one_hot(batch["label"], config["num_classes"]).float()
            y = target.argmax(1)
            if cfg.data.augment:
                z0 = random_dihedral(z0)
            t = torch.randint(0, d.num_train_timesteps, (len(z0),), device=device)
            logits = model(schedule.q_sample(z0, t, torch.randn_like(z0)), t)
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _set_lr(optimizer, c.lr, step, c.warmup_steps, cosine_to=c.max_steps)
            optimizer.step()
            step += 1
            window.append((loss.item(), (logits.argmax(1) == y).float().mean().item()))
            last = step >= c.max_steps
            if step % c.log_every == 0 or step % c.checkpoint_every == 0 or last:
                row = {"step": step, "loss": sum(w[0] for w in window) / len(window),
                       "train_acc": sum(w[1] for w in window) / len(window),
                       "steps_per_s": len(window) / max(time.perf_counter() - started, 1e-9)}
                window, started = [], time.perf_counter()
                checkpoint = None
                if step % c.checkpoint_every == 0 or last:
                    if rank == 0:
                        row.update(evaluate_classifier(classifier, val, schedule, scale, device, batch_size, cfg.seed))
                        history.append(row)
                        checkpoint = _save_checkpoint({"classifier": classifier}, optimizer, {"step": step, "history": history})
                elif rank == 0:
                    history.append(row)
                if rank == 0:
                    _progress("classifier", row, c.max_steps)
                ray.train.report(row, checkpoint=checkpoint, delete_local_checkpoint_after_upload=True)
            if last:
                break


@torch.no_grad()
def evaluate_classifier(classifier, val, schedule: NoiseSchedule, scale: float, device, batch_size: int, seed: int) -> dict:
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
