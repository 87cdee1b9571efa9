"""The paper profile end to end on the CPU, at its model sizes and 256 px tiles, before anyone spends
GPU hours on it:

    RAY_AUTH_MODE=disabled .venv/bin/python bench/paper_smoke.py          # ~10-14 min on 2 cores; run it alone

ingest (256 px crops of ../shared/data's brain regions as two classes; crc5's 96 px tiles are rightly
refused at 256 px) → autoencoder (55 M parameters; one joint and one adversarial step) → latents
(64×64×3) → pre-training and fine-tuning (the 288 M-parameter UNet, one step each) → the noise-aware
guide (50 M) → generate 2 tiles with 2 DDIM steps → select → fidelity → a one-seed evaluate → report;
then again with classifier-free guidance (the class-conditional fine-tune, its own generation and
evaluation; everything upstream reused). It proves that paper.yaml's shapes, settings and memory fit
together; the GPU-only parts (CUDA placement, NCCL, bf16 speed) are ``bench/gpu_check.py``'s.

Only what a 2-core machine needs is overridden (SMOKE: placement, one step per stage, batch 1, three
tiles per class, one pool tile); model sizes, tile size, latent shape and schedules stay the profile's.
bf16 autocast stays on where the CPU has bf16 units (``bf16_is_native``); elsewhere (AVX2) autocast
emulates it and one UNet step takes ~3 minutes instead of ~30 s, so it runs in fp32 — the same loop, which
CI runs in bf16 on the paper profile at narrowed widths. At the full widths (1-2 TFLOP per 256 px
autoencoder step, a 4.6 GB checkpoint per UNet stage) it takes longer than the test suite's whole
15-minute budget (stage timings in cluster/README.md), so the suite runs this same run, these same
overrides, with only the model widths narrowed (``tests/test_pipeline.py``); this script is the
memory check at the profile's sizes. Prints the stage timings; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from histodiff_ray.config import load_config  # noqa: E402
from histodiff_ray.models import bf16_is_native  # noqa: E402
from histodiff_ray.pipeline import run_pipeline  # noqa: E402
from histodiff_ray.storage import exists, open_location, read_bytes  # noqa: E402

DATA = Path(os.environ.get("HISTODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
SMOKE = [
    "ray.use_gpu=false",
    "ray.num_workers=1",
    "ray.cpus_per_worker=0.5",
    "evaluate.gpus_per_run=0",
    "evaluate.cpus_per_run=0.5",
    "evaluate.seeds=1",
    "data.label_fraction=1.0",
    "data.val_fraction=0.34",  # with three tiles per class: one each for train, val and test
    "data.test_fraction=0.34",
    "data.batch_size=2",
    "autoencoder.max_steps=1",
    "autoencoder.gan_steps=1",
    "autoencoder.batch_size=1",
    "autoencoder.checkpoint_every=1",
    "autoencoder.val_tiles=1",
    "diffusion.max_steps=1",
    "diffusion.finetune_steps=1",
    "diffusion.batch_size=1",
    "diffusion.checkpoint_every=1",
    "diffusion.warmup_steps=0",
    "diffusion.finetune_warmup_steps=0",
    "classifier.max_steps=1",
    "classifier.batch_size=1",
    "classifier.checkpoint_every=1",
    "generate.per_class=1",
    "generate.actors=1",
    "generate.threads_per_actor=1",
    "sampling.ddim_steps=2",
    "selection.confidence_threshold=0.0",
    "downstream.epochs=1",
    "downstream.batch_size=2",
]


def crops(src: Path, out: Path, n: int) -> None:
    """``n`` 256 px crops (the paper's tile size): the top-left and bottom-right quarters of the 512 px
    regions in ``src``, in name order."""
    out.mkdir(parents=True)
    corners = [(path, y) for path in sorted(src.glob("*.jpg")) for y in (0, 256)][:n]
    for path, y in corners:
        region = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(region[y : y + 256, y : y + 256]).save(out / f"{path.stem}_{y}.png")


def main() -> None:
    # No options: --help shows what it runs and costs before anyone starts a 13-minute run.
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    unlabeled = DATA / "unlabeled"
    if not unlabeled.is_dir():
        sys.exit(f"paper_smoke: real H&E data not found at {DATA} (set HISTODIFF_SHARED_DATA to its folder)")
    with tempfile.TemporaryDirectory(prefix="paper-smoke-") as tmp:
        root = Path(tmp)
        crops(unlabeled / "gbm40-brain", root / "labeled" / "GBM", 3)
        crops(unlabeled / "tcga-lgg-brain", root / "labeled" / "LGG", 3)
        region = sorted((unlabeled / "gbm40-brain").glob("*.jpg"))[-1]  # not among the labeled ones
        pool = root / "pool"
        pool.mkdir()
        Image.fromarray(np.asarray(Image.open(region).convert("RGB"))[:256, :256]).save(pool / "pool.png")
        bf16 = f"diffusion.bf16={str(bf16_is_native(torch.device('cpu'))).lower()}"
        timings = {}
        for kind in ("classifier", "classifier_free"):
            cfg = load_config("paper", SMOKE + [bf16, f"guidance.kind={kind}"])
            assert (cfg.data.tile_size, cfg.autoencoder.latent_channels) == (256, 3)
            result = run_pipeline(
                cfg,
                labeled=str(root / "labeled"),
                unlabeled=[str(pool)],
                workdir=str(root / "work"),
                title=f"paper profile smoke run ({kind})",
            )
            summary = json.loads(read_bytes(open_location(result["synthetic"], cfg.storage).join("summary.json")))
            assert summary["tiles"] == 2, summary
            assert exists(open_location(result["report"], cfg.storage)), result
            timings[kind] = result["timings"]
        for kind, stages in timings.items():  # seconds per stage; the second run lists the stages it reused too
            print(f"[paper_smoke] {kind}: {json.dumps(stages)}")


if __name__ == "__main__":
    main()
