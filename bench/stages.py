"""Every stage against a plain torch loop on the same model, batch and threads, and against its FLOP
bound (issue 14):

    RAY_AUTH_MODE=disabled .venv/bin/python bench/stages.py --json /tmp/bench-stages.json   # ~19 min; run it alone

On real crc5 tiles (the first ``--per-class`` of each class in ../shared/data/crc5/train, ingested
into a temporary tile set at 20 % labels), with the cpu profile's models and batches, each stage
runs as a user runs it (the library call behind its command, so Ray Train, Ray Data and actor
pools included), one after the other on one local Ray cluster, each from the outputs of the one
before: autoencoder → encode-latents → pretrain → guide → judge → generate → one downstream run.

* **stage**: the stage's own rate. Training stages log samples/s per window of ``log_every``
  steps (training only: checkpoints, validation and start-up excluded); the median window after
  the first, times the Train workers. Encode-latents records its stream's steady rate (tiles/s
  from the first latents to the last; the seconds before the first latents, the actors' start-up,
  are in the note). The judge, generate and the downstream run log no windows: tiles (or training
  samples) over the call's wall time, start-up, reading and writing included.
* **plain**: what a user would write by hand in one process with the same number of torch threads
  as the stage uses on the whole machine: the same model built by the same builder, the same
  global batch, data decoded into memory once, forward, loss, backward, AdamW (torch's default),
  nothing else (no augmentation, no validation, no logging); 3 warm-up steps, then timed.
* **bound**: this CPU's measured fp32 matmul rate at those threads (a 2048² sgemm) over the
  stage's FLOPs per sample (matmuls and convolutions counted by ``torch.utils.flop_counter`` on the
  plain loop's step): the rate if every FLOP ran at matmul speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402

from histodiff_ray.config import load_config  # noqa: E402
from histodiff_ray.data.ingest import ingest  # noqa: E402
from histodiff_ray.data.latents import encode_latents, load_latent_manifest  # noqa: E402
from histodiff_ray.data.tiles import decode_images, load_tile_table  # noqa: E402
from histodiff_ray.diffusion.guidance import classifier_cond_fn  # noqa: E402
from histodiff_ray.diffusion.schedule import NoiseSchedule  # noqa: E402
from histodiff_ray.downstream import build_tile_classifier, predict, step_budget  # noqa: E402
from histodiff_ray.evaluate import _train_and_test  # noqa: E402
from histodiff_ray.generate import generate  # noqa: E402
from histodiff_ray.judge import load_judge, train_judge  # noqa: E402
from histodiff_ray.ldm import LatentDiffusion  # noqa: E402
from histodiff_ray.models import to_tensor  # noqa: E402
from histodiff_ray.models.autoencoder import autoencoder_loss, build_autoencoder, load_autoencoder  # noqa: E402
from histodiff_ray.models.classifier import build_classifier, load_classifier  # noqa: E402
from histodiff_ray.models.unet import build_unet  # noqa: E402
from histodiff_ray.storage import open_location  # noqa: E402
from histodiff_ray.train.autoencoder import AutoencoderObjective, train_autoencoder  # noqa: E402
from histodiff_ray.train.diffusion import pretrain  # noqa: E402
from histodiff_ray.train.guide import train_classifier  # noqa: E402

DATA = Path(os.environ.get("HISTODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))


def sgemm_rate(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n×n fp32 matmul at ``threads`` torch threads (best of ``repeats``)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed_loop(step, steps: int, warmup: int = 3) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def train_step(model_loss, params) -> callable:
    """A plain training step: forward and loss (``model_loss()``), backward, AdamW with torch's defaults."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def window_rate(run: str, workers: int) -> float:
    """The median logged samples/s over the windows after the first, times the workers."""
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        rates = [float(row["samples_per_s"]) for row in csv.DictReader(f) if row["samples_per_s"]]
    return statistics.median(rates[1:] if len(rates) > 1 else rates) * workers


