"""One GPU, one table: the paper profile's models on the accelerator, in ≤ 8 minutes.

    .venv/bin/python bench/gpu_check.py                          # on a GPU machine, the paper profile
    .venv/bin/python bench/gpu_check.py --device cpu --config cpu --steps 3   # the same script, checked on a CPU

1. **Training step, fp32 vs bf16:** the paper UNet (64×64×3 latents) forward + backward + fused
   AdamW + EMA, as ``train/diffusion.py`` runs it (channels-last, bf16 autocast), at the profile's batch
   and at 8; latents/s and the ratio.
2. **Guided sampling:** tiles/s of classifier-guided generation (UNet + the paper's noise-aware
   guide + the VAE decoder) with DDIM at ``sampling.ddim_steps`` and DPM-Solver++ at 20 steps.
3. **Peak GPU memory** of each part.
4. **Resume after a killed step:** a child process trains the UNet on the device and checkpoints
   after every step (``write_checkpoint``); it is SIGKILLed in the middle of a step; this process
   then resumes from the last checkpoint with ``place_and_restore`` (the step runner's restart path:
   model on the device, then the optimizer, then the state) and takes two more steps.

The models are built from the profile with random weights (nothing is downloaded); speed does not
depend on the weights. Prints one Markdown table; nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from histodiff_ray.config import load_config  # noqa: E402
from histodiff_ray.diffusion.guidance import classifier_cond_fn  # noqa: E402
from histodiff_ray.diffusion.schedule import NoiseSchedule  # noqa: E402
from histodiff_ray.ldm import LatentDiffusion  # noqa: E402
from histodiff_ray.models.autoencoder import build_autoencoder  # noqa: E402
from histodiff_ray.models.classifier import build_classifier  # noqa: E402
from histodiff_ray.models.unet import build_unet  # noqa: E402
from histodiff_ray.train.diffusion import EMA, channels_last  # noqa: E402
from histodiff_ray.train.runner import adamw, place_and_restore, write_checkpoint  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else "-"


def _unet(cfg, device):
    c = cfg.autoencoder.latent_channels
    side = cfg.data.tile_size // cfg.autoencoder.downsample_factor
    return build_unet(cfg.unet, side, c, cfg.diffusion.num_train_timesteps).to(
        device, memory_format=torch.channels_last
    ), (c, side)


def train_step(unet, ema, optimizer, schedule, z0, bf16: bool) -> float:
    """One step of ``diffusion_loop``: noise, UNet under autocast, L1 ε-loss, clipped AdamW, EMA."""
    noise = torch.randn_like(z0)
    t = torch.randint(0, schedule.num_timesteps, (len(z0),), device=z0.device)
    with torch.autocast(z0.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = unet(channels_last(schedule.q_sample(z0, t, noise)), t).sample
    loss = (pred.float() - noise).abs().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(unet, 1)
    return float(loss)


def bench_training(cfg, device, batch: int, steps: int) -> dict:
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    rates = {}
    for bf16 in (False, True):
        _peak_reset(device)
        unet, (c, side) = _unet(cfg, device)
        ema, optimizer = EMA(unet, cfg.diffusion.ema_decay), adamw(unet.parameters(), lr=cfg.diffusion.lr)
        z0 = torch.randn(batch, c, side, side, device=device)
        train_step(unet, ema, optimizer, schedule, z0, bf16)  # warm-up (cuDNN autotune, allocator)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            train_step(unet, ema, optimizer, schedule, z0, bf16)
        _sync(device)
        rates["bf16" if bf16 else "fp32"] = (batch * steps / (time.perf_counter() - start), _peak_gib(device))
        del unet, ema, optimizer
    return rates


def bench_sampling(cfg, device, n: int) -> dict:
    unet, (c, side) = _unet(cfg, device)
    vae = build_autoencoder(cfg.autoencoder, cfg.data.tile_size).to(device, memory_format=torch.channels_last).eval()
    guide = build_classifier(cfg.classifier, c, side, 5).to(device, memory_format=torch.channels_last).eval()
    ldm = LatentDiffusion(unet.eval(), vae, NoiseSchedule.from_config(cfg.diffusion), 1.0, (c, side, side), device)
    labels = torch.arange(n, device=device) % 5
    out = {}
    for sampler, steps in (("ddim", cfg.sampling.ddim_steps), ("dpmsolver++", 20)):
        _peak_reset(device)
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            z = ldm.sample(
                n,
                steps=steps,
                eta=cfg.sampling.eta,
                sampler=sampler,
                generator=generators,
                cond_fn=classifier_cond_fn(guide, labels),
                guidance_scale=cfg.sampling.guidance_scale,
            )
            ldm.decode(z.float())
        _sync(device)
        out[f"{sampler} {steps} steps"] = (n / (time.perf_counter() - start), _peak_gib(device))
    return out


CHILD = "--killed-child"


def child(cfg, device, folder: str) -> None:
    """Train and checkpoint after every step, forever; the parent kills this process mid-step."""
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    unet, (c, side) = _unet(cfg, device)
    ema = EMA(unet, cfg.diffusion.ema_decay)
    optimizer = adamw(unet.parameters(), lr=cfg.diffusion.lr)
    z0 = torch.randn(2, c, side, side, device=device)
    step = 0
    while True:
        train_step(unet, ema, optimizer, schedule, z0, cfg.diffusion.bf16)
        step += 1
        tmp = tempfile.mkdtemp(dir=folder)
        write_checkpoint(tmp, {"unet": unet, "unet_ema": ema.model}, optimizer, {"step": step, "history": []})
        os.replace(tmp, os.path.join(folder, f"step-{step:05d}"))  # a checkpoint is whole or absent
        if step > 1:  # several GB each at the paper's size: keep the latest only
            shutil.rmtree(os.path.join(folder, f"step-{step - 1:05d}"))
        print(step, flush=True)


def bench_resume(cfg, device, args) -> str:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                CHILD,
                folder,
                "--device",
                str(device),
                "--config",
                args.config,
                *args.overrides,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in proc.stdout:
            if int(line) >= 3:
                break
        time.sleep(0.3)  # inside the next step
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = sorted(d for d in os.listdir(folder) if d.startswith("step-"))
        if not done:
            return f"FAILED: the training child exited with code {proc.returncode} before its first checkpoint"
        last = done[-1]
        unet, _ = _unet(cfg, torch.device("cpu"))  # built on the CPU, as a restarted worker builds it
        ema = EMA(unet, cfg.diffusion.ema_decay)
        optimizer, state = place_and_restore(
            {"unet": unet, "unet_ema": ema.model},
            lambda: adamw(unet.parameters(), lr=cfg.diffusion.lr),
            device,
            os.path.join(folder, last),
        )
        schedule = NoiseSchedule.from_config(cfg.diffusion)
        c, side = cfg.autoencoder.latent_channels, cfg.data.tile_size // cfg.autoencoder.downsample_factor
        z0 = torch.randn(2, c, side, side, device=device)
        losses = [train_step(unet, ema, optimizer, schedule, z0, cfg.diffusion.bf16) for _ in range(2)]
        states = {
            t.device.type for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
        }
        ok = all(torch.isfinite(torch.tensor(losses))) and states == {device.type}
        verdict = "ok" if ok else "FAILED"
        return (
            f"{verdict}: killed after step {state['step']}, resumed on {device.type}, 2 more steps, "
            f"loss {losses[-1]:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="paper", help="profile or YAML file (default: paper)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script itself")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per precision")
    parser.add_argument("--samples", type=int, default=8, help="tiles per sampler")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    if sys.argv[1:2] == [CHILD]:
        folder = sys.argv[2]
        args = parser.parse_args(sys.argv[3:])
        child(load_config(args.config, args.overrides), torch.device(args.device), folder)
        return
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    started = time.perf_counter()
    rows = []
    profile_batch = cfg.diffusion.batch_size or cfg.data.batch_size
    for batch in sorted({profile_batch, 8}):
        r = bench_training(cfg, device, batch, args.steps)
        rows.append((f"UNet training step, batch {batch}: fp32", f"{r['fp32'][0]:.1f} latents/s", r["fp32"][1]))
        rows.append(
            (
                f"UNet training step, batch {batch}: bf16",
                f"{r['bf16'][0]:.1f} latents/s ({r['bf16'][0] / r['fp32'][0]:.2f}x fp32)",
                r["bf16"][1],
            )
        )
    for label, (rate, peak) in bench_sampling(cfg, device, args.samples).items():
        rows.append((f"classifier-guided sampling + decode, {label}", f"{rate:.2f} tiles/s", peak))
    rows.append(("resume after a killed step", bench_resume(cfg, device, args), "-"))
    print(f"\n{args.config} profile on {name} ({time.perf_counter() - started:.0f} s)\n")
    print("| measurement | result | peak GPU memory |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
