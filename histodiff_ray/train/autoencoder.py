"""Stage 1: the KL autoencoder, trained without labels on the train split of one or more tile sets.

    histodiff train-autoencoder --tiles s3://bucket/tiles/pool --tiles s3://bucket/tiles/crc5 --run s3://bucket/runs/ae

Three phases on one step counter (``autoencoder.*``): ``max_steps`` of the whole model on LDM's
objective (L1 + KL), then ``decoder_steps`` of the decoder alone on L1 + MSE, then ``gan_steps`` of
the decoder alone against a PatchGAN discriminator. The encoder is frozen after the first phase, so
the latents stay as they were; a finished run gains a later phase when re-run with it raised. The
run leaves ``RUN/model/vae`` (``AutoencoderKL.from_pretrained``), ``RUN/reconstructions.png`` and
its val scores per tile set in ``RUN/run.json``.
"""

from __future__ import annotations

import json
import tempfile
from functools import partial

import numpy as np
import ray.train.torch
import torch

from histodiff_ray.config import Config
from histodiff_ray.console import logger
from histodiff_ray.data.tiles import decode_images, load_tile_table, read_tiles
from histodiff_ray.ldm import save_png, tile_grid
from histodiff_ray.metrics import psnr, ssim
from histodiff_ray.models.autoencoder import (
    PatchDiscriminator,
    adversarial_decoder_loss,
    autoencoder_loss,
    build_autoencoder,
    decoder_loss,
    load_autoencoder,
    reconstruct,
)
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import Location, download_dir, open_location, read_run_info, write_atomic
from histodiff_ray.train.runner import StepRunner, export, fit, warmup_cosine

log = logger(__name__)


def train_autoencoder(cfg: Config, tiles: list[str], run: str) -> dict:
    """Train the KL autoencoder on the train split of one or more tile sets (labels unused)."""
    init_ray(cfg)
    run_loc = open_location(run, cfg.storage)
    locs = [open_location(t, cfg.storage) for t in tiles]
    # Shuffled across the tile sets: streamed one after the other, the decoder tunes itself to the
    # last one. Val too, so that a checkpoint's first autoencoder.val_tiles are a random mix of all
    # sets (a different one each time: Ray Data's seeded shuffle still follows the order blocks
    # arrive in); the end of each phase is scored on all of them.
    train = read_tiles(locs, "train", augment=cfg.data.augment, shuffle=True)
    val = read_tiles(locs, "val", shuffle=True)
    result = fit(cfg, autoencoder_loop, {}, {"train": train, "val": val}, run_loc)
    export(
        result,
        run_loc,
        {"vae": "vae"},
        {"kind": "autoencoder", "tiles": [loc.uri for loc in locs], "config": cfg.to_dict()},
    )
    per_set = write_reconstructions(run_loc, locs)
    info = {**read_run_info(run_loc), "val_by_tile_set": per_set}
    write_atomic(run_loc.join("run.json"), json.dumps(info, indent=1, sort_keys=True).encode())
    return info


