"""Damaged shards, locally and on the S3 server: a truncated shard, a file that is not Parquet, a
Parquet file of another schema, a deleted shard and a flipped byte. Readers stop with one line that
names the shard and the fix; `ingest` re-run on the same inputs rewrites the shard from its sources,
byte for byte, with the splits and labels it had."""

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histodiff_ray.config import load_config
from histodiff_ray.data.ingest import IngestError, ingest
from histodiff_ray.data.latents import read_latents
from histodiff_ray.data.shards import DamagedShardError, shard_damage, write_shard
from histodiff_ray.data.tiles import load_manifest, load_tile_table, read_tiles
from histodiff_ray.storage import open_location, read_bytes, write_atomic
from tests.data.test_ingest import make_labeled_input


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]  # an upload cut short


def _not_parquet(data: bytes) -> bytes:
    return b"<Error><Code>InternalError</Code></Error>" * (len(data) // 40)  # a proxy's error page saved as the object


def _other_schema(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"tile_id": ["x"], "pixels": [b"y"]}), sink)  # someone else's Parquet under this name
    return sink.getvalue().to_pybytes()


@pytest.fixture(params=["local", "s3"])
def tile_set(request, ray_local, tmp_path, shared_data, s3_overrides):
    """A labeled tile set of 3 classes × 6 real crc5 tiles in shards of 4, and the ingest that built it."""
    src = make_labeled_input(tmp_path / "input", shared_data, classes=("AC", "H", "T"), per_class=6)
    if request.param == "s3":
        bucket = f"shards-{tmp_path.name.lower().replace('_', '-')[-40:]}"
        request.getfixturevalue("s3").create_bucket(bucket)
        uri = f"s3://{bucket}/tiles"
    else:
        uri = str(tmp_path / "tiles")
    cfg = load_config("cpu", s3_overrides + ["data.tiles_per_shard=4", "data.label_fraction=0.5"])
    manifest = ingest(cfg, [str(src)], uri, labeled=True, progress=False)
    assert len(manifest["shards"]) >= 4
    return cfg, src, uri, manifest


@pytest.mark.parametrize(
    "damage", [_truncate, _not_parquet, _other_schema], ids=["truncated", "not-parquet", "other-schema"]
)
def test_a_damaged_tile_shard_is_one_line_then_ingest_rewrites_it(tile_set, damage):
    cfg, src, uri, manifest = tile_set
    root = open_location(uri, cfg.storage)
    shard = manifest["shards"][1]
    original = read_bytes(root.join(shard["path"]))
    assert hashlib.sha256(original).hexdigest() == shard["sha256"] and len(original) == shard["bytes"]
    rows_before = load_tile_table(root, "train", columns=["tile_id", "label", "labeled", "split"]).sort_by("tile_id")
    write_atomic(root.join(shard["path"]), damage(original))

    for read in (lambda: load_tile_table(root, "train"), lambda: read_tiles(root, "train")):
        with pytest.raises(DamagedShardError) as err:
            read()
        message = str(err.value)
        assert "\n" not in message and str(root.join(shard["path"])) in message
        assert "were written (cut short or replaced)" in message and "re-run `histodiff ingest`" in message

    repaired = ingest(cfg, [str(src)], uri, labeled=True, progress=False)
    assert read_bytes(root.join(shard["path"])) == original  # rebuilt from the source files, byte for byte
    assert repaired["shards"] == manifest["shards"] and repaired["counts"] == manifest["counts"]
    rows_after = load_tile_table(root, "train", columns=["tile_id", "label", "labeled", "split"]).sort_by("tile_id")
    assert rows_after.equals(rows_before)  # same tiles, labels, label marks and splits


