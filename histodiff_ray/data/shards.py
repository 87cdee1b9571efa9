"""Parquet shards that say when they are damaged.

Tile, latent and synthetic sets store their rows as Parquet shards listed by a manifest (or a
generation plan). A stored shard can be damaged after it was written: an upload cut short, a bad
disk, a file replaced by hand. pyarrow then fails deep inside a Ray Data task ("Parquet magic bytes
not found"), far from anything a user can act on. So every shard is written by ``write_shard``,
which returns its record for the manifest (path, rows, bytes, SHA-256), and every reader first runs
``check_shards``: the stored size against the record, then the Parquet footer (readable, the set's
columns, the row count) and, when asked, the checksum, which reads every byte. It names the
damaged shard and the command that repairs it, in one line.
"""

from __future__ import annotations

import concurrent.futures
import hashlib

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from histodiff_ray.errors import HistodiffError
from histodiff_ray.storage import Location, write_atomic


class DamagedShardError(HistodiffError):
    """A stored shard is missing or is not what its manifest says was written."""


def write_shard(root: Location, path: str, table: pa.Table, row_group_size: int | None = None) -> dict:
    """Write ``table`` atomically to ``root/path``; returns the shard's record for the manifest."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    data = sink.getvalue().to_pybytes()
    write_atomic(root.join(path), data)
    return {"path": path, "rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def shard_damage(root: Location, record: dict, schema: pa.Schema, checksum: bool = False) -> str | None:
    """What is wrong with the shard ``record`` describes, or None. Records written before sizes
    and checksums were kept (only ``path`` and ``rows``) are checked by their footer alone."""
    loc = root.join(record["path"])
    try:
        info = root.filesystem.get_file_info(loc.path)
    except OSError as exc:
        return f"unreadable ({_first_line(exc)})"
    if info.type == pafs.FileType.NotFound:
        return "missing"
    if "bytes" in record and info.size != record["bytes"]:
        return f"{info.size:,} bytes stored where {record['bytes']:,} were written (cut short or replaced)"
    try:
        meta = pq.read_metadata(loc.path, filesystem=root.filesystem)
    except (OSError, pa.ArrowException) as exc:
        return f"not a readable Parquet file ({_first_line(exc)})"
    stored = meta.schema.to_arrow_schema()
    wrong = [f.name for f in schema if stored.get_field_index(f.name) < 0 or stored.field(f.name).type != f.type]
    if wrong:
        return f"not a shard of this set (column(s) {', '.join(wrong)} missing or of another type)"
    if meta.num_rows != record["rows"]:
        return f"{meta.num_rows:,} rows stored where {record['rows']:,} were written"
    if checksum and "sha256" in record and _sha256(loc) != record["sha256"]:
        return "its SHA-256 differs from the one recorded when it was written"
    return None


def _sha256(loc: Location, chunk: int = 8 << 20) -> str:
    """Streamed, so that checking many large shards at once holds 8 MB of each, not all of it."""
    digest = hashlib.sha256()
    with loc.filesystem.open_input_stream(loc.path) as src:
        while block := src.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def damaged_shards(root: Location, records: list[dict], schema: pa.Schema, checksum: bool = False) -> dict[str, str]:
    """path → what is wrong, for every damaged shard of ``records`` (checked in parallel: on S3
    each check is a round trip or two)."""
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        found = list(pool.map(lambda r: shard_damage(root, r, schema, checksum), records))
    return {r["path"]: reason for r, reason in zip(records, found) if reason is not None}


def check_shards(root: Location, records: list[dict], schema: pa.Schema, fix: str, checksum: bool = False) -> None:
    """Raise one line naming the first damaged shard and ``fix`` (the command that repairs it)."""
    damaged = damaged_shards(root, records, schema, checksum)
    if damaged:
        path, reason = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more damaged shard(s))" if len(damaged) > 1 else ""
        raise DamagedShardError(f"{root.join(path)} is damaged: {reason}{more}; {fix}")