def wall(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def make_source(root: Path, per_class: int) -> Path:
    """The first ``per_class`` tiles of each crc5 train class, copied (outside the checkout)."""
    src = DATA / "crc5" / "train"
    if not src.is_dir():
        sys.exit(f"stages: crc5 not found at {src} (set HISTODIFF_SHARED_DATA to ../shared/data's path)")
    out = root / "source"
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True)
        for path in sorted(cls.iterdir())[:per_class]:
            shutil.copy(path, out / cls.name / path.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300, help="crc5 train tiles per class (default 300)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per Ray Train stage (default 60)")
    parser.add_argument("--plain-steps", type=int, default=10, help="timed steps of each plain loop (default 10)")
    parser.add_argument("--generate-per-class", type=int, default=64, help="tiles generated per class (default 64)")
    parser.add_argument("--sampling-steps", type=int, default=10, help="DDIM steps of generate (default 10)")
    parser.add_argument("--json", help="write the table here as JSON")
    args = parser.parse_args()
    steps, log_every = args.steps, max(1, args.steps // 6)
    cfg = load_config(
        "cpu",
        [
            "data.label_fraction=0.2",
            f"autoencoder.max_steps={steps}",
            "autoencoder.decoder_steps=0",
            "autoencoder.gan_steps=0",
            f"autoencoder.log_every={log_every}",
            f"autoencoder.checkpoint_every={steps}",
            "autoencoder.val_tiles=64",
            f"diffusion.max_steps={steps}",
            f"diffusion.log_every={log_every}",
            f"diffusion.checkpoint_every={steps}",
            f"classifier.max_steps={steps}",
            f"classifier.log_every={log_every}",
            f"classifier.checkpoint_every={steps}",
            "downstream.epochs=10",
            "evaluate.seeds=1",
            f"sampling.ddim_steps={args.sampling_steps}",
        ],
    )
    workers = cfg.ray.num_workers
    machine_threads = os.cpu_count() or 1
    peak = {t: sgemm_rate(t) for t in sorted({1, machine_threads})}
    rows = []

    def add(stage, stage_rate, plain_rate, flops_per_sample, threads, note):
        bound = peak[threads] / flops_per_sample
        rows.append(
            {
                "stage": stage,
                "stage_rate": stage_rate,
                "plain_rate": plain_rate,
                "stage_over_plain": stage_rate / plain_rate,
                "gflop_per_sample": flops_per_sample / 1e9,
                "bound_rate": bound,
                "plain_over_bound": plain_rate / bound,
                "threads": threads,
                "note": note,
            }
        )
        print(
            f"[stages] {stage}: {stage_rate:.1f}/s, plain {plain_rate:.1f}/s ({stage_rate / plain_rate:.2f}x), "
            f"bound {bound:.0f}/s ({flops_per_sample / 1e9:.2f} GFLOP/sample)",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        root = Path(tmp)
        tiles = str(root / "tiles")
        ingest(cfg, [str(make_source(root, args.per_class))], tiles, labeled=True, progress=False)
        tiles_loc = open_location(tiles, cfg.storage)
        train_x = decode_images(load_tile_table(tiles_loc, "train", columns=["image"]).column("image"))

        # Autoencoder (joint phase): per-worker batch × workers.
        ae = cfg.autoencoder
        batch = (ae.batch_size or cfg.data.batch_size) * workers
        run = str(root / "runs" / "autoencoder")
        _, seconds = wall(lambda: train_autoencoder(cfg, [tiles], run))
        torch.set_num_threads(machine_threads)
        vae = build_autoencoder(ae, cfg.data.tile_size)
        objective = AutoencoderObjective(vae)
        x = to_tensor(train_x[:batch])

        def ae_loss():
            recon, kl = objective(x)
            return autoencoder_loss(x, recon, kl, ae.kl_weight)[0]

        ae_flops = flops(lambda: ae_loss().backward()) / batch
        plain = batch / timed_loop(train_step(ae_loss, vae.parameters()), args.plain_steps)
        rate = window_rate(run, workers)
        add("autoencoder", rate, plain, ae_flops, machine_threads, f"batch {batch}, {seconds:.0f} s")

        # Encode-latents: every tile of the set.
        latents = str(root / "latents")
        vae_dir = str(Path(run) / "model" / "vae")
        manifest, seconds = wall(lambda: encode_latents(cfg, tiles, vae_dir, latents, progress=False))
        # Channels-last, as the encoding actors run it (oneDNN's fast path for this encoder).
        encoder = load_autoencoder(vae_dir).to(memory_format=torch.channels_last).eval()
        images = load_tile_table(tiles_loc, "train", columns=["image"]).column("image").to_pylist()[:1024]

        @torch.no_grad()
        def encode_all():
            for start in range(0, len(images), 64):
                encoder.encode(to_tensor(decode_images(images[start : start + 64])))

        with torch.no_grad():
            enc_flops = flops(lambda: encoder.encode(to_tensor(train_x[:8]))) / 8
        plain = len(images) / timed_loop(encode_all, 1, warmup=1)
        encoding = manifest["encoding"]
        note = f"{manifest['rows']} tiles, {seconds:.0f} s, first latents after {encoding['first_latents_s']:.0f} s"
        add("encode-latents", encoding["steady_tiles_per_s"], plain, enc_flops, machine_threads, note)

        # Pre-training: the UNet on the latents.
        d = cfg.diffusion
        batch = (d.batch_size or cfg.data.batch_size) * workers
        ldm_run = str(root / "runs" / "pretrain")
        pretrain(cfg, [(latents, 1.0)], ldm_run)
        shape = load_latent_manifest(open_location(latents, cfg.storage))["latent_shape"]
        c, side, _ = shape
        unet = build_unet(cfg.unet, side, c, d.num_train_timesteps)
        schedule = NoiseSchedule.from_config(d)
        z0, t = torch.randn(batch, *shape), torch.randint(0, d.num_train_timesteps, (batch,))

        def unet_loss():
            noise = torch.randn_like(z0)
            return F.mse_loss(unet(schedule.q_sample(z0, t, noise), t).sample, noise)

        unet_flops = flops(lambda: unet_loss().backward()) / batch
        plain = batch / timed_loop(train_step(unet_loss, unet.parameters()), args.plain_steps)
        add("pretrain / finetune", window_rate(ldm_run, workers), plain, unet_flops, machine_threads, f"batch {batch}")

        # The noise-aware guide, its encoder from the pre-trained UNet.
        g = cfg.classifier
        batch = (g.batch_size or cfg.data.batch_size) * workers
        guide_run = str(root / "runs" / "guide")
        train_classifier(cfg, latents, ldm_run, guide_run)
        k = len(manifest["classes"])
        guide = build_classifier(g, c, side, k, unet=cfg.unet)
        y = torch.randint(0, k, (batch,))

        def guide_loss():
            return F.cross_entropy(guide(schedule.q_sample(z0, t, torch.randn_like(z0)), t), y)

        guide_flops = flops(lambda: guide_loss().backward()) / batch
        plain = batch / timed_loop(train_step(guide_loss, guide.parameters()), args.plain_steps)
        add("guide", window_rate(guide_run, workers), plain, guide_flops, machine_threads, f"batch {batch}")

        # The judge (the downstream recipe in the driver process).
        ds = cfg.downstream
        judge_dir = str(root / "judge")
        summary, seconds = wall(lambda: train_judge(cfg, tiles, judge_dir))
        batch, per_epoch = step_budget(ds, summary["train_tiles"])
        resnet = build_tile_classifier(ds.arch, k, cfg.data.tile_size)
        xb, yb = to_tensor(train_x[:batch]), torch.randint(0, k, (batch,))

        def resnet_loss():
            return F.cross_entropy(resnet(xb), yb)

        resnet_flops = flops(lambda: resnet_loss().backward()) / batch
        torch.set_num_threads(machine_threads)
        plain = batch / timed_loop(train_step(resnet_loss, resnet.parameters()), args.plain_steps)
        samples = ds.epochs * per_epoch * batch
        add("judge", samples / seconds, plain, resnet_flops, machine_threads, f"{samples} samples, {seconds:.0f} s")

        # Generate: classifier-guided DDIM, decode, judge, memorization search; the actor pool.
        out = str(root / "synthetic")
        _, seconds = wall(
            lambda: generate(
                cfg,
                ldm=ldm_run,
                classifier=guide_run,
                judge=judge_dir,
                tiles=tiles,
                output=out,
                per_class=args.generate_per_class,
                progress=False,
            )
        )
        made = args.generate_per_class * k
        torch.set_num_threads(machine_threads)
        ldm = LatentDiffusion.from_run(open_location(ldm_run, cfg.storage))
        guide_model = load_classifier(str(Path(guide_run) / "model" / "classifier")).eval().requires_grad_(False)
        judge_model, _, _ = load_judge(judge_dir, cfg.storage)
        n = cfg.generate.shard_size
        labels = torch.zeros(n, dtype=torch.long)

        def make():
            z = ldm.sample(
                n,
                steps=args.sampling_steps,
                eta=cfg.sampling.eta,
                cond_fn=classifier_cond_fn(guide_model, labels),
                guidance_scale=cfg.sampling.guidance_scale,
            )
            predict(judge_model, ldm.decode(z))

        # Per tile: each sampling step runs a UNet forward and the guide's forward and backward to its
        # input (cond_fn; counted with .backward(), since FlopCounterMode cannot watch autograd.grad);
        # then one decode and one judge forward.
        with torch.no_grad():
            step_flops = flops(lambda: ldm.unet(torch.randn(1, *shape), torch.tensor([500])))
        guide_z = torch.randn(1, *shape, requires_grad=True)
        guide_flops_1 = flops(lambda: guide_model(guide_z, torch.tensor([500])).logsumexp(1).sum().backward())
        with torch.no_grad():
            rest = flops(lambda: predict(judge_model, ldm.decode(torch.randn(1, *shape))))
        gen_flops = args.sampling_steps * (step_flops + guide_flops_1) + rest
        plain = n / timed_loop(make, 1, warmup=1)
        add("generate", made / seconds, plain, gen_flops, machine_threads, f"{made} tiles, {args.sampling_steps} steps")

        # One downstream run, as evaluate runs it: a Ray task with one CPU and one torch thread.
        val = load_tile_table(tiles_loc, "val")
        test = load_tile_table(tiles_loc, "test")
        labeled = load_tile_table(tiles_loc, "train", labeled_only=True)

        def xy(table):
            return decode_images(table.column("image")), table.column("label").to_numpy().astype(np.int64)

        run_task = ray.remote(num_cpus=1)(_train_and_test)
        train_xy = xy(labeled)
        result, seconds = wall(
            lambda: ray.get(
                run_task.remote(
                    cfg.to_dict(),
                    "real+aug",
                    "aug",
                    0,
                    train_xy,
                    None,
                    xy(val),
                    {"test": xy(test)},
                    len(train_xy[1]),
                    manifest["classes"],
                )
            )
        )
        torch.set_num_threads(1)
        resnet = build_tile_classifier(ds.arch, k, cfg.data.tile_size)
        plain = batch / timed_loop(train_step(resnet_loss, resnet.parameters()), args.plain_steps)
        samples = result["steps_run"] * batch
        add(
            "downstream run",
            samples / result["train_seconds"],
            plain,
            resnet_flops,
            1,
            f"{samples} samples, {result['train_seconds']:.0f} s",
        )

    print("| stage | threads | stage /s | plain /s | stage / plain | GFLOP per sample | bound /s | plain / bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['threads']} | {r['stage_rate']:.1f} | {r['plain_rate']:.1f} | "
            f"{r['stage_over_plain']:.2f} | {r['gflop_per_sample']:.2f} | {r['bound_rate']:.0f} | "
            f"{r['plain_over_bound']:.2f} |"
        )
    print(f"sgemm GFLOP/s: {', '.join(f'{t} thread(s) {v / 1e9:.0f}' for t, v in peak.items())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "sgemm_flops": peak, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
