"""Ingest into a real S3 server (and local folders), with real crc5 tiles and every bad kind."""

import hashlib
import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histodiff_ray.config import load_config
from histodiff_ray.data import ingest as ingest_module
from histodiff_ray.data.ingest import ingest
from histodiff_ray.data.tiles import load_manifest, shard_paths
from histodiff_ray.storage import open_location, read_bytes
from tests.data.badfiles import write_bad_inputs

# Rotated/flipped copies that crc5 really holds (found by the full-set test below).
PLANTED_PAIRS = [
    ("T", "train_image_T_1754.jpg", "train_image_T_1896.jpg"),
    ("AC", "train_image_AC_2184.jpg", "train_image_AC_2400.jpg"),
    ("T", "train_image_T_1550.jpg", "train_image_T_872.jpg"),
]
PER_CLASS = 30


def make_labeled_input(root, shared_data, classes=("AC", "T", "S"), per_class=PER_CLASS, offset=0):
    crc5 = shared_data / "crc5" / "train"
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in sorted((crc5 / cls).glob("*.jpg"))[offset : offset + per_class]:
            shutil.copy(p, root / cls / p.name)
    return root


@pytest.fixture
def labeled_input(tmp_path, shared_data):
    root = make_labeled_input(tmp_path / "input", shared_data)
    for cls, a, b in PLANTED_PAIRS:
        for name in (a, b):
            shutil.copy(shared_data / "crc5" / "train" / cls / name, root / cls / name)
    bad = write_bad_inputs(root, shared_data / "crc5" / "train" / "H" / "train_image_H_0.jpg")
    return root, bad


def _objects(root):
    return {p: read_bytes(root.join(p)) for p in ["manifest.json"] + [s["path"] for s in load_manifest(root)["shards"]]}


