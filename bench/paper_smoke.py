"""The paper profile end to end on the CPU, at its model sizes and 256 px tiles, before anyone spends
GPU hours on it:

    RAY_AUTH_MODE=disabled .venv/bin/python bench/paper_smoke.py          # ~10 min on 2 cores; run it alone

ingest (256 px crops of ../shared/data's brain regions as two classes; crc5's 96 px tiles are rightly
refused at 256 px) → autoencoder (55 M parameters; one joint and one adversarial step) → latents
(64×64×3) → pre-training and fine-tuning (the 288 M-parameter UNet, one step each, bf16 autocast) →
the noise-aware guide (50 M) → generate 2 tiles with 2 DDIM steps → select → fidelity → a one-seed
evaluate → report; then again with classifier-free guidance (the class-conditional fine-tune, its own
generation and evaluation; everything upstream reused). It proves that paper.yaml's shapes, settings
and memory fit together; the GPU-only parts (CUDA placement, NCCL) are ``bench/gpu_check.py``'s.

Only what a 2-core machine needs is overridden (SMOKE: placement, one step per stage, batch 1, tile
counts); model sizes, tile size, latent shape, schedules and bf16 stay the profile's. It is not in the
test suite: every 256 px tile costs seconds per encode or decode here, and the whole run is most of
the suite's 15-minute budget. Prints the stage timings; exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from histodiff_ray.config import load_config  # noqa: E402
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
    """Two 256 px crops (the paper's tile size) of each of the first ``n`` 512 px regions in ``src``."""
    out.mkdir(parents=True)
    for path in sorted(src.glob("*.jpg"))[:n]:
        region = np.asarray(Image.open(path).convert("RGB"))
        for k, (y, x) in enumerate(((0, 0), (256, 256))):
            Image.fromarray(region[y : y + 256, x : x + 256]).save(out / f"{path.stem}_{k}.png")


def main() -> None:
    unlabeled = DATA / "unlabeled"
    if not unlabeled.is_dir():
        sys.exit(f"paper_smoke: real H&E data not found at {DATA} (set HISTODIFF_SHARED_DATA to its folder)")
    with tempfile.TemporaryDirectory(prefix="paper-smoke-") as tmp:
        root = Path(tmp)
        # Six tiles per class (train 4, val 1, test 1).
        crops(unlabeled / "gbm40-brain", root / "labeled" / "GBM", 3)
        crops(unlabeled / "tcga-lgg-brain", root / "labeled" / "LGG", 3)
        pool = root / "pool"
        pool.mkdir()
        region = sorted((unlabeled / "gbm40-brain").glob("*.jpg"))[-1]  # one 512 px region: four tiles
        (pool / region.name).write_bytes(region.read_bytes())
        timings = {}
        for kind in ("classifier", "classifier_free"):
            cfg = load_config("paper", SMOKE + [f"guidance.kind={kind}"])
            assert (cfg.data.tile_size, cfg.autoencoder.latent_channels, cfg.diffusion.bf16) == (256, 3, True)
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
