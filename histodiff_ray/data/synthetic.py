"""A synthetic tile set: its format, reader and re-selection (`histodiff select`).

``histodiff generate`` (``histodiff_ray/generate.py``) writes one; evaluate, fidelity, report and
the sweep read one. Its folder holds::

    OUT/plan.json                       the plan: classes, shards, what decides the pixels (and its hash)
    OUT/shards/<CLASS>-<NNNNN>.parquet  every generated tile with its scores (``SHARD_SCHEMA``)
    OUT/index.parquet                   one row per tile, kept or dropped and why
    OUT/synthetic/<CLASS>/<tile_id>.png the kept tiles
    OUT/grids/<CLASS>-kept.png          the first 64 kept (and dropped) tiles, in generation order
    OUT/summary.json                    kept per class and the selection settings

Selection reads the stored scores (no pixels re-read), so it can be re-run alone with other
thresholds (``select_synthetic``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histodiff_ray.config import Config, SelectionConfig
from histodiff_ray.data.shards import check_shards
from histodiff_ray.data.tiles import decode_png
from histodiff_ray.ldm import save_png, tile_grid
from histodiff_ray.selection import decide
from histodiff_ray.storage import Location, open_location, read_bytes, write_atomic

PLAN_FORMAT = "histodiff-synthetic/1"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("tile_id", pa.string()),  # <CLASS>-<index>: unique by construction
        pa.field("image", pa.binary()),  # PNG
        pa.field("label", pa.int16()),  # target class index
        pa.field("label_name", pa.string()),
        pa.field("index", pa.int32()),  # tile index within its class
        pa.field("seed", pa.int64()),  # the tile's sampling seed
        pa.field("shard", pa.string()),
        pa.field("ldm", pa.string()),  # provenance: diffusion run and its weights' sha256
        pa.field("ldm_sha256", pa.string()),
        pa.field("classifier", pa.string()),  # null with classifier-free guidance
        pa.field("classifier_sha256", pa.string()),
        pa.field("judge", pa.string()),
        pa.field("guidance", pa.string()),  # classifier | classifier_free
        pa.field("guidance_scale", pa.float32()),  # s (classifier) or w (classifier-free)
        pa.field("ddim_steps", pa.int32()),
        pa.field("eta", pa.float32()),
        pa.field("probs", pa.list_(pa.float32())),  # judge's softmax over the classes
        pa.field("confidence", pa.float32()),  # judge's p(target)
        pa.field("nearest_centroid", pa.int16()),
        pa.field("centroid_similarity", pa.float32()),  # cosine similarity to the target's centroid
        pa.field(
            "real_distance", pa.float32()
        ),  # RMS grey levels to the nearest real train tile (16×16, any rotation/flip)
    ]
)


def shard_records(plan: dict, names: set[str] | None = None) -> list[dict]:
    """The plan's shards (or those named) as records for ``check_shards``: a synthetic set's shards
    are checked by their Parquet footer (columns, rows); the plan fixes how many rows each holds."""
    return [
        {"path": f"shards/{s['shard']}.parquet", "rows": s["count"]}
        for s in plan["shards"]
        if names is None or s["shard"] in names
    ]


REMAKE = "re-run `histodiff generate` with the same arguments: it makes missing and damaged shards again"


def load_shards(out: Location, columns: list[str] | None = None) -> pa.Table:
    plan = json.loads(read_bytes(out.join("plan.json")))
    check_shards(out, shard_records(plan), SHARD_SCHEMA, REMAKE)
    cols = columns or [f.name for f in SHARD_SCHEMA if f.name != "image"]
    tables = [
        pq.read_table(out.join("shards", f"{s['shard']}.parquet").path, filesystem=out.filesystem, columns=cols)
        for s in plan["shards"]
    ]
    return pa.concat_tables(tables)


def read_tile_images(out: Location, tile_ids: list[str], shards: list[str]) -> list[bytes]:
    """The PNG bytes of ``tile_ids`` (in that order), read from the shards that hold them
    (``shards[i]`` holds ``tile_ids[i]``), one read per shard."""
    check_shards(out, shard_records(json.loads(read_bytes(out.join("plan.json"))), set(shards)), SHARD_SCHEMA, REMAKE)
    return _read_checked_images(out, tile_ids, shards)


def _read_checked_images(out: Location, tile_ids: list[str], shards: list[str]) -> list[bytes]:
    """``read_tile_images`` for shards already checked (``load_shards`` checks every shard)."""
    found: dict[str, bytes] = {}
    for shard in sorted(set(shards)):
        table = pq.read_table(
            out.join("shards", f"{shard}.parquet").path, filesystem=out.filesystem, columns=["tile_id", "image"]
        )
        found.update(zip(table.column("tile_id").to_pylist(), table.column("image").to_pylist()))
    return [found[t] for t in tile_ids]


SCORE_COLUMNS = ["label", "confidence", "nearest_centroid", "real_distance"]


def decide_rows(table: pa.Table, selection: SelectionConfig) -> tuple[np.ndarray, np.ndarray]:
    """The selection rules (selection.decide) on the stored scores of a synthetic set's rows."""
    return decide(*(table.column(name).to_numpy() for name in SCORE_COLUMNS), selection)


