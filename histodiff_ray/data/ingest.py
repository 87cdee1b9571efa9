"""`histodiff ingest`: tile folders, H&E regions or S3 prefixes → a split, de-duplicated tile set.

    histodiff ingest --config cpu --input ../shared/data/crc5/train --labeled --output s3://tiles/crc5
    histodiff ingest --config cpu --input ../shared/data/unlabeled --output s3://tiles/pool --mpp 0.5

Labeled input is class folders (``<root>/<CLASS>/*``); unlabeled input may hold tiles or larger
regions, cut into ``data.tile_size`` tiles with a tissue filter. With ``--mpp`` (the source's
µm/px) sources are resampled to the profile's ``data.microns_per_pixel``.

Work is committed chunk by chunk (``data.files_per_chunk`` source files): shards first, then the
manifest that lists them, each written atomically. A rerun skips source files already in the
manifest (same path, same bytes), so a rerun of the same inputs changes nothing, new inputs add
only themselves, and an interrupted ingest finishes where it stopped.

Splits are made per duplicate group (rotated/flipped copies stay together), stratified by class,
ordered by a hash of the group and ``data.split_seed``; tiles already ingested keep their split.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from histodiff_ray.config import Config
from histodiff_ray.console import logger
from histodiff_ray.data import images
from histodiff_ray.data.dedupe import assign_groups
from histodiff_ray.data.shards import damaged_shards, write_shard
from histodiff_ray.data.tiles import (
    MANIFEST_FORMAT,
    SHARD_SCHEMA,
    SPLITS,
    UNLABELED,
    load_manifest,
    save_manifest,
    shard_paths,
)
from histodiff_ray.errors import HistodiffError
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import Location, check_access, list_files, open_location

log = logger(__name__)

SAFE_CLASS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
FILES_PER_TASK = 64
# Settings a tile set is built with; a rerun into the same output must use the same ones.
FROZEN_SETTINGS = ("tile_size", "microns_per_pixel", "split_seed", "val_fraction", "test_fraction", "label_fraction")


class IngestError(HistodiffError):
    pass


@dataclass
class SourceFile:
    uri: str  # where the bytes are (origin)
    path: str  # path inside the input location's filesystem
    source: str  # dataset name for the shards' ``source`` column
    label_name: str | None


@dataclass
class TileOptions:
    labeled: bool
    tile_size: int
    target_mpp: float
    source_mpp: float | None
    tissue_fraction: float
    max_image_pixels: int


@dataclass
class FileResult:
    uri: str
    sha1: str = ""
    reason: str | None = None  # set when quarantined
    conversion: str | None = None
    background: int = 0
    tiles: list[dict] = field(default_factory=list)


def tile_id(tile: np.ndarray) -> str:
    return hashlib.sha1(tile.tobytes()).hexdigest()[:24]


def make_tiles(data: bytes, opts: TileOptions) -> FileResult:
    """Decode one source file and cut its tiles (pure; raises images.BadImage)."""
    decoded = images.decode_image(data, opts.max_image_pixels)
    rgb = decoded.rgb
    scale = 1.0 if opts.source_mpp is None else opts.source_mpp / opts.target_mpp
    rgb = images.resample(rgb, scale)
    result = FileResult(uri="", conversion=decoded.conversion)
    if opts.labeled:
        field_of_view = images.square_field(rgb, opts.tile_size, keep_resolution=opts.source_mpp is not None)
        tile = images.to_tile_size(field_of_view, opts.tile_size)
        result.tiles.append(_tile_record(tile, field_of_view, 0, 0))
    else:
        cut, result.background = images.cut_region(rgb, opts.tile_size, opts.tissue_fraction)
        for x, y, tile in cut:
            result.tiles.append(_tile_record(tile, tile, round(x / scale), round(y / scale)))
    return result


def _tile_record(tile: np.ndarray, field_of_view: np.ndarray, x: int, y: int) -> dict:
    return {
        "tile_id": tile_id(tile),
        "image": images.encode_png(tile),
        "signature": images.dihedral_signature(field_of_view).tobytes(),
        "x": x,
        "y": y,
    }


def process_files(files: list[SourceFile], filesystem, opts: TileOptions, known: dict[str, str]) -> list[FileResult]:
    """Read, validate and tile a batch of files; bad ones come back with a reason, never raise."""
    results = []
    for f in files:
        res = FileResult(uri=f.uri)
        try:
            with filesystem.open_input_stream(f.path) as src:
                data = src.read()
        except OSError as exc:
            res.reason = f"unreadable: {str(exc).splitlines()[0]}"
            results.append(res)
            continue
        res.sha1 = hashlib.sha1(data).hexdigest()
        if known.get(f.uri) == res.sha1:
            results.append(res)  # ingested before, unchanged: nothing to do
            continue
        try:
            made = make_tiles(data, opts)
        except images.BadImage as exc:
            res.reason = str(exc)
        else:
            res.conversion, res.background = made.conversion, made.background
            for t in made.tiles:
                t.update(source=f.source, origin=f.uri, label_name=f.label_name)
            res.tiles = made.tiles
        results.append(res)
    return results


def _is_outside(link: str, root: str) -> bool:
    target = os.path.realpath(link)
    return os.path.commonpath([target, os.path.realpath(root)]) != os.path.realpath(root)


def plan_sources(loc: Location, labeled: bool, source_name: str | None) -> tuple[list[SourceFile], list[dict]]:
    """List an input and sort its files into work and quarantine (bad names, links, non-images)."""
    base = source_name or "/".join(loc.path.rstrip("/").split("/")[-2:])
    work, quarantined = [], []
    for rel in list_files(loc):
        item = loc.join(rel)
        parts = rel.split("/")
        if not loc.is_s3 and os.path.islink(item.path):
            if _is_outside(item.path, loc.path):
                quarantined.append(
                    {
                        "path": item.uri,
                        "reason": "symbolic link pointing outside the input root; copy the file in instead",
                    }
                )
                continue
            if os.path.isdir(item.path):
                quarantined.append(
                    {"path": item.uri, "reason": "symbolic link to a folder; links to folders are not followed"}
                )
                continue
        ext = os.path.splitext(rel)[1].lower()
        if ext not in images.IMAGE_EXTENSIONS:
            quarantined.append(
                {
                    "path": item.uri,
                    "reason": f"extension {ext or '(none)'!r} is not an image type {images.IMAGE_EXTENSIONS}",
                }
            )
            continue
        if labeled:
            if len(parts) < 2:
                quarantined.append(
                    {
                        "path": item.uri,
                        "reason": "labeled input must be <root>/<CLASS>/<file>; move the file into its class folder",
                    }
                )
                continue
            if not SAFE_CLASS.match(parts[0]):
                quarantined.append(
                    {
                        "path": item.uri,
                        "reason": f"class folder name {parts[0]!r} is not a safe identifier (a letter, then letters, "
                        "digits, _ or -); rename the folder",
                    }
                )
                continue
            work.append(SourceFile(item.uri, item.path, base, parts[0]))
        else:
            source = f"{base}/{parts[0]}" if len(parts) > 1 else base
            work.append(SourceFile(item.uri, item.path, source, None))
    return work, quarantined


def _rank(seed: int, salt: str, key: str) -> str:
    return hashlib.sha1(f"{seed}:{salt}:{key}".encode()).hexdigest()


def split_groups(new: dict[str, str], stored: dict[str, list[str]], cfg: Config) -> dict[str, str]:
    """Stratified split of new duplicate groups.

    ``new`` maps group → stratum (class); ``stored`` maps stratum → the splits of its stored groups.
    Each stratum is topped up so that its test and val groups stay round(total × fraction), however
    the work was chunked or spread over ingests; within a chunk, groups are ordered by a seeded hash.
    """
    by_stratum: dict[str, list[str]] = {}
    for g, stratum in new.items():
        by_stratum.setdefault(stratum, []).append(g)
    out = {}
    for stratum, members in by_stratum.items():
        members.sort(key=lambda g: _rank(cfg.data.split_seed, "split", g))
        before = stored.get(stratum, [])
        total = len(before) + len(members)
        n_test = max(0, round(total * cfg.data.test_fraction) - before.count("test"))
        n_val = max(0, round(total * cfg.data.val_fraction) - before.count("val"))
        for i, g in enumerate(members):
            out[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def label_groups(new_train: dict[str, str], stored: dict[str, list[bool]], cfg: Config) -> set[str]:
    """The new train groups (group → class) that keep their labels, topping each class up to
    ceil(train groups × label_fraction); ``stored`` maps class → labeled marks of stored train groups."""
    by_class: dict[str, list[str]] = {}
    for g, cls in new_train.items():
        by_class.setdefault(cls, []).append(g)
    keep = set()
    for cls, members in by_class.items():
        members.sort(key=lambda g: _label_rank(cfg.data.split_seed, g))
        before = stored.get(cls, [])
        n_keep = max(0, math.ceil((len(before) + len(members)) * cfg.data.label_fraction) - sum(before))
        keep.update(members[:n_keep])
    return keep


def _label_rank(split_seed: int, group: str) -> str:
    return _rank(split_seed, "label", group)


def labeled_at_fraction(train_groups: dict[str, str], labeled: set[str], fraction: float, split_seed: int) -> set[str]:
    """A nested subset of a tile set's labels: of the train duplicate groups (group → class), per
    class the first ceil(groups × ``fraction``) of its ``labeled`` groups in the seeded order ingest
    labels by. The subset at a smaller fraction lies inside the one at a larger fraction, and all
    inside the tile set's own labels."""
    by_class: dict[str, list[str]] = {}
    for g, cls in train_groups.items():
        by_class.setdefault(cls, []).append(g)
    keep = set()
    for members in by_class.values():
        ranked = sorted((g for g in members if g in labeled), key=lambda g: _label_rank(split_seed, g))
        keep.update(ranked[: math.ceil(len(members) * fraction)])
    return keep


