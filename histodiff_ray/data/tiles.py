"""Tile shards: their schema, the manifest that lists them, and Ray Data streaming over them.

A tile set is a folder (local or S3) holding ``manifest.json`` and ``shards/part-*.parquet``.
The manifest is the source of truth: readers take the shard list from it, so a shard written by an
interrupted ingest but never committed to the manifest is invisible; and they check each listed
shard against its record first (``data/shards.py``), so a damaged one stops them with one line.

Streaming (``read_tiles``) yields numpy batches ready for torch:
``{"image": float32 N×3×H×W in [-1, 1], "label": int64 N (-1 when unknown)}`` with random flips and
90° rotations for training; ``ray.train.get_dataset_shard`` hands each worker its share.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from PIL import Image
from ray.data.expressions import col, lit

from histodiff_ray.config import Config
from histodiff_ray.data.shards import check_shards
from histodiff_ray.errors import HistodiffError
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import Location, open_location, read_bytes, write_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "histodiff-tiles/1"
SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string()),  # content hash of the tile's pixels
        pa.field("image", pa.binary()),  # PNG, tile_size × tile_size RGB
        pa.field("label", pa.int16()),  # index into manifest["classes"], -1 when unlabeled
        pa.field("label_name", pa.string()),  # null when unlabeled
        pa.field("labeled", pa.bool_()),  # the label may be used for training (see label_fraction)
        pa.field("split", pa.string()),  # train | val | test, fixed at ingest
        pa.field("dup_group", pa.string()),  # rotated/flipped copies share a group (and a split)
        pa.field("source", pa.string()),  # dataset name, e.g. crc5/train or unlabeled/gbm40-brain
        pa.field("origin", pa.string()),  # URI of the source file
        pa.field("x", pa.int32()),  # tile's top-left in the source file's pixels
        pa.field("y", pa.int32()),
        pa.field("signature", pa.binary()),  # 16×16×3 uint8 thumbnail for duplicate search
    ]
)


class TileSetError(HistodiffError):
    """A tile set that cannot be read as asked."""


def load_manifest(root: Location) -> dict[str, Any] | None:
    """The manifest at ``root``, or None when the folder holds no tile set yet."""
    try:
        raw = read_bytes(root.join(MANIFEST_NAME))
    except FileNotFoundError:
        return None
    manifest = json.loads(raw)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise TileSetError(f"{root.join(MANIFEST_NAME)} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def require_manifest(root: Location) -> dict[str, Any]:
    manifest = load_manifest(root)
    if manifest is None:
        raise TileSetError(
            f"no tile set at {root}: {MANIFEST_NAME} is missing; run `histodiff ingest --output {root}` first"
        )
    return manifest


def save_manifest(root: Location, manifest: dict[str, Any]) -> None:
    write_atomic(root.join(MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=True).encode())


def shard_paths(root: Location, manifest: dict[str, Any]) -> list[str]:
    """The paths of a tile set's shards, each first checked against its manifest record."""
    check_shards(
        root,
        manifest["shards"],
        SHARD_SCHEMA,
        f"re-run `histodiff ingest` with the same --input(s) and --output {root}: "
        "it rewrites damaged shards from their source files",
    )
    return [root.join(shard["path"]).path for shard in manifest["shards"]]


def read_parquet(paths: list[str], filesystem):
    """``ray.data.read_parquet`` sized to the data: Ray 2.60 starts 32 footer-reading actors on
    every pass by default, which costs seconds per epoch for a tile set of a few shards."""

    os.environ["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = str(max(1, min(32, len(paths) // 16)))
    return ray.data.read_parquet(paths, filesystem=filesystem)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def decode_batch(batch: dict[str, np.ndarray], augment: bool = False, seed: int | None = None) -> dict[str, np.ndarray]:
    """PNG bytes → float32 N×3×H×W in [-1, 1]; optional random flips and 90° rotations."""
    images = np.stack([decode_png(b) for b in batch["image"]])  # N×H×W×3 uint8
    if augment:
        rng = np.random.default_rng(seed)
        turns = rng.integers(0, 4, len(images))
        flips = rng.integers(0, 2, len(images)).astype(bool)
        images = np.stack([np.rot90(img[:, ::-1] if f else img, k) for img, k, f in zip(images, turns, flips)])
    chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)
    out = {"image": chw / 127.5 - 1.0, "label": np.asarray(batch["label"], dtype=np.int64)}
    if "tile_id" in batch:
        out["tile_id"] = batch["tile_id"]
    return out