def select_synthetic(cfg: Config, output: str, selection: SelectionConfig, *, write_pngs: bool = True) -> dict:
    """Apply the selection rules and the per-class cap to a finished synthetic set."""
    out = open_location(output, cfg.storage)
    plan = json.loads(read_bytes(out.join("plan.json")))
    table = load_shards(out).sort_by([("label", "ascending"), ("index", "ascending")])
    kept, reason = decide_rows(table, selection)
    index = table.append_column("kept", pa.array(kept)).append_column("reason", pa.array(reason))
    index = index.append_column(
        "png",
        pa.array(
            [
                f"synthetic/{n}/{t}.png" if k else None
                for n, t, k in zip(index.column("label_name").to_pylist(), index.column("tile_id").to_pylist(), kept)
            ]
        ),
    )
    if write_pngs:
        _write_pngs_and_grids(out, plan, index)
    sink = pa.BufferOutputStream()
    pq.write_table(index, sink, compression="zstd")
    write_atomic(out.join("index.parquet"), sink.getvalue().to_pybytes())
    per_class = {}
    for label, name in enumerate(plan["classes"]):
        mine = index.column("label").to_numpy() == label
        reasons = [r for r, m in zip(reason, mine) if m and r]
        per_class[name] = {
            "generated": int(mine.sum()),
            "kept": int((kept & mine).sum()),
            "dropped": {r: reasons.count(r) for r in sorted(set(reasons))},
        }
    summary = {
        "output": out.uri,
        "plan_hash": plan["hash"],
        "tiles": index.num_rows,
        "kept": int(kept.sum()),
        "selection": dataclasses.asdict(selection),
        "per_class": per_class,
    }
    write_atomic(out.join("summary.json"), json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def _write_pngs_and_grids(out: Location, plan: dict, index: pa.Table, columns: int = 8) -> None:
    """Kept tiles as PNG files (many small writes: threads, since each is one request on S3) and per
    class a borderless mosaic of the first columns² kept and of the first dropped tiles, in generation
    order (never picked): ``OUT/grids/<CLASS>-kept.png``, ``OUT/grids/<CLASS>-dropped.png``."""
    grid_tiles = columns * columns
    kept = index.column("kept").to_numpy(zero_copy_only=False)
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(index.column("shard").to_pylist()):
        by_shard.setdefault(shard, []).append(i)
    tile_ids = index.column("tile_id").to_pylist()
    labels = index.column("label").to_numpy()
    grids = {(label, k): [] for label in range(len(plan["classes"])) for k in (True, False)}
    writes = []
    for shard, rows in by_shard.items():
        for i, png in zip(rows, _read_checked_images(out, [tile_ids[i] for i in rows], [shard] * len(rows))):
            if kept[i]:
                writes.append((out.join(index.column("png")[i].as_py()), png))
            bucket = grids[(int(labels[i]), bool(kept[i]))]
            if len(bucket) < grid_tiles:
                bucket.append(decode_png(png))
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda w: write_atomic(*w), writes))
    for (label, k), tiles in grids.items():
        if tiles:
            name = plan["classes"][label]
            mosaic = tile_grid(np.stack(tiles), columns=columns, pad=0)
            save_png(mosaic, out.join("grids", f"{name}-{'kept' if k else 'dropped'}.png"))


def selection_report(summary: dict) -> str:
    """What `histodiff generate` and `histodiff select` print: kept / generated per class, and why the
    rest were dropped."""
    lines = [f"kept {summary['kept']} of {summary['tiles']} synthetic tiles at {summary['output']}"]
    for name, c in summary["per_class"].items():
        dropped = ", ".join(f"{r} {n}" for r, n in c["dropped"].items()) or "none"
        lines.append(f"  {name:12s} kept {c['kept']:5d} / {c['generated']:5d}   dropped: {dropped}")
    return "\n".join(lines)
