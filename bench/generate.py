"""Class-guided generation throughput: three ratios from one run.

    .venv/bin/python bench/generate.py [--per-class 64] [--iterations 4] [--rounds 5] [--no-abba] \
        [--config cpu] [KEY=VALUE ...]

About 15 minutes on 2 cores with the defaults.

(a) guided vs unguided: our DDIM sampler with and without classifier guidance, same batch
    (generate.shard_size), one torch thread, the UNet compiled when generate.compile is set (as
    the actors do; compilation not timed), tiles/s. Goal: guidance overhead <= 25 %.
(b) against the official HistoDiffAug sampler's scheme (sample_diffusion.py): every loop iteration
    draws two guided batches with the same DDIM sampler and keeps one (`make_convolutional_sample`
    once for its log, then `run` again), 50 steps, models in PyTorch's default layout (ours are
    channels-last), one process using every core, each kept tile saved as a PNG, timed from its
    first batch (its model loading is not counted). Half its iterations run before the generate
    runs and half after, so drift in the machine's speed hits both sides. Ours is `histodiff
    generate` end to end (actor pool, judge scoring, memorization audit, Parquet shards, selection,
    PNGs) with 2 actors. Goal >= 3x.
(c) `histodiff generate` with 2 actors vs 1 actor, one torch thread each, run in the order 1, 2, 2, 1
    actors. Goal >= 1.8x.

The generate runs are timed whole: each actor's start (a Ray worker process importing torch,
diffusers and timm, then loading four models: ~10 s here) and compilation are included, as is the
selection at the end. --per-class sets the job's length, hence how much of it that start is; the
steady-state rate (from each actor's first shard to the last shard) is printed beside it.

The models have the profile's architectures with random weights (speed does not depend on the
weights; nothing here is trained), the tile set is real crc5 tiles from ../shared/data, and all
outputs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISTODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_artifacts(cfg, root: Path, tiles_per_class: int = 8) -> dict:
    """A real 5-class tile set, and random-weight LDM / guide / judge folders in the formats the
    training commands write."""
    from histodiff_ray.data.ingest import ingest
    from histodiff_ray.downstream import build_tile_classifier, save_tile_classifier
    from histodiff_ray.models.autoencoder import build_autoencoder
    from histodiff_ray.models.classifier import build_classifier
    from histodiff_ray.models.unet import build_unet

    src = root / "input"
    for cls_dir in sorted((DATA / "crc5" / "train").iterdir()):
        (src / cls_dir.name).mkdir(parents=True)
        for path in sorted(cls_dir.iterdir())[:tiles_per_class]:
            shutil.copy(path, src / cls_dir.name / path.name)  # copies: ingest quarantines links out of its root
    manifest = ingest(cfg, [str(src)], str(root / "tiles"), labeled=True, progress=False)
    classes = manifest["classes"]
    if not classes:
        sys.exit(f"no tiles ingested from {DATA}/crc5/train (set HISTODIFF_SHARED_DATA)")
    c, side = cfg.autoencoder.latent_channels, cfg.data.tile_size // cfg.autoencoder.downsample_factor
    torch.manual_seed(0)
    build_unet(cfg.unet, side, c).save_pretrained(root / "ldm" / "model" / "unet")
    build_autoencoder(cfg.autoencoder, cfg.data.tile_size).save_pretrained(root / "ldm" / "model" / "vae")
    (root / "ldm" / "run.json").write_text(
        json.dumps(
            {
                "kind": "ldm",
                "config": cfg.to_dict(),
                "scale_factor": 1.0,
                "latent_shape": [c, side, side],
                "autoencoder": "random",
            }
        )
    )
    build_classifier(
        cfg.classifier, c, side, len(classes), unet=cfg.unet if cfg.classifier.init_from_unet else None
    ).save_pretrained(root / "guide" / "model" / "classifier")
    (root / "guide" / "run.json").write_text(json.dumps({"kind": "classifier", "classes": classes}))
    judge = build_tile_classifier(cfg.downstream.arch, len(classes), cfg.data.tile_size)
    save_tile_classifier(judge, cfg.downstream.arch, classes, cfg.data.tile_size, str(root / "judge"))
    from safetensors.torch import save_file

    save_file(
        {"centroids": torch.randn(len(classes), judge.num_features)}, str(root / "judge" / "centroids.safetensors")
    )
    return {
        "ldm": str(root / "ldm"),
        "classifier": str(root / "guide"),
        "judge": str(root / "judge"),
        "tiles": str(root / "tiles"),
        "classes": classes,
    }


def sampler_rate(args_, cfg, guided: bool, batch: int) -> float:
    """Tiles/s of our sampler (one thread), guided or not."""
    from histodiff_ray.diffusion.guidance import classifier_cond_fn
    from histodiff_ray.ldm import LatentDiffusion
    from histodiff_ray.models.classifier import load_classifier
    from histodiff_ray.storage import open_location

    torch.set_num_threads(1)
    ldm = LatentDiffusion.from_run(open_location(args_["ldm"], cfg.storage), device="cpu")
    guide = (
        load_classifier(f"{args_['classifier']}/model/classifier")
        .to(memory_format=torch.channels_last)
        .eval()
        .requires_grad_(False)
    )  # as the generate actors load it
    cond = classifier_cond_fn(guide, torch.zeros(batch, dtype=torch.long)) if guided else None
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    if cfg.generate.compile:  # as the generate actors do; the compilation is left out of the timing
        ldm.unet = torch.compile(ldm.unet)
        ldm.sample(
            batch, steps=2, eta=cfg.sampling.eta, generator=gens, cond_fn=cond, guidance_scale=1.0 if guided else 0.0
        )
    start = time.perf_counter()
    ldm.sample(
        batch,
        steps=cfg.sampling.ddim_steps,
        eta=cfg.sampling.eta,
        generator=gens,
        cond_fn=cond,
        guidance_scale=cfg.sampling.guidance_scale if guided else 0.0,
    )
    return batch / (time.perf_counter() - start)


def official_scheme_rate(args_, cfg, batch: int, iterations: int, out: Path) -> float:
    """Tiles/s kept by the official scheme: per iteration two guided batches, one discarded."""
    import torch.nn.functional as F
    from PIL import Image

    from histodiff_ray.diffusion.sampler import ddim_sample
    from histodiff_ray.ldm import LatentDiffusion
    from histodiff_ray.models.classifier import load_classifier
    from histodiff_ray.storage import open_location

    torch.set_num_threads(os.cpu_count() or 1)
    ldm = LatentDiffusion.from_run(open_location(args_["ldm"], cfg.storage), device="cpu")
    # The official code keeps its models in PyTorch's default (contiguous) layout.
    ldm.unet, ldm.vae = (
        ldm.unet.to(memory_format=torch.contiguous_format),
        ldm.vae.to(memory_format=torch.contiguous_format),
    )
    classifier = load_classifier(f"{args_['classifier']}/model/classifier").eval()
    y = torch.zeros(batch, dtype=torch.long)

    def cond_fn(x, t):  # as in sample_diffusion.py
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            return torch.autograd.grad(log_probs[range(len(x_in)), y].sum(), x_in)[0]

    def guided_batch():
        z = ddim_sample(
            ldm.eps,
            ldm.schedule,
            (batch, *ldm.latent_shape),
            steps=50,
            eta=cfg.sampling.eta,
            cond_fn=cond_fn,
            guidance_scale=cfg.sampling.guidance_scale,
        )
        return ldm.decode(z)

    out.mkdir(parents=True, exist_ok=True)
    start, kept = time.perf_counter(), 0
    for i in range(iterations):
        guided_batch()  # make_convolutional_sample(...): drawn, logged, discarded
        for j, tile in enumerate(guided_batch()):  # run(...): drawn again and saved
            Image.fromarray(tile).save(out / f"sample_{i:03d}_{j:03d}.png")
            kept += 1
    return kept / (time.perf_counter() - start)


def generate_run(args_, cfg, actors: int, per_class: int, out: Path) -> tuple[float, float]:
    """(seconds for the whole job, steady-state tiles/s: from the landing of each actor's first
    shard to that of the last shard)."""
    from histodiff_ray.generate import generate

    cfg.generate.actors, cfg.generate.threads_per_actor = actors, 1
    start = time.time()
    generate(
        cfg,
        ldm=args_["ldm"],
        classifier=args_["classifier"],
        judge=args_["judge"],
        tiles=args_["tiles"],
        output=str(out),
        per_class=per_class,
        progress=False,
    )
    seconds = time.time() - start
    landed = sorted(p.stat().st_mtime for p in (out / "shards").iterdir())
    if len(landed) <= actors:
        return seconds, float("nan")
    return seconds, (len(landed) - actors) * cfg.generate.shard_size / (landed[-1] - landed[actors - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--per-class",
        type=int,
        default=64,
        help="tiles per class in each generate run (b, c); a multiple of generate.shard_size",
    )
    parser.add_argument(
        "--iterations", type=int, default=4, help="official-scheme loop iterations (b), half before and half after (c)"
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating unguided/guided rounds (a); the median counts"
    )
    parser.add_argument(
        "--no-abba", dest="abba", action="store_false", help="(c): one run per actor count instead of 1, 2, 2, 1 actors"
    )
    parser.add_argument("--config", default="cpu")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from histodiff_ray.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.sampling.ddim_steps = 50  # the official scheme's step count, for every comparison here
    batch = cfg.generate.shard_size
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        root = Path(tmp)
        art = make_artifacts(cfg, root)
        print(
            f"{len(art['classes'])} classes, batch {batch}, 50 DDIM steps, eta {cfg.sampling.eta}, "
            f"guidance scale {cfg.sampling.guidance_scale}, guide width {cfg.classifier.width}, "
            f"compiled UNet: {cfg.generate.compile}; {os.cpu_count()} cores",
            flush=True,
        )

        # Alternating rounds, so drift in the machine's speed hits both; the median round counts.
        rounds = []
        for _ in range(args.rounds):
            unguided, guided = sampler_rate(art, cfg, False, batch), sampler_rate(art, cfg, True, batch)
            rounds.append((unguided / guided - 1, unguided, guided))
            print(f"    round: unguided {unguided:.2f} tiles/s, guided {guided:.2f} tiles/s", flush=True)
        overhead, unguided, guided = sorted(rounds)[len(rounds) // 2]
        print(
            f"(a) sampler, 1 thread, median of {len(rounds)} rounds: unguided {unguided:.2f} tiles/s, guided "
            f"{guided:.2f} "
            f"tiles/s: guidance overhead {100 * overhead:.0f}% (goal <= 25%)",
            flush=True,
        )

        # The official scheme before and after the generate runs; 1, 2, 2, 1 actors (ABBA): a
        # linear drift in the machine's speed hits both arms of (b) and of (c) alike.
        def official_run(iterations: int, when: str) -> float:
            rate = official_scheme_rate(art, cfg, batch, iterations, root / f"official-{when}")
            print(
                f"    official scheme, {iterations} iteration(s) {when} the generate runs: {rate:.2f} kept tiles/s",
                flush=True,
            )
            return rate

        first = args.iterations // 2
        official = [official_run(first, "before")] if first else []
        order = [1, 2, 2, 1] if args.abba else [1, 2]
        seconds, steady, tiles, runs = (
            {1: 0.0, 2: 0.0},
            {1: [], 2: []},
            args.per_class * len(art["classes"]),
            order.count(1),
        )
        for i, actors in enumerate(order):
            secs, rate = generate_run(art, cfg, actors, args.per_class, root / f"gen{i}")
            seconds[actors] += secs
            steady[actors].append(rate)
            print(
                f"    generate, {actors} actor(s): {tiles / secs:.2f} tiles/s ({secs:.0f} s); steady state "
                f"{rate:.2f} tiles/s",
                flush=True,
            )
        official.append(official_run(args.iterations - first, "after"))
        official_rate = sum(official) / len(official)
        one, two = runs * tiles / seconds[1], runs * tiles / seconds[2]
        steady_one, steady_two = (sum(steady[k]) / runs for k in (1, 2))
        print(
            f"(b) generate with 2 actors ({two:.2f} tiles/s) vs the official scheme (2 batches per iteration, 1 kept; "
            f"{os.cpu_count()} threads; {official_rate:.2f} kept tiles/s): {two / official_rate:.2f}x (goal >= 3x)"
        )
        print(
            f"(c) generate, {tiles} tiles, {runs} run(s) each: 1 actor {one:.2f} tiles/s, 2 actors {two:.2f} tiles/s: "
            f"{two / one:.2f}x (goal >= 1.8x); steady state {steady_one:.2f} vs {steady_two:.2f} tiles/s: "
            f"{steady_two / steady_one:.2f}x"
        )
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