def test_ingest_to_s3_quarantines_bad_input_dedupes_and_splits(ray_local, s3_overrides, bucket, labeled_input):
    root, bad = labeled_input
    cfg = load_config("cpu", s3_overrides + ["data.label_fraction=0.5", "data.files_per_chunk=40"])
    uri = f"s3://{bucket}/tiles"
    manifest = ingest(cfg, [str(root)], uri, labeled=True, progress=False)

    # Every bad kind is quarantined with its reason or converted, and says so.
    quarantined = {q["path"]: q["reason"] for q in manifest["quarantined"]}
    converted = {c["path"]: c["conversion"] for c in manifest["converted"]}
    for rel, (outcome, text) in bad.items():
        found = (quarantined if outcome == "quarantined" else converted).get(str(root / rel))
        assert found is not None and text in found, (rel, outcome, text, found)
    # The converted files are all made from one tile: the 16-bit and the opaque RGBA PNG hold the
    # same pixels (stored once), the CMYK JPEG is a lossy copy of them: one duplicate group.
    converted_copies = ("cmyk.jpg", "rgba.png", "sixteen_bit.png")
    n_good = 3 * PER_CLASS + 2 * len(PLANTED_PAIRS) + sum(1 for o, _ in bad.values() if o == "converted") - 1
    assert manifest["kept"] == n_good
    assert set(manifest["classes"]) == {"AC", "T", "S", "H"}

    # The planted copies are found, grouped, and kept in one split.
    groups = manifest["duplicate_groups"]["groups"]
    found_pairs = sorted(tuple(sorted(o.split("/")[-1] for o in g["origins"])) for g in groups)
    assert found_pairs == sorted([tuple(sorted(p[1:])) for p in PLANTED_PAIRS] + [converted_copies])
    assert all(len(set(g["labels"])) == 1 for g in groups)

    # Shards: schema, PNG tiles of the profile's size, tile_id = hash of the pixels.
    loc = open_location(uri, cfg.storage)
    table = pq.read_table(shard_paths(loc, manifest)[0], filesystem=loc.filesystem)
    row = table.slice(0, 1).to_pylist()[0]
    pixels = np.asarray(Image.open(io.BytesIO(row["image"])))
    assert pixels.shape == (64, 64, 3) and hashlib.sha1(pixels.tobytes()).hexdigest()[:24] == row["tile_id"]
    assert row["source"].endswith("/input") and row["origin"].startswith(str(root))

    all_rows = pq.read_table(
        shard_paths(loc, manifest),
        filesystem=loc.filesystem,
        columns=["tile_id", "label_name", "split", "labeled", "dup_group"],
    ).to_pylist()
    assert len(all_rows) == len({r["tile_id"] for r in all_rows}) == n_good
    for g in groups:
        assert len({r["split"] for r in all_rows if r["dup_group"] == g["group"]}) == 1
    # Stratified by class: each class's groups are split by the configured fractions.
    for cls in ("AC", "T", "S"):
        by_group = {r["dup_group"]: r["split"] for r in all_rows if r["label_name"] == cls}
        n = len(by_group)
        assert sum(s == "test" for s in by_group.values()) == round(n * 0.2)
        assert sum(s == "val" for s in by_group.values()) == round(n * 0.1)
        train_groups = {g for g, s in by_group.items() if s == "train"}
        labeled_groups = {
            r["dup_group"] for r in all_rows if r["label_name"] == cls and r["split"] == "train" and r["labeled"]
        }
        assert len(labeled_groups) == -(-len(train_groups) // 2)  # ceil(0.5 × train groups)
    counts = manifest["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == n_good

    # A rerun on the same inputs changes nothing, byte for byte.
    before = _objects(loc)
    again = ingest(cfg, [str(root)], uri, labeled=True, progress=False)
    assert _objects(loc) == before and again == manifest


def test_new_inputs_add_only_themselves(ray_local, s3_overrides, bucket, tmp_path, shared_data):
    cfg = load_config("cpu", s3_overrides)
    uri = f"s3://{bucket}/tiles"
    first = make_labeled_input(tmp_path / "first", shared_data, classes=("AC", "V"), per_class=12)
    m1 = ingest(cfg, [str(first)], uri, labeled=True, progress=False)
    loc = open_location(uri, cfg.storage)
    before_rows = pq.read_table(
        shard_paths(loc, m1), filesystem=loc.filesystem, columns=["tile_id", "split"]
    ).to_pylist()
    second = make_labeled_input(tmp_path / "second", shared_data, classes=("V", "S"), per_class=12, offset=12)
    m2 = ingest(cfg, [str(first), str(second)], uri, labeled=True, progress=False)
    assert m2["kept"] == m1["kept"] + 24
    assert m2["shards"][: len(m1["shards"])] == m1["shards"]
    after = {
        r["tile_id"]: r["split"]
        for r in pq.read_table(
            shard_paths(loc, m2), filesystem=loc.filesystem, columns=["tile_id", "split"]
        ).to_pylist()
    }
    assert all(after[r["tile_id"]] == r["split"] for r in before_rows)
    assert m2["classes"] == ["AC", "V", "S"]  # label indices of stored tiles never move


def test_unlabeled_regions_are_resampled_cut_and_filtered(ray_local, tmp_path, shared_data):
    src = tmp_path / "regions" / "brain"
    src.mkdir(parents=True)
    for p in sorted((shared_data / "unlabeled" / "gbm40-brain").glob("*.jpg"))[:3]:
        shutil.copy(p, src / p.name)
    cfg = load_config("cpu")
    manifest = ingest(cfg, [str(tmp_path / "regions")], str(tmp_path / "out"), source_mpp=0.5, progress=False)
    loc = open_location(str(tmp_path / "out"), cfg.storage)
    rows = pq.read_table(shard_paths(loc, manifest), filesystem=loc.filesystem).to_pylist()
    scale = 0.5 / cfg.data.microns_per_pixel  # 512 px at 0.5 µm/px → 146 px at 1.75 µm/px → a 2×2 grid
    offset = (round(512 * scale) - 2 * 64) // 2  # the grid is centred
    grid = {round((offset + i * 64) / scale) for i in range(2)}  # tile corners in source pixels
    assert 0 < len(rows) <= 3 * 4
    assert len(rows) + manifest["background_tiles_rejected"] == 3 * 4
    for r in rows:
        assert r["label"] == -1 and r["label_name"] is None and not r["labeled"]
        assert r["source"].endswith("regions/brain")
        assert Image.open(io.BytesIO(r["image"])).size == (64, 64)
        assert r["x"] in grid and r["y"] in grid


def test_interrupted_ingest_finishes_on_rerun_without_duplicates(ray_local, tmp_path, shared_data, monkeypatch):
    src = make_labeled_input(tmp_path / "input", shared_data, classes=("AC", "H", "T"), per_class=20)
    cfg = load_config("cpu", ["data.files_per_chunk=16", "data.tiles_per_shard=8"])
    clean = ingest(cfg, [str(src)], str(tmp_path / "clean"), labeled=True, progress=False)

    real_save = ingest_module.save_manifest
    calls = {"n": 0}

    def crash_on_second_commit(root, manifest):
        calls["n"] += 1
        if calls["n"] == 2:  # chunk 2's shards are written, its manifest is not: a kill right here
            raise KeyboardInterrupt
        real_save(root, manifest)

    monkeypatch.setattr(ingest_module, "save_manifest", crash_on_second_commit)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        ingest(cfg, [str(src)], str(out), labeled=True, progress=False)
    partial = json.loads((out / "manifest.json").read_text())
    assert 0 < partial["kept"] < clean["kept"]
    monkeypatch.setattr(ingest_module, "save_manifest", real_save)

    resumed = ingest(cfg, [str(src)], str(out), labeled=True, progress=False)
    loc_a, loc_b = open_location(str(tmp_path / "clean"), cfg.storage), open_location(str(out), cfg.storage)
    cols = ["tile_id", "split", "labeled", "label"]
    rows_a = pq.read_table(shard_paths(loc_a, clean), columns=cols).to_pylist()
    rows_b = pq.read_table(shard_paths(loc_b, resumed), columns=cols).to_pylist()
    assert len(rows_b) == len({r["tile_id"] for r in rows_b}) == clean["kept"]
    assert sorted(rows_a, key=lambda r: r["tile_id"]) == sorted(rows_b, key=lambda r: r["tile_id"])
    assert resumed["counts"] == clean["counts"]


@pytest.mark.slow
def test_full_crc5_ingest_finds_its_rotated_copies(ray_local, tmp_path, shared_data):
    cfg = load_config("cpu", ["data.label_fraction=0.05"])
    m = ingest(cfg, [str(shared_data / "crc5" / "train")], str(tmp_path / "crc5"), labeled=True, progress=False)
    assert m["kept"] == 12881 and not m["quarantined"]
    # Measured on this data by two independent metrics (see docs/data.md): 496 pairs of
    # rotated/flipped copies, no larger groups, none across classes.
    dup = m["duplicate_groups"]
    assert dup["count"] == 496 and dup["tiles"] == 992
    assert all(len(g["origins"]) == 2 and len(g["labels"]) == 1 for g in dup["groups"])
    for cls, n in m["labeled_train"].items():
        train = m["counts"]["train"][cls]
        assert 0.04 * train <= n <= 0.06 * train + 1
