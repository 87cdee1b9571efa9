"""Latent-diffusion training step: ours against a diffusers-style loop, in one run.

    .venv/bin/python bench/train_ldm.py [--steps 20] [--rounds 3] [--batch N] [--config cpu] [KEY=VALUE ...]

* ours: the step `histodiff pretrain` runs — latents come from the latent cache (encoded once by
  `histodiff encode-latents`), UNet forward/backward on them in channels-last layout, fused AdamW,
  a multi-tensor EMA update (the same helpers as histodiff_ray/train/diffusion.py).
* baseline: the loop of diffusers' examples/unconditional_image_generation/train_unconditional.py
  adapted to latents, as most LDM fine-tuning scripts do it — every step decodes the tiles,
  normalises them, runs the VAE encoder (no grad, fp32), samples the posterior, then the same UNet
  step with torch's default AdamW and diffusers' EMAModel. Same UNet, same batch, same tiles (real
  crc5 tiles from ../shared/data).

Each variant runs in its own process (so peak RSS is its own) on the same warmed-up settings, and
prints latent samples/s; the script prints the ratio, each peak, and the UNet step's achieved
GFLOP/s (FLOPs counted by torch's FlopCounterMode: forward + backward) against this CPU's
theoretical fp32 peak (cores × clock × FMA width from /proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISTODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_tiles(n: int, size: int) -> np.ndarray:
    paths = sorted((DATA / "crc5" / "train" / "T").glob("*.jpg"))[:n]
    if len(paths) < n:
        sys.exit(f"need {n} tiles under {DATA}/crc5/train/T (set HISTODIFF_SHARED_DATA)")
    tiles = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)) for p in paths]
    # Stored as the shards store them (PNG bytes): both variants start from the same inputs.
    out = []
    for t in tiles:
        buf = io.BytesIO()
        Image.fromarray(t).save(buf, format="PNG")
        out.append(buf.getvalue())
    return np.array(out, dtype=object)


def run_variant(variant: str, steps: int, batch: int, config: str, overrides: list[str]) -> dict:
    from histodiff_ray.config import load_config
    from histodiff_ray.diffusion.schedule import NoiseSchedule
    from histodiff_ray.models.autoencoder import build_autoencoder
    from histodiff_ray.models.unet import build_unet
    from histodiff_ray.train.diffusion import EMA, channels_last
    from histodiff_ray.train.runner import adamw

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    side = cfg.data.tile_size // cfg.autoencoder.downsample_factor
    vae = build_autoencoder(cfg.autoencoder, cfg.data.tile_size).eval()
    unet = build_unet(cfg.unet, side, cfg.autoencoder.latent_channels)
    if variant == "ours":
        unet.to(memory_format=torch.channels_last)
        ema = EMA(unet, cfg.diffusion.ema_decay)
        opt = adamw(unet.parameters(), lr=cfg.diffusion.lr)
        update_ema = ema.update
    else:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=cfg.diffusion.ema_decay, use_ema_warmup=True)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.diffusion.lr)
        update_ema = lambda model, i: ema.step(model.parameters())  # noqa: E731
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    pngs = load_tiles(batch * 4, cfg.data.tile_size)

    def pixels(i: int) -> torch.Tensor:
        chunk = pngs[(i * batch) % len(pngs) :][:batch]
        arr = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in chunk])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    cache = None
    if variant == "ours":  # the latent cache, built once outside the timed loop
        with torch.no_grad():
            cache = [vae.encode(pixels(i)).latent_dist.mean for i in range(4)]

    def step(i: int) -> None:
        if cache is not None:
            z0 = cache[i % 4]
        else:
            with torch.no_grad():
                z0 = vae.encode(pixels(i)).latent_dist.sample()
        z0 = z0 * 0.2
        noise = torch.randn_like(z0)
        t = torch.randint(0, schedule.num_timesteps, (len(z0),))
        z_t = schedule.q_sample(z0, t, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.diffusion.bf16 and variant == "ours"):
            pred = unet(channels_last(z_t) if variant == "ours" else z_t, t).sample
        loss = F.l1_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        update_ema(unet, i)

    for i in range(3):  # warm-up: allocator, oneDNN kernels
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    seconds = time.perf_counter() - start
    result = {
        "variant": variant,
        "samples_per_s": steps * batch / seconds,
        "step_s": seconds / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if variant == "ours":
        from torch.utils.flop_counter import FlopCounterMode

        z = cache[0]
        counter = FlopCounterMode(display=False)
        with counter:
            unet(z, torch.randint(0, 1000, (len(z),))).sample.float().abs().mean().backward()
        result["unet_step_gflop"] = counter.get_total_flops() / 1e9
        result["unet_gflops_achieved"] = result["unet_step_gflop"] / result["step_s"]
    return result


def cpu_peak_gflops() -> tuple[float, str]:
    text = Path("/proc/cpuinfo").read_text()
    lines = text.splitlines()
    flags = next((line for line in lines if line.startswith("flags")), "")
    mhz = [float(line.split(":")[1]) for line in lines if line.startswith("cpu MHz")]
    model = next((line.split(":")[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    ghz = (max(mhz) if mhz else 2000.0) / 1000
    # fp32 FLOPs per cycle per core: two FMA units × vector lanes × 2 (multiply + add).
    per_cycle = 64 if " avx512f" in flags else 32 if " fma" in flags else 8
    cores = os.cpu_count() or 1
    return cores * ghz * per_cycle, f"{model}, {cores} cores × {ghz:.2f} GHz × {per_cycle} FLOP/cycle"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=None, help="default: the profile's data.batch_size")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating ours/baseline rounds; the median is reported"
    )
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.batch is None:
        from histodiff_ray.config import load_config

        args.batch = load_config(args.config, args.overrides).data.batch_size
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.config, args.overrides)))
        return
    # Rounds alternate the variants, so drift in the machine's speed hits both; the median round counts.
    rounds = []
    for r in range(args.rounds):
        results = {}
        for variant in ("ours", "baseline"):
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--config",
                args.config,
                *args.overrides,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
        ratio = results["ours"]["samples_per_s"] / results["baseline"]["samples_per_s"]
        rounds.append((ratio, results))
        print(
            f"round {r + 1}: ours {results['ours']['samples_per_s']:6.1f}, baseline "
            f"{results['baseline']['samples_per_s']:6.1f} "
            f"latent samples/s (batch {args.batch}): {ratio:.2f}x",
            flush=True,
        )
    ratio, results = sorted(rounds, key=lambda x: x[0])[len(rounds) // 2]
    ours, base = results["ours"], results["baseline"]
    peak, how = cpu_peak_gflops()
    print(f"ratio ours/baseline, median of {len(rounds)} rounds: {ratio:.2f}x (goal >= 2x)")
    print(f"peak RSS: ours {ours['peak_rss_mb']:.0f} MB, baseline {base['peak_rss_mb']:.0f} MB")
    print(
        f"UNet train step: {ours['unet_step_gflop']:.1f} GFLOP, {ours['unet_gflops_achieved']:.1f} GFLOP/s achieved "
        f"= {100 * ours['unet_gflops_achieved'] / peak:.1f}% of the fp32 peak {peak:.0f} GFLOP/s ({how})"
    )


if __name__ == "__main__":
    main()