class AutoencoderObjective(torch.nn.Module):
    """Reconstruction and KL in one forward, so DDP sees (and syncs) the whole computation."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        return recon, posterior.kl()  # KL summed over latent dimensions, one value per tile


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
    """The worker loop: the three phases in turn, each from where the run's step counter stands."""
    runner = StepRunner(config, "autoencoder")
    cfg = runner.cfg
    ae = cfg.autoencoder
    vae = build_autoencoder(ae, cfg.data.tile_size)
    models, groups = {"vae": vae}, [{"params": list(vae.parameters())}]
    if ae.gan_steps:  # a run may gain this phase after it finished: the discriminator then starts fresh
        disc = models["disc"] = PatchDiscriminator(channels=ae.gan_channels, n_layers=ae.gan_layers)
        groups.append({"params": list(disc.parameters()), "weight_decay": 0.0})
    # Weight decay 0.01 (torch's AdamW default) is what the cpu recipe was measured with. No gradient
    # clipping: LDM's autoencoder recipe has none, and its losses are per-pixel means of O(0.1).
    optimizer = runner.restore(models, groups, lr=ae.lr, weight_decay=0.01)
    decoder_end = ae.max_steps + ae.decoder_steps
    total = decoder_end + ae.gan_steps
    batch_size = ae.batch_size or cfg.data.batch_size
    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    for phase, start, end in (
        ("joint", 0, ae.max_steps),
        ("decoder", ae.max_steps, decoder_end),
        ("adversarial", decoder_end, total),
    ):
        if runner.step >= end:
            continue
        # Frozen parameters get no gradient, so AdamW leaves them (and their weight decay) alone. DDP
        # syncs the parameters that require grad when it is built: one wrapper per phase.
        for frozen in (vae.encoder, vae.quant_conv):
            frozen.requires_grad_(phase == "joint")
        if phase == "adversarial":
            model = ray.train.torch.prepare_model(AdversarialDecoderObjective(vae, disc))
            for group in optimizer.param_groups:
                group["betas"] = (0.5, 0.9)  # LDM's and pix2pix's for adversarial training
            base_lr, warmup = ae.gan_lr, min(50, ae.gan_steps // 10)
        elif phase == "decoder":
            model = ray.train.torch.prepare_model(AutoencoderObjective(vae))
            base_lr, warmup = ae.decoder_lr, min(50, ae.decoder_steps // 10)
        else:
            model = ray.train.torch.prepare_model(AutoencoderObjective(vae))
            base_lr, warmup = ae.lr, ae.warmup_steps
        for batch in runner.batches(train, batch_size, until=end):
            x = batch["image"]
            extra = {}
            if phase == "adversarial":
                recon, *disc_out = model(x)
                loss, _, gen, dis, weight = adversarial_decoder_loss(
                    x,
                    recon,
                    *disc_out,
                    vae.decoder.conv_out.weight,
                    gan_weight=ae.gan_weight,
                    feature_matching=ae.gan_feature_matching,
                )
                extra = {"gen_loss": gen.item(), "disc_loss": dis.item(), "gan_weight": weight.item()}
            elif phase == "decoder":
                recon, _ = model(x)
                loss, _, _ = decoder_loss(x, recon)
            else:
                recon, kl_per_tile = model(x)
                loss, _, _ = autoencoder_loss(x, recon, kl_per_tile, ae.kl_weight)
                extra = {"kl": kl_per_tile.mean().item()}
            runner.optimizer_step(loss, warmup_cosine(base_lr, runner.step - start, warmup, cosine_to=end - start))
            runner.record(len(x), l1=(x - recon).abs().mean().item(), mse=((x - recon) ** 2).mean().item(), **extra)
            # The end of each phase is checkpointed and scored on all val tiles.
            phase_end = runner.step >= end
            runner.log(
                total=total,
                log_every=ae.log_every,
                checkpoint_every=ae.checkpoint_every,
                phase_end=phase_end,
                evaluate=partial(
                    evaluate_autoencoder, vae, val, runner.device, batch_size, None if phase_end else ae.val_tiles
                ),
            )


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
    if n == 0:  # tile sets too small for a val split: no score, rather than a score of 0
        return {"val_tiles": 0}
    return {"val_psnr": total_psnr / n, "val_ssim": total_ssim / n, "val_tiles": int(n)}


def write_reconstructions(run: Location, tile_sets: list[Location], per_set: int = 16, columns: int = 8) -> dict:
    """Reconstruction quality of the finished autoencoder on the whole val split of each tile set
    (PSNR, SSIM, colour error: the mean absolute difference of the tile's mean R, G, B in grey levels),
    returned by tile set; and RUN/reconstructions.png: the first val tiles of each set, each row of
    reals followed by the row of their reconstructions (posterior mean, decoded)."""
    with tempfile.TemporaryDirectory(prefix="vae-") as tmp:
        vae = load_autoencoder(download_dir(run.join("model", "vae"), tmp)).eval()

    scores, shown = {}, []
    for loc in tile_sets:
        tiles = decode_images(load_tile_table(loc, "val", columns=["image"]).column("image"))
        if not len(tiles):
            continue
        recon = reconstruct(vae, tiles)
        a, b = (torch.from_numpy(t).permute(0, 3, 1, 2).float() / 255 for t in (tiles, recon))
        colour = (a.mean(dim=(2, 3)) - b.mean(dim=(2, 3))).abs().mean() * 255
        scores[loc.uri] = {
            "val_tiles": len(tiles),
            "psnr": psnr(a, b).mean().item(),
            "ssim": ssim(a, b).mean().item(),
            "colour_error": colour.item(),
        }
        shown.append((tiles[:per_set], recon[:per_set]))
    if not shown:
        log.info(
            "[autoencoder] no val tiles in %s: no reconstruction scores or grid",
            ", ".join(loc.uri for loc in tile_sets),
        )
        return scores
    real = np.concatenate([t for t, _ in shown])
    recon = np.concatenate([r for _, r in shown])
    blank = np.full((columns, *real.shape[1:]), 255, np.uint8)  # pads a short last row, so reals sit above their own

    def row(tiles):
        return np.concatenate([tiles, blank[: columns - len(tiles)]])

    rows = [row(block[start : start + columns]) for start in range(0, len(real), columns) for block in (real, recon)]
    save_png(tile_grid(np.concatenate(rows), columns=columns), run.join("reconstructions.png"))
    return scores