def test_a_deleted_shard_and_a_flipped_byte_are_rewritten_and_verify_finds_the_flip(tile_set):
    cfg, src, uri, manifest = tile_set
    root = open_location(uri, cfg.storage)
    gone, flipped = manifest["shards"][0], manifest["shards"][2]
    originals = {s["path"]: read_bytes(root.join(s["path"])) for s in (gone, flipped)}
    root.filesystem.delete_file(root.join(gone["path"]).path)
    data = bytearray(originals[flipped["path"]])
    data[len(data) // 3] ^= 0xFF  # bit rot inside a page: the size and the footer still look right
    write_atomic(root.join(flipped["path"]), bytes(data))

    with pytest.raises(DamagedShardError, match="missing"):
        load_tile_table(root, "val")
    ingest(cfg, [str(src)], uri, labeled=True, progress=False)  # repairs the deleted one; the flip needs --verify
    assert read_bytes(root.join(gone["path"])) == originals[gone["path"]]
    assert read_bytes(root.join(flipped["path"])) == bytes(data)
    ingest(cfg, [str(src)], uri, labeled=True, progress=False, verify=True)
    assert read_bytes(root.join(flipped["path"])) == originals[flipped["path"]]


def test_a_shard_cannot_be_rebuilt_without_its_sources_or_its_index(tile_set, tmp_path, shared_data):
    cfg, src, uri, manifest = tile_set
    root = open_location(uri, cfg.storage)
    shard = manifest["shards"][0]
    write_atomic(root.join(shard["path"]), b"")
    other = make_labeled_input(tmp_path / "other", shared_data, classes=("AC",), per_class=1, offset=100)
    with pytest.raises(IngestError, match=r"which no --input of this run lists: re-run ingest with the --input"):
        ingest(cfg, [str(other)], uri, labeled=True, progress=False)
    write_atomic(root.join(shard["index"]["path"]), b"not parquet")
    with pytest.raises(IngestError, match="and so is its index file"):
        ingest(cfg, [str(src)], uri, labeled=True, progress=False)
    assert load_manifest(root)["shards"] == manifest["shards"]  # the failed repairs committed nothing


def test_records_without_sizes_are_checked_by_their_footer(tmp_path):
    """Manifests written before sizes and checksums were kept list only path and rows: the Parquet
    footer then tells a cut, a foreign file and a wrong row count apart."""
    root = open_location(str(tmp_path), load_config("cpu").storage)
    table = pa.table({"tile_id": ["a", "b", "c"], "latent": [b"1", b"2", b"3"]})
    schema = table.schema
    record = {"path": "shards/part-0.parquet", "rows": 3}
    assert shard_damage(root, write_shard(root, record["path"], table), schema, checksum=True) is None
    cases = [
        (lambda: _truncate(read_bytes(root.join(record["path"]))), "not a readable Parquet file"),
        (lambda: _other_schema(b""), "not a shard of this set (column(s) latent missing"),
        (lambda: _parquet(table.slice(0, 2)), "2 rows stored where 3 were written"),
    ]
    for make, reason in cases:
        write_shard(root, record["path"], table)
        write_atomic(root.join(record["path"]), make())
        assert reason in shard_damage(root, record, schema)
    root.filesystem.delete_file(root.join(record["path"]).path)
    assert shard_damage(root, record, schema) == "missing"


def _parquet(table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_a_damaged_latent_shard_names_encode_latents(tiny_latents):
    overrides, bucket = tiny_latents
    cfg = load_config("cpu", overrides)
    root = open_location(f"s3://{bucket}/latents", cfg.storage)
    shard = json.loads(read_bytes(root.join("manifest.json")))["shards"][0]
    original = read_bytes(root.join(shard["path"]))
    write_atomic(root.join(shard["path"]), _truncate(original))
    try:
        with pytest.raises(DamagedShardError) as err:
            read_latents(root)
        assert str(root.join(shard["path"])) in str(err.value) and "re-run `histodiff encode-latents`" in str(err.value)
    finally:
        write_atomic(root.join(shard["path"]), original)  # the latent set is shared with other tests
    assert read_latents(root).count() > 0