class TileIndex:
    """Everything the manifest and the duplicate search need about stored tiles (no pixels)."""

    COLUMNS = ["tile_id", "label_name", "split", "labeled", "dup_group", "source", "origin", "signature"]

    def __init__(self, table: pa.Table | None = None):
        self.rows: dict[str, list] = {c: [] for c in self.COLUMNS}
        if table is not None:
            for c in self.COLUMNS:
                self.rows[c] = table.column(c).to_pylist()
        self.position = {t: i for i, t in enumerate(self.rows["tile_id"])}

    @classmethod
    def load(cls, root: Location, manifest: dict) -> TileIndex:
        if not manifest["shards"]:
            return cls()
        tables = [
            pq.read_table(p, columns=cls.COLUMNS, filesystem=root.filesystem) for p in shard_paths(root, manifest)
        ]
        return cls(pa.concat_tables(tables))

    def add(self, records: list[dict]) -> None:
        for r in records:
            self.position[r["tile_id"]] = len(self.rows["tile_id"])
            for c in self.COLUMNS:
                self.rows[c].append(r[c])

    def __len__(self) -> int:
        return len(self.rows["tile_id"])


def new_manifest(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    return {
        "format": MANIFEST_FORMAT,
        **{k: getattr(d, k) for k in FROZEN_SETTINGS},
        "classes": [],
        "shards": [],
        "kept": 0,
        "counts": {},
        "labeled_train": {},
        "quarantined": [],
        "converted": [],
        "aliases": {},
        "duplicate_groups": {"count": 0, "tiles": 0, "groups": []},
        "background_tiles_rejected": 0,
        "sources": {},
    }


def _check_frozen(manifest: dict, cfg: Config, output: Location) -> None:
    for key in FROZEN_SETTINGS:
        if manifest[key] != getattr(cfg.data, key):
            raise IngestError(
                f"the tile set at {output} was built with data.{key}={manifest[key]!r}, not "
                f"{getattr(cfg.data, key)!r}; "
                f"pass data.{key}={manifest[key]!r} or use a new --output"
            )


def _summarise(manifest: dict, index: TileIndex) -> None:
    """Recompute counts and duplicate groups from the index (cheap; keeps them consistent)."""
    rows = index.rows
    counts = {s: {} for s in SPLITS}
    labeled_train: dict[str, int] = {}
    sources_by_split = {s: {} for s in SPLITS}
    members: dict[str, list[int]] = {}
    for i in range(len(index)):
        split, name = rows["split"][i], rows["label_name"][i] or UNLABELED
        counts[split][name] = counts[split].get(name, 0) + 1
        sources_by_split[split][rows["source"][i]] = sources_by_split[split].get(rows["source"][i], 0) + 1
        if split == "train" and rows["labeled"][i] and rows["label_name"][i]:
            labeled_train[name] = labeled_train.get(name, 0) + 1
        members.setdefault(rows["dup_group"][i], []).append(i)
    groups = []
    for g, idx in sorted(members.items()):
        origins = [rows["origin"][i] for i in idx] + [
            a for i in idx for a in manifest["aliases"].get(rows["tile_id"][i], [])
        ]
        if len(origins) > 1:
            groups.append(
                {
                    "group": g,
                    "tile_ids": [rows["tile_id"][i] for i in idx],
                    "origins": origins,
                    "labels": sorted({rows["label_name"][i] or UNLABELED for i in idx}),
                    "split": rows["split"][idx[0]],
                }
            )
    manifest["counts"] = counts
    manifest["labeled_train"] = labeled_train
    manifest["sources_by_split"] = sources_by_split
    manifest["kept"] = len(index)
    manifest["duplicate_groups"] = {
        "count": len(groups),
        "tiles": sum(len(g["origins"]) for g in groups),
        "groups": groups,
    }


def _task_batches(plan: list[tuple[Location, SourceFile]]):
    """Consecutive files of one input, at most FILES_PER_TASK per Ray task."""
    batch: list[SourceFile] = []
    loc = None
    for file_loc, f in plan:
        if batch and (file_loc is not loc or len(batch) == FILES_PER_TASK):
            yield loc, batch
            batch = []
        loc = file_loc
        batch.append(f)
    if batch:
        yield loc, batch


def _commit_chunk(results: list[FileResult], manifest: dict, index: TileIndex, output: Location, cfg: Config) -> int:
    """Dedupe, split and write the tiles of one chunk; then commit the manifest. Returns tiles added."""
    before = json.dumps(manifest, sort_keys=True)
    quarantined = {q["path"] for q in manifest["quarantined"]}
    fresh: list[dict] = []
    fresh_ids: dict[str, dict] = {}
    for res in results:
        if res.sha1 and manifest["sources"].get(res.uri) == res.sha1:
            continue
        if res.reason is not None:
            if res.uri not in quarantined:
                manifest["quarantined"].append({"path": res.uri, "reason": res.reason})
                quarantined.add(res.uri)
            manifest["sources"][res.uri] = res.sha1
            continue
        if res.conversion:
            manifest["converted"].append({"path": res.uri, "conversion": res.conversion})
        manifest["background_tiles_rejected"] += res.background
        for t in res.tiles:
            tid = t["tile_id"]
            twin = fresh_ids.get(tid) or (
                {
                    "label_name": index.rows["label_name"][index.position[tid]],
                    "origin": index.rows["origin"][index.position[tid]],
                }
                if tid in index.position
                else None
            )
            if twin is not None:
                if twin["label_name"] != t["label_name"]:
                    manifest["quarantined"].append(
                        {
                            "path": t["origin"],
                            "reason": f"same pixels as {twin['origin']} but labeled {t['label_name']!r}, not "
                            f"{twin['label_name']!r}; fix the label",
                        }
                    )
                elif twin["origin"] != t["origin"]:
                    manifest["aliases"].setdefault(tid, []).append(t["origin"])
                continue
            fresh_ids[tid] = t
            fresh.append(t)
        manifest["sources"][res.uri] = res.sha1
    if fresh:
        for name in sorted({t["label_name"] for t in fresh if t["label_name"]}):
            if name not in manifest["classes"]:
                manifest["classes"].append(name)
        _place(fresh, index, manifest, cfg)
        write_shards(fresh, output, manifest, cfg.data.tiles_per_shard)
        index.add(fresh)
    _summarise(manifest, index)
    if json.dumps(manifest, sort_keys=True) != before:  # a rerun of the same inputs writes nothing
        save_manifest(output, manifest)
    return len(fresh)


def _place(fresh: list[dict], index: TileIndex, manifest: dict, cfg: Config) -> None:
    """Duplicate groups, split, label mark and label index for new tiles (in place)."""
    sigs = [np.frombuffer(s, np.uint8) for s in index.rows["signature"]] + [
        np.frombuffer(t["signature"], np.uint8) for t in fresh
    ]
    side = images.SIGNATURE_SIZE
    stacked = np.stack(sigs).reshape(-1, side, side, 3)
    ids = index.rows["tile_id"] + [t["tile_id"] for t in fresh]
    known = list(index.rows["dup_group"]) + [None] * len(fresh)
    groups = assign_groups(stacked, ids, known)[len(index) :]
    existing: dict[str, tuple[str, bool]] = {}
    stored_splits: dict[str, list[str]] = {}
    stored_marks: dict[str, list[bool]] = {}
    for g, split, mark, name in zip(
        index.rows["dup_group"], index.rows["split"], index.rows["labeled"], index.rows["label_name"]
    ):
        if g in existing:
            continue  # one vote per group
        existing[g] = (split, mark)
        stored_splits.setdefault(name or UNLABELED, []).append(split)
        if split == "train" and name:
            stored_marks.setdefault(name, []).append(mark)
    stratum: dict[str, str] = {}
    for t, g in zip(fresh, groups):
        t["dup_group"] = g
        if g not in existing:
            stratum.setdefault(g, t["label_name"] or UNLABELED)
    split_of = split_groups(stratum, stored_splits, cfg)
    new_train = {g: s for g, s in stratum.items() if split_of[g] == "train" and s != UNLABELED}
    kept_labels = label_groups(new_train, stored_marks, cfg)
    for t in fresh:
        g = t["dup_group"]
        if g in existing:
            t["split"], t["labeled"] = existing[g]
        else:
            t["split"] = split_of[g]
            t["labeled"] = t["label_name"] is not None and (t["split"] != "train" or g in kept_labels)
        t["label"] = manifest["classes"].index(t["label_name"]) if t["label_name"] else -1


def write_shards(tiles: list[dict], output: Location, manifest: dict, per_shard: int) -> None:
    """Write tiles as Parquet shards named by their content, so a rerun rewrites the same files; each
    with an index file beside it (every column but the pixels), which is what a damaged shard is
    rebuilt from (``repair_shards``)."""
    for start in range(0, len(tiles), per_shard):
        part = tiles[start : start + per_shard]
        digest = hashlib.sha1("".join(t["tile_id"] for t in part).encode()).hexdigest()[:16]
        manifest["shards"].append(_write_shard_pair(output, f"part-{digest}.parquet", part))


def _write_shard_pair(output: Location, name: str, part: list[dict]) -> dict:
    table = pa.Table.from_pylist([{c: t[c] for c in SHARD_SCHEMA.names} for t in part], schema=SHARD_SCHEMA)
    index = write_shard(output, f"index/{name}", table.drop_columns(["image"]))
    # Small row groups let readers start streaming before a whole shard has arrived.
    return {**write_shard(output, f"shards/{name}", table, row_group_size=512), "index": index}


def repair_shards(
    output: Location, manifest: dict, opts: TileOptions, plan: list[tuple[Location, SourceFile]], verify: bool
) -> int:
    """Rewrite the damaged or missing shards of the tile set at ``output`` from their source files,
    with the splits, labels and duplicate groups their index files recorded (nothing moves between
    splits); a damaged index file beside a sound shard is rewritten from the shard. Returns how many
    shards were rewritten. Tile sets written before index files existed cannot be repaired."""

    damaged = damaged_shards(output, manifest["shards"], SHARD_SCHEMA, checksum=verify)
    index_schema = SHARD_SCHEMA.remove(SHARD_SCHEMA.get_field_index("image"))
    damaged_index = damaged_shards(
        output, [r["index"] for r in manifest["shards"] if "index" in r], index_schema, checksum=verify
    )
    sources = {f.uri: (loc, f) for loc, f in plan}
    for i, record in enumerate(manifest["shards"]):
        shard = output.join(record["path"])
        index_damage = damaged_index.get(record["index"]["path"]) if "index" in record else None
        if record["path"] not in damaged:
            if index_damage:
                table = pq.read_table(shard.path, filesystem=output.filesystem).drop_columns(["image"])
                record["index"] = write_shard(output, record["index"]["path"], table)
            continue
        if "index" not in record:
            raise IngestError(
                f"{shard} is damaged ({damaged[record['path']]}) and this tile set was written before shards had "
                f"index files, so its tiles' splits cannot be restored; ingest the same inputs into a new --output"
            )
        if index_damage:
            raise IngestError(
                f"{shard} is damaged ({damaged[record['path']]}) and so is its index file ({index_damage}); "
                f"its tiles cannot be rebuilt: ingest the same inputs into a new --output"
            )
        rows = pq.read_table(output.join(record["index"]["path"]).path, filesystem=output.filesystem).to_pylist()
        origins = sorted({r["origin"] for r in rows})
        absent = [o for o in origins if o not in sources]
        if absent:
            raise IngestError(
                f"{shard} is damaged ({damaged[record['path']]}); its tiles come from {absent[0]}"
                f"{f' and {len(absent) - 1} more file(s)' if len(absent) > 1 else ''}, which no --input of this "
                f"run lists: re-run ingest with the --input (and --mpp) that built it"
            )
        made = {}
        for o in origins:  # each from its own input's filesystem (one run may mix local and S3 inputs)
            for res in process_files([sources[o][1]], sources[o][0].filesystem, opts, known={}):
                made.update((t["tile_id"], t["image"]) for t in res.tiles)
        lost = [r for r in rows if r["tile_id"] not in made]
        if lost:
            raise IngestError(
                f"{shard} is damaged ({damaged[record['path']]}); {lost[0]['origin']} no longer gives tile "
                f"{lost[0]['tile_id']} (the file changed, or it was ingested with another --mpp); restore the "
                f"file, or ingest the inputs into a new --output"
            )
        name = record["path"].removeprefix("shards/")
        manifest["shards"][i] = _write_shard_pair(output, name, [{**r, "image": made[r["tile_id"]]} for r in rows])
        log.info(f"[ingest] rewrote {shard} ({damaged[record['path']]}) from {len(origins)} source file(s)")
    return len(damaged)


def ingest(
    cfg: Config,
    inputs: list[str],
    output: str,
    *,
    labeled: bool = False,
    source_mpp: float | None = None,
    source_name: str | None = None,
    progress: bool = True,
    verify: bool = False,
) -> dict[str, Any]:
    """Ingest ``inputs`` into the tile set at ``output``; returns the committed manifest. Damaged or
    missing shards of ``output`` are rewritten from their sources first (``verify``: also compare
    every stored shard's SHA-256 with the manifest's, which reads the whole tile set)."""

    if not inputs:
        raise IngestError("ingest needs at least one --input")
    if source_mpp is not None and source_mpp <= 0:
        raise IngestError(f"--mpp {source_mpp} is not allowed; give the source's microns per pixel (> 0)")
    if source_name and len(inputs) > 1:
        raise IngestError("--source names one input; ingest several inputs with one call each")
    out = open_location(output, cfg.storage)
    check_access(out, "write")
    in_locs = [open_location(uri, cfg.storage) for uri in inputs]
    for loc in in_locs:
        check_access(loc, "read")
    manifest = load_manifest(out)
    if manifest is None:
        manifest = new_manifest(cfg)
    else:
        _check_frozen(manifest, cfg, out)

    opts = TileOptions(
        labeled,
        cfg.data.tile_size,
        cfg.data.microns_per_pixel,
        source_mpp,
        cfg.data.tissue_fraction,
        cfg.data.max_image_pixels,
    )
    plan: list[tuple[Location, SourceFile]] = []
    early_quarantine = []
    for loc in in_locs:
        work, bad = plan_sources(loc, labeled, source_name)
        plan += [(loc, f) for f in work]
        early_quarantine += bad
    before = json.dumps(manifest, sort_keys=True)
    repair_shards(out, manifest, opts, plan, verify)
    if json.dumps(manifest, sort_keys=True) != before:
        save_manifest(out, manifest)
    index = TileIndex.load(out, manifest)
    known_q = {q["path"] for q in manifest["quarantined"]}
    new_q = [q for q in early_quarantine if q["path"] not in known_q]
    if new_q:
        manifest["quarantined"] += new_q
        _summarise(manifest, index)
        save_manifest(out, manifest)

    init_ray(cfg)
    process = ray.remote(num_cpus=1)(process_files)
    bar = tqdm(total=len(plan), desc="ingest", unit="file", disable=not progress, mininterval=1.0)
    added = 0
    for start in range(0, len(plan), cfg.data.files_per_chunk):
        chunk = plan[start : start + cfg.data.files_per_chunk]
        refs = [
            process.remote(files, loc.filesystem, opts, {f.uri: manifest["sources"].get(f.uri) for f in files})
            for loc, files in _task_batches(chunk)
        ]
        by_ref: dict = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            by_ref[ready[0]] = ray.get(ready[0])
            bar.update(len(by_ref[ready[0]]))
        # Results in plan order, so a rerun builds the same shards.
        results = [r for ref in refs for r in by_ref[ref]]
        added += _commit_chunk(results, manifest, index, out, cfg)
        bar.set_postfix(tiles=len(index), added=added, quarantined=len(manifest["quarantined"]))
    bar.close()
    return manifest


def summarize_manifest(manifest: dict) -> str:
    """What `histodiff ingest` prints: tiles kept per split and class, duplicates, rejects, quarantine."""
    lines = [
        f"kept {manifest['kept']} tiles in {len(manifest['shards'])} shard(s); classes: "
        f"{manifest['classes'] or '(none)'}"
    ]
    for split, counts in manifest["counts"].items():
        if counts:
            lines.append(f"  {split:5s} " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    if manifest["labeled_train"]:
        lines.append(
            "  labeled train tiles: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest["labeled_train"].items()))
        )
    dup = manifest["duplicate_groups"]
    lines.append(f"duplicate groups (exact or rotated/flipped copies): {dup['count']} groups, {dup['tiles']} tiles")
    lines.append(f"background tiles rejected by the tissue filter: {manifest['background_tiles_rejected']}")
    if manifest["converted"]:
        kinds = Counter(c["conversion"] for c in manifest["converted"])
        lines.append("converted: " + ", ".join(f"{k} ×{v}" for k, v in kinds.items()))
    if manifest["quarantined"]:
        lines.append(f"quarantined {len(manifest['quarantined'])} file(s) (listed in manifest.json):")
        for q in manifest["quarantined"][:20]:
            lines.append(f"  {q['path']}: {q['reason']}")
        if len(manifest["quarantined"]) > 20:
            lines.append(f"  … and {len(manifest['quarantined']) - 20} more")
    return "\n".join(lines)
