"""A `histodiff generate` job's rate from its shards' write times, for comparing samplers on the
same machine in one window (docs/benchmarks.md, "Fewer sampling steps at equal fidelity"):

    .venv/bin/python bench/shard_rate.py ~/hd/synthetic/cg ~/hd/synthetic/sde15karras_seed0

"steady" counts the tiles written after the second shard over the time since it: each of the two
actors' first shard carries its start-up (model loading, the real tiles' thumbnails), which the
whole job's wall time includes. Local folders only (it reads file modification times).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq


def shard_rate(folder: Path) -> str:
    shards = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in folder.glob("shards/*.parquet"))
    if len(shards) < 3:
        raise SystemExit(f"{folder}: {len(shards)} shards; a steady rate needs at least 3 (is it a generate output?)")
    times, rows = zip(*shards)
    steady = sum(rows[2:]) / (times[-1] - times[1])
    span = times[-1] - times[0]
    return f"{folder}: {len(shards)} shards, {sum(rows)} tiles, first to last {span:.0f} s, steady {steady:.2f} tiles/s"


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    for arg in sys.argv[1:]:
        print(shard_rate(Path(arg).expanduser()))