def _tile_rows(root: Location, split: str | None, labeled_only: bool, sources: list[str] | None, keep_ids: bool):
    """The undecoded rows (PNG bytes and labels) of one tile set, filtered."""

    if split is not None and split not in SPLITS:
        raise TileSetError(f"split {split!r} is not one of {SPLITS}")
    manifest = require_manifest(root)
    if not manifest["shards"]:
        raise TileSetError(f"the tile set at {root} holds no tiles")
    ds = read_parquet(shard_paths(root, manifest), root.filesystem)
    if split is not None:
        ds = ds.filter(expr=col("split") == lit(split))
    if labeled_only:
        ds = ds.filter(expr=col("labeled") == lit(True))
    if sources:
        known = {s for split_counts in manifest.get("sources_by_split", {}).values() for s in split_counts}
        missing = [s for s in sources if known and s not in known]
        if missing:
            raise TileSetError(f"source(s) {missing} are not in the tile set at {root}; it holds {sorted(known)}")
        ds = ds.filter(expr=col("source").is_in(list(sources)))
    return ds.select_columns(["image", "label"] + (["tile_id"] if keep_ids else []))


def read_tiles(
    root: Location | list[Location],
    split: str | None = "train",
    *,
    labeled_only: bool = False,
    sources: list[str] | None = None,
    augment: bool = False,
    shuffle: bool = False,
    batch_size: int = 256,
    keep_ids: bool = False,
):
    """A Ray Dataset of decoded tiles from the tile set at ``root`` (or the tile sets, one after another).

    ``split``: one of train/val/test, or None for all. ``labeled_only``: only tiles whose label may
    be used for training. ``sources``: restrict to these source names. ``shuffle``: a fresh random
    order over all tiles at every pass, before decoding (PNG bytes are small to move). Training
    needs it when it reads several tile sets: they would otherwise stream one after the other and
    the model would learn the last one and forget the rest.
    """
    parts = [
        _tile_rows(r, split, labeled_only, sources, keep_ids) for r in (root if isinstance(root, list) else [root])
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if shuffle:
        ds = ds.random_shuffle()
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"augment": augment},
        batch_size=batch_size,
        batch_format="numpy",
    )


def iter_tile_tables(root: Location, split: str, *, labeled_only: bool = False, columns: list[str] | None = None):
    """The rows of one split, one shard at a time (no Ray): for work that must not hold a whole
    tile set's pixels at once."""

    manifest = require_manifest(root)
    if split not in SPLITS:
        raise TileSetError(f"split {split!r} is not one of {SPLITS}")
    cols = columns or ["tile_id", "image", "label"]
    for path in shard_paths(root, manifest):
        table = pq.read_table(path, filesystem=root.filesystem, columns=sorted(set(cols) | {"split", "labeled"}))
        mask = pc.equal(table.column("split"), split)
        if labeled_only:
            mask = pc.and_(mask, table.column("labeled"))
        yield table.filter(mask).select(cols)


def load_tile_table(
    root: Location, split: str, *, labeled_only: bool = False, columns: list[str] | None = None
) -> pa.Table:
    """The rows of one split, read straight from the shards (no Ray): for the small labeled sets
    that the judge and the downstream classifiers train on, and for signatures."""
    cols = columns or ["tile_id", "image", "label"]
    tables = list(iter_tile_tables(root, split, labeled_only=labeled_only, columns=cols))
    return pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table().select(cols)


def decode_images(images: pa.ChunkedArray | list[bytes]) -> np.ndarray:
    """PNG bytes → uint8 N×H×W×3."""
    values = images.to_pylist() if hasattr(images, "to_pylist") else images
    return np.stack([decode_png(b) for b in values]) if values else np.zeros((0, 0, 0, 3), np.uint8)


def stream_check(cfg: Config, tiles: str, split: str | None, max_batches: int | None) -> dict:
    """`histodiff stream`: stream a tile set through Ray Data once (decoded and augmented as
    training reads it) and measure it: tiles, batches, seconds, tiles/s, pixel range."""
    init_ray(cfg)
    ds = read_tiles(open_location(tiles, cfg.storage), split, augment=cfg.data.augment)
    n, batches, start = 0, 0, time.perf_counter()
    lo, hi = float("inf"), float("-inf")
    for batch in ds.iter_torch_batches(batch_size=cfg.data.batch_size):
        n += len(batch["label"])
        lo, hi = min(lo, float(batch["image"].min())), max(hi, float(batch["image"].max()))
        batches += 1
        if max_batches and batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {
        "tiles": n,
        "batches": batches,
        "seconds": round(seconds, 2),
        "tiles_per_s": round(n / max(seconds, 1e-9), 1),
        "pixel_range": [round(lo, 3), round(hi, 3)],
    }
