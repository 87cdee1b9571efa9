"""Streaming benchmark: tiles/s from a real S3 server, Ray Data shards vs one object per tile.

Run from the repository root (the crc5 tiles are read from ../shared/data, never copied here)::

    export RAY_AUTH_MODE=disabled
    .venv/bin/python bench/stream.py --json /tmp/bench-stream.json                  # all 12,881 tiles, ~10 min
    .venv/bin/python bench/stream.py --tiles-per-class 200 --json /tmp/quick.json   # quick run, ~1.5 min

What one run does (everything in a temporary folder, cleaned up at the end, even on error; a
watchdog process removes the S3 server should this process be killed outright). Results and the
reading of them: docs/benchmarks.md.

setup (not timed as throughput)
    Starts a SeaweedFS S3 server on loopback (``histodiff_ray.s3server.S3Server``) and a private
    local Ray cluster (``ray.init(address="local")``, otherwise the settings of
    ``raycluster.init_ray``), then ``ingest``s the crc5 tiles (labeled) into ``s3://bench/tiles``.
    The same 64×64 PNG bytes are then taken from those shards and uploaded as one object per tile
    under ``s3://bench/naive/<tile_id>.png`` (s3fs ``pipe``, concurrent PUTs), and a 10× tile set
    is written under ``s3://bench/tiles10x``: server-side copies of every shard object, 10 times,
    listed by its own ``manifest.json``.

(a) ours
    ``read_tiles(open_location("s3://bench/tiles"), split=None, augment=True)`` and
    ``iter_torch_batches(batch_size=64)`` over every tile. Reported: tiles/s from the start of
    iteration, and tiles/s including dataset creation (manifest read + ``read_parquet`` plan).

(b) naive
    A torch ``Dataset`` that GETs ``<tile_id>.png`` with ``s3fs`` per item and does the same decode,
    normalisation to [-1, 1] and random flip / 90° rotation as ``tiles.decode_batch``, in a
    ``DataLoader(batch_size=64, num_workers=2, shuffle=True, persistent_workers=True)``, one s3fs
    client per worker. Its object keys and labels come from the shards (no S3 listing is timed).

Also reported for both: time to the first batch and tiles/s after it; for (a) the same figures on
the 10× set; the ratio ours/naive.

Warm-up, the same for both: each path first streams 512 tiles (8 batches) untimed, so that Ray's
worker processes / the DataLoader's worker processes (``persistent_workers=True``) exist and have
their S3 clients, imports and connections before the clock starts. Ray Data's progress bars are off.

Memory: while (a) streams the 1× set and then the 10× set, a background thread samples every
0.2 s the summed RSS of the driver process plus every Ray worker process: the descendants of this
driver (it starts the Ray cluster, so the raylet and its workers are its children) found with
psutil whose command line contains ``ray::`` or ``default_worker.py`` (Ray renames its workers
``ray::IDLE``, ``ray::ReadFilesParquetV2``, ``ray::FooterReader``…), minus the ``ray::DashboardAgent``
/ ``ray::RuntimeEnvAgent`` daemons. The process list is refreshed every ~1 s. Ray's daemons
(raylet, GCS, agents) and the S3 server are not in that sum; the daemons are reported separately.
Summed RSS counts a shared object-store page once per process that maps it, so the summed PSS
(which splits shared pages, ~2 s cadence) is reported too, and Ray's object-store usage (total minus
available ``object_store_memory`` resource, ~1 s cadence). The same sampler runs over the driver
plus its DataLoader workers during (b). CPU seconds of the whole machine vs this benchmark's process
tree are recorded per timed phase, since the machine may be shared.

Finally a short single-process profile splits per-tile cost: one S3 GET per tile with s3fs vs
decode+augment, and one Parquet shard read vs ``decode_batch`` per tile.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "crc5" / "train"
BUCKET = "bench"
BATCH = 64
WARMUP_TILES = 512
NAIVE_WORKERS = 2
COPIES = 10
SAMPLE_S = 0.2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- memory sampling


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # raylet children named ray::, not workers


def is_ray_worker(cmd: str) -> bool:
    return ("ray::" in cmd or "default_worker.py" in cmd) and not cmd.startswith(RAY_AGENTS)


class MemorySampler(threading.Thread):
    """Peak of the summed RSS (and PSS) of a set of processes, sampled every ``interval`` s.

    Finding the processes (a walk over /proc) costs, so the set is refreshed every ``refresh``
    samples (~1 s) and reused in between; a worker that starts between two refreshes is missed for
    at most that long. The object store figure is read on refresh samples too; PSS
    (``/proc/PID/smaps_rollup``, a page-table walk over GBs of mapped object store) every second
    refresh (~2 s). ``sampler_cpu_share`` is this thread's CPU time over the wall time.
    """

    def __init__(self, select, interval: float = SAMPLE_S, store_stats=None, extra=None, refresh: int = 5):
        super().__init__(daemon=True)
        self.select = select  # () -> list[psutil.Process], the driver first
        self.extra = extra  # () -> list[psutil.Process]: reported separately (e.g. Ray daemons)
        self.interval = interval
        self.refresh = refresh
        self.store_stats = store_stats  # () -> bytes used in Ray's object store, or None
        self._halt = threading.Event()
        self._procs: list = []
        self._extra_procs: list = []
        self.samples: list[dict] = []
        self.errors = 0
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.worker_nice: set[int] = set()

    @staticmethod
    def _read(procs, full: bool) -> list[tuple]:
        import psutil

        out = []
        for p in procs:
            try:
                out.append(p.memory_full_info() if full else p.memory_info())
            except psutil.Error:
                out.append(None)
        return out

    def sample(self, t0: float) -> None:
        cpu0 = time.thread_time()
        i = len(self.samples)
        refresh = i % self.refresh == 0
        full = i % (2 * self.refresh) == 0  # PSS: every 10th sample (~2 s)
        if refresh:
            self._procs = self.select()
            self._extra_procs = self.extra() if self.extra is not None else []
            for p in self._procs[1:]:  # the workers' scheduling priority (Ray starts its workers niced)
                try:
                    self.worker_nice.add(p.nice())
                except Exception:  # noqa: BLE001
                    pass
        infos = self._read(self._procs, full)
        alive = [i for i in infos if i is not None]
        row = {
            "t": round(time.perf_counter() - t0, 2),
            "rss": sum(i.rss for i in alive),
            "pss": sum(i.pss for i in alive) if full else None,
            "procs": len(alive),
            "driver_rss": infos[0].rss if infos and infos[0] is not None else None,
            "driver_uss": infos[0].uss if full and infos and infos[0] is not None else None,
        }
        if self._extra_procs:
            row["extra_rss"] = sum(i.rss for i in self._read(self._extra_procs, False) if i is not None)
        if self.store_stats is not None and refresh:
            try:
                row["object_store"] = self.store_stats()
            except Exception:  # noqa: BLE001 - the figure is optional
                self.errors += 1
        self.cpu_s += time.thread_time() - cpu0
        self.samples.append(row)

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._halt.is_set():
            self.sample(t0)
            self._halt.wait(self.interval)
        self.sample(t0)
        self.wall_s = time.perf_counter() - t0

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return self.summary()

    def summary(self) -> dict:
        def peak(key):
            vals = [s[key] for s in self.samples if s.get(key) is not None]
            return max(vals) if vals else None

        first = self.samples[0] if self.samples else {}
        return {
            "samples": len(self.samples),
            "baseline_rss_bytes": first.get("rss"),
            "peak_rss_bytes": peak("rss"),
            "peak_pss_bytes": peak("pss"),
            "peak_object_store_bytes": peak("object_store"),
            "baseline_object_store_bytes": first.get("object_store"),
            "peak_ray_daemons_rss_bytes": peak("extra_rss"),
            "peak_driver_rss_bytes": peak("driver_rss"),
            "peak_driver_uss_bytes": peak("driver_uss"),
            "max_processes": peak("procs"),
            "sampler_cpu_share": round(self.cpu_s / max(self.wall_s, 1e-9), 4),
            "worker_nice": sorted(self.worker_nice),
            "driver_nice": os.nice(0),
            # [seconds, summed RSS, summed PSS (~2 s), object store (~1 s), driver RSS, driver USS (~2 s)], MiB
            "series": [
                [
                    r["t"],
                    mib(r["rss"]),
                    mib(r["pss"]),
                    mib(r.get("object_store")),
                    mib(r["driver_rss"]),
                    mib(r["driver_uss"]),
                ]
                for r in self.samples
            ],
        }


def ray_selectors(not_ray: set[int]):
    """(driver + Ray workers, Ray daemons) among this driver's descendants; ``not_ray``: the pids of
    this script's other children (S3 server, watchdog), which are neither."""
    import psutil

    me = psutil.Process()

    def descendants():
        try:
            return me.children(recursive=True)
        except psutil.Error:
            return []

    def workers():
        return [me] + [p for p in descendants() if is_ray_worker(_cmdline(p))]

    def daemons():
        return [
            p
            for p in descendants()
            if p.pid not in not_ray and not is_ray_worker(_cmdline(p)) and "weed" not in _cmdline(p)
        ]

    return workers, daemons


def dataloader_selector():
    """Driver + its forked DataLoader workers (direct children with the driver's command line)."""
    import psutil

    me = psutil.Process()
    mine = _cmdline(me)

    def select():
        try:
            kids = me.children(recursive=False)
        except psutil.Error:
            kids = []
        return [me] + [p for p in kids if _cmdline(p) == mine]

    return select


def object_store_stats():
    """Bytes in use in Ray's object store: total minus available ``object_store_memory`` (the raylet
    publishes its plasma usage as that resource's availability; checked against ``ray.put``)."""
    import ray

    def used() -> int:
        total = ray.cluster_resources().get("object_store_memory", 0)
        return int(total - ray.available_resources().get("object_store_memory", 0))

    used()
    return used


def mib(n) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# ---------------------------------------------------------------- setup


def subset_input(data: Path, per_class: int, dest: Path) -> Path:
    """Copy the first ``per_class`` files (sorted) of each class into a temp folder (outside the repo)."""
    for cls_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        out = dest / cls_dir.name
        out.mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:per_class]:
            shutil.copyfile(f, out / f.name)
    return dest


def load_tile_table(loc, manifest):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from histodiff_ray.data.tiles import shard_paths

    tables = [
        pq.read_table(p, columns=["tile_id", "image", "label"], filesystem=loc.filesystem)
        for p in shard_paths(loc, manifest)
    ]
    return pa.concat_tables(tables)


def upload_naive(fs, table, prefix: str, chunk: int = 1024) -> tuple[list[str], list[int]]:
    """One object per tile. ``fs`` is s3fs, whose ``pipe`` sends many PUTs concurrently (about twice
    the rate of pyarrow output streams from 16 threads against this server)."""
    ids = table.column("tile_id").to_pylist()
    images = table.column("image").to_pylist()
    labels = table.column("label").to_pylist()
    keys = [f"{prefix}/{tid}.png" for tid in ids]
    for start in range(0, len(keys), chunk):
        fs.pipe({k: images[i] for i, k in enumerate(keys[start : start + chunk], start)})
    return keys, labels


def make_copies(root, manifest, dest_uri: str, storage, copies: int) -> dict:
    """A tile set at ``dest_uri`` whose manifest lists ``copies`` server-side copies of every shard."""
    import copy

    from histodiff_ray.data.tiles import save_manifest
    from histodiff_ray.storage import open_location, read_bytes, write_atomic

    dest = open_location(dest_uri, storage)
    fs = root.filesystem
    shards, method = [], "server-side CopyObject"
    for k in range(copies):
        for shard in manifest["shards"]:
            rel = f"shards/copy{k:02d}/{os.path.basename(shard['path'])}"
            src, dst = root.join(shard["path"]), dest.join(rel)
            try:
                fs.copy_file(src.path, dst.path)
            except OSError:
                method = "re-upload"
                write_atomic(dst, read_bytes(src))
            shards.append({"path": rel, "rows": shard["rows"]})
    m = copy.deepcopy(manifest)
    m["shards"] = shards
    m["kept"] = manifest["kept"] * copies
    save_manifest(dest, m)
    return {"uri": dest_uri, "shards": len(shards), "tiles": m["kept"], "copy_method": method}


def object_bytes(loc, manifest) -> int:
    from histodiff_ray.data.tiles import shard_paths

    return sum(loc.filesystem.get_file_info(p).size for p in shard_paths(loc, manifest))


# ---------------------------------------------------------------- (a) ours


def stream_ours(loc, limit: int | None = None, sampler: MemorySampler | None = None) -> dict:
    from histodiff_ray.data.tiles import read_tiles

    t_create = time.perf_counter()
    ds = read_tiles(loc, split=None, augment=True)
    if limit:
        ds = ds.limit(limit)
    if sampler is not None:
        sampler.start()
    t_iter = time.perf_counter()
    n, lo, hi, first, first_n = 0, np.inf, -np.inf, None, 0
    try:
        for batch in ds.iter_torch_batches(batch_size=BATCH):
            img = batch["image"]
            if first is None:
                first, first_n = time.perf_counter() - t_iter, len(img)
                assert img.shape[1:] == (3, 64, 64) and str(img.dtype) == "torch.float32", (img.shape, img.dtype)
            lo, hi = min(lo, float(img.min())), max(hi, float(img.max()))
            n += len(batch["label"])
    finally:
        t_end = time.perf_counter()
        mem = sampler.stop() if sampler is not None else None
    out = {
        "tiles": n,
        "seconds": round(t_end - t_iter, 3),
        "seconds_incl_creation": round(t_end - t_create, 3),
        "first_batch_s": round(first or 0, 3),
        "tiles_per_s": round(n / (t_end - t_iter), 1),
        "tiles_per_s_incl_creation": round(n / (t_end - t_create), 1),
        "tiles_per_s_after_first_batch": round((n - first_n) / max(t_end - t_iter - (first or 0), 1e-9), 1),
        "pixel_range": [round(lo, 3), round(hi, 3)],
    }
    if mem is not None:
        out["memory"] = mem
    return out


# ---------------------------------------------------------------- (b) naive


def _augment_normalise(img: np.ndarray) -> np.ndarray:
    """The per-tile equivalent of tiles.decode_batch(augment=True): flip, rot90, CHW, [-1, 1]."""
    if random.random() < 0.5:
        img = img[:, ::-1]
    img = np.rot90(img, random.randrange(4))
    return np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32) / 127.5 - 1.0


def _naive_dataset_class():
    import torch

    from histodiff_ray.data.tiles import decode_png

    class NaiveTiles(torch.utils.data.Dataset):
        """One S3 object per tile, fetched with s3fs in each DataLoader worker."""

        def __init__(self, keys, labels, endpoint, key, secret):
            self.keys, self.labels = keys, labels
            self.endpoint, self.key, self.secret = endpoint, key, secret
            self._fs, self._pid = None, None

        def fs(self):
            if self._fs is None or self._pid != os.getpid():  # one client per worker process
                import s3fs

                self._fs = s3fs.S3FileSystem(
                    key=self.key,
                    secret=self.secret,
                    skip_instance_cache=True,
                    client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
                )
                self._pid = os.getpid()
            return self._fs

        def __len__(self):
            return len(self.keys)

        def __getitem__(self, i):
            img = decode_png(self.fs().cat_file(self.keys[i]))
            return torch.from_numpy(_augment_normalise(img)), self.labels[i]

    return NaiveTiles


def stream_naive(loader, sampler: MemorySampler | None = None, max_batches: int | None = None) -> dict:
    if sampler is not None:
        sampler.start()
    t0 = time.perf_counter()
    n, lo, hi, first, first_n, batches = 0, np.inf, -np.inf, None, 0, 0
    try:
        for images, labels in loader:
            if first is None:
                first, first_n = time.perf_counter() - t0, len(labels)
                assert images.shape[1:] == (3, 64, 64) and str(images.dtype) == "torch.float32"
            lo, hi = min(lo, float(images.min())), max(hi, float(images.max()))
            n += len(labels)
            batches += 1
            if max_batches and batches >= max_batches:
                break
    finally:
        t_end = time.perf_counter()
        mem = sampler.stop() if sampler is not None else None
    out = {
        "tiles": n,
        "seconds": round(t_end - t0, 3),
        "first_batch_s": round(first or 0, 3),
        "tiles_per_s": round(n / (t_end - t0), 1),
        "tiles_per_s_after_first_batch": round((n - first_n) / max(t_end - t0 - (first or 0), 1e-9), 1),
        "pixel_range": [round(lo, 3), round(hi, 3)],
    }
    if mem is not None:
        out["memory"] = mem
    return out


# ---------------------------------------------------------------- profile


def profile(naive_ds, keys, loc, manifest, n: int = 400) -> dict:
    """Single-process per-tile costs of each path's stages (driver, one core)."""
    import pyarrow.parquet as pq

    from histodiff_ray.data.tiles import decode_batch, decode_png, shard_paths

    rng = random.Random(0)
    sample = rng.sample(range(len(keys)), min(n, len(keys)))
    fs = naive_ds.fs()
    t_get = t_dec = 0.0
    for i in sample:
        t = time.perf_counter()
        data = fs.cat_file(keys[i])
        t_get += time.perf_counter() - t
        t = time.perf_counter()
        _augment_normalise(decode_png(data))
        t_dec += time.perf_counter() - t
    path = shard_paths(loc, manifest)[0]
    t = time.perf_counter()
    table = pq.read_table(path, columns=["image", "label"], filesystem=loc.filesystem)
    t_read = time.perf_counter() - t
    rows = table.num_rows
    batch = {
        "image": np.asarray(table.column("image").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy(),
    }
    t = time.perf_counter()
    for s in range(0, rows, 256):
        decode_batch({k: v[s : s + 256] for k, v in batch.items()}, augment=True)
    t_decode_batch = time.perf_counter() - t
    us = 1e6
    return {
        "naive_s3_get_us_per_tile": round(t_get / len(sample) * us, 1),
        "naive_decode_augment_us_per_tile": round(t_dec / len(sample) * us, 1),
        "ours_parquet_read_us_per_tile": round(t_read / rows * us, 1),
        "ours_decode_batch_us_per_tile": round(t_decode_batch / rows * us, 1),
        "profiled_tiles": {"naive": len(sample), "ours": rows},
    }


# ---------------------------------------------------------------- main


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class CpuAccount:
    """CPU seconds used by the whole machine vs by this benchmark's process tree over a phase, so a
    run disturbed by other work on the machine shows it."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.start = (self._busy(), self._tree())

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def _tree(self) -> float:
        # children_* hold the CPU of descendants that already exited (short-lived Ray workers and
        # actors are reaped by the raylet), so they are not lost.
        total = 0.0
        for p in [self.me] + self.me.children(recursive=True):
            try:
                c = p.cpu_times()
                total += c.user + c.system + c.children_user + c.children_system
            except self.psutil.Error:
                pass
        return total

    def stop(self) -> dict:
        busy, tree = self._busy() - self.start[0], self._tree() - self.start[1]
        return {
            "machine_busy_cpu_s": round(busy, 1),
            "bench_cpu_s": round(tree, 1),
            "other_cpu_s": round(max(busy - tree, 0.0), 1),
        }


_WATCHDOG = r"""
import os, shutil, signal, sys
from pathlib import Path
pgid, tmp, ports = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
if sys.stdin.read().strip() != "done":  # EOF without "done": the benchmark died without cleaning up
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
"""


def start_watchdog(server, tmp: Path):
    """A tiny process that removes the S3 server and the temp folder if this one dies abruptly (a
    Ray driver exits without running ``finally`` when its raylet is killed, e.g. by someone's
    ``ray stop``). It waits on a pipe: a clean exit writes "done", a crash just closes it."""
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(server._proc.pid), str(tmp), *map(str, server._ports)],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )


def _cpu_seconds(proc) -> float | None:
    import psutil

    try:
        t = proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except (psutil.Error, AttributeError):
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tiles-per-class",
        type=int,
        default=None,
        help="ingest only the first N tiles (sorted by name) of each class; default: all",
    )
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help=f"labeled tile folder (default: {DEFAULT_DATA})")
    ap.add_argument("--copies", type=int, default=COPIES, help="how many times the big tile set repeats the shards")
    args = ap.parse_args(argv)

    import psutil
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)

    def _term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)

    results: dict = {
        "command": "python bench/stream.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="histodiff-bench-stream-"))
    server = watchdog = None
    loader = None

    def save() -> None:  # after every phase, so a run cut short still leaves its figures
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    try:
        import ray
        import torch
        from ray.data import DataContext

        from histodiff_ray.config import load_config
        from histodiff_ray.data.ingest import ingest
        from histodiff_ray.data.tiles import require_manifest
        from histodiff_ray.s3server import S3Server
        from histodiff_ray.storage import open_location

        results["versions"] = {"ray": ray.__version__, "torch": torch.__version__}
        log(f"machine: {results['machine']}")
        t = time.perf_counter()
        server = S3Server(tmp / "s3").start()
        watchdog = start_watchdog(server, tmp)
        server.create_bucket(BUCKET)
        weed = psutil.Process(server._proc.pid)
        log(f"S3 server up at {server.endpoint_url} in {time.perf_counter() - t:.1f}s")
        cfg = load_config(
            "cpu",
            [
                f"storage.endpoint_url={server.endpoint_url}",
                f"storage.access_key_id={server.access_key}",
                f"storage.secret_access_key={server.secret_key}",
            ],
        )

        # A private cluster: never join another user's `ray start` cluster on this machine.
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        DataContext.get_current().enable_progress_bars = False
        results["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}

        # ---- setup: ingest, naive objects, 10x set
        data = Path(args.data)
        if args.tiles_per_class:
            data = subset_input(data, args.tiles_per_class, tmp / "input")
        t = time.perf_counter()
        manifest = ingest(cfg, [str(data)], f"s3://{BUCKET}/tiles", labeled=True, source_name="crc5/train")
        ingest_s = time.perf_counter() - t
        loc = open_location(f"s3://{BUCKET}/tiles", cfg.storage)
        manifest = require_manifest(loc)
        n_tiles = manifest["kept"]
        results["setup"] = {
            "ingest_s": round(ingest_s, 1),
            "tiles": n_tiles,
            "shards": len(manifest["shards"]),
            "quarantined": len(manifest["quarantined"]),
            "shard_bytes": object_bytes(loc, manifest),
        }
        log(
            f"ingested {n_tiles} tiles into {len(manifest['shards'])} shard(s) in {ingest_s:.1f}s "
            f"({results['setup']['shard_bytes'] / 2**20:.1f} MiB)"
        )

        t = time.perf_counter()
        table = load_tile_table(loc, manifest)
        keys, labels = upload_naive(loc.fsspec(), table, f"{BUCKET}/naive")
        png_bytes = sum(len(b) for b in table.column("image").to_pylist())
        del table
        results["setup"].update(
            naive_objects=len(keys), naive_png_bytes=png_bytes, naive_upload_s=round(time.perf_counter() - t, 1)
        )
        log(f"uploaded {len(keys)} naive objects ({png_bytes / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f}s")

        t = time.perf_counter()
        big = make_copies(loc, manifest, f"s3://{BUCKET}/tiles10x", cfg.storage, args.copies)
        big_loc = open_location(big["uri"], cfg.storage)
        big["shard_bytes"] = object_bytes(big_loc, require_manifest(big_loc))
        big["seconds"] = round(time.perf_counter() - t, 1)
        results["setup"]["big_set"] = big
        save()
        log(
            f"{args.copies}x set: {big['shards']} shard objects, {big['tiles']} tiles, "
            f"{big['shard_bytes'] / 2**20:.1f} MiB ({big['copy_method']}) in {big['seconds']}s"
        )

        workers, daemons = ray_selectors({weed.pid, watchdog.pid})
        try:
            store = object_store_stats()
        except Exception as exc:  # noqa: BLE001
            log(f"object store stats unavailable: {exc}")
            store = None

        # ---- (a) ours
        log("ours: warm-up (512 tiles)")
        results["ours_warmup"] = stream_ours(loc, limit=WARMUP_TILES)
        gc.collect()
        cpu0, acct = _cpu_seconds(weed), CpuAccount()
        log("ours: streaming the 1x set (timed, memory sampled)")
        ours = stream_ours(loc, sampler=MemorySampler(workers, store_stats=store, extra=daemons))
        ours["s3_server_cpu_s"] = round((_cpu_seconds(weed) or 0) - (cpu0 or 0), 1)
        ours["cpu"] = acct.stop()
        results["ours"] = ours
        save()
        log(
            f"ours: {ours['tiles']} tiles in {ours['seconds']}s = {ours['tiles_per_s']} tiles/s "
            f"({ours['tiles_per_s_incl_creation']} incl. dataset creation); peak RSS "
            f"{mib(ours['memory']['peak_rss_bytes'])} MiB"
        )
        assert ours["tiles"] == n_tiles, (ours["tiles"], n_tiles)
        log(f"ours: streaming the {args.copies}x set (memory sampled)")
        gc.collect()
        acct = CpuAccount()
        ours_big = stream_ours(big_loc, sampler=MemorySampler(workers, store_stats=store, extra=daemons))
        ours_big["cpu"] = acct.stop()
        results["ours_big"] = ours_big
        save()
        log(
            f"ours {args.copies}x: {ours_big['tiles']} tiles in {ours_big['seconds']}s = "
            f"{ours_big['tiles_per_s']} tiles/s; peak RSS {mib(ours_big['memory']['peak_rss_bytes'])} MiB"
        )
        assert ours_big["tiles"] == n_tiles * args.copies, (ours_big["tiles"], n_tiles * args.copies)

        # ---- (b) naive
        NaiveTiles = _naive_dataset_class()
        naive_ds = NaiveTiles(keys, labels, server.endpoint_url, server.access_key, server.secret_key)
        loader = torch.utils.data.DataLoader(
            naive_ds, batch_size=BATCH, num_workers=NAIVE_WORKERS, shuffle=True, persistent_workers=True
        )
        log(f"naive: warm-up ({WARMUP_TILES} tiles)")
        results["naive_warmup"] = stream_naive(loader, max_batches=WARMUP_TILES // BATCH)
        gc.collect()
        cpu0, acct = _cpu_seconds(weed), CpuAccount()
        log("naive: streaming the 1x set (timed, memory sampled)")
        naive = stream_naive(loader, sampler=MemorySampler(dataloader_selector()))
        naive["s3_server_cpu_s"] = round((_cpu_seconds(weed) or 0) - (cpu0 or 0), 1)
        naive["cpu"] = acct.stop()
        results["naive"] = naive
        save()
        log(f"naive: {naive['tiles']} tiles in {naive['seconds']}s = {naive['tiles_per_s']} tiles/s")
        assert naive["tiles"] == n_tiles, (naive["tiles"], n_tiles)
        loader._iterator = None  # shuts the persistent workers down
        del loader
        loader = None

        # ---- summary
        log("profile: per-tile stage costs in one process")
        results["profile"] = profile(naive_ds, keys, loc, manifest)
        m1, m10 = ours["memory"], ours_big["memory"]
        results["summary"] = {
            "tiles": n_tiles,
            "ours_tiles_per_s": ours["tiles_per_s"],
            "ours_tiles_per_s_incl_creation": ours["tiles_per_s_incl_creation"],
            "naive_tiles_per_s": naive["tiles_per_s"],
            "ratio_ours_over_naive": round(ours["tiles_per_s"] / naive["tiles_per_s"], 2),
            "ratio_incl_creation": round(ours["tiles_per_s_incl_creation"] / naive["tiles_per_s"], 2),
            "ours_first_batch_s": ours["first_batch_s"],
            "naive_first_batch_s": naive["first_batch_s"],
            f"ours_{args.copies}x_tiles_per_s": ours_big["tiles_per_s"],
            # same per-tile work, a longer stream: start-up amortised on our side
            f"ratio_ours_{args.copies}x_over_naive": round(ours_big["tiles_per_s"] / naive["tiles_per_s"], 2),
            "other_cpu_share_ours": round(ours["cpu"]["other_cpu_s"] / max(ours["cpu"]["machine_busy_cpu_s"], 1e-9), 2),
            "other_cpu_share_naive": round(
                naive["cpu"]["other_cpu_s"] / max(naive["cpu"]["machine_busy_cpu_s"], 1e-9), 2
            ),
            "peak_rss_mib_1x": mib(m1["peak_rss_bytes"]),
            f"peak_rss_mib_{args.copies}x": mib(m10["peak_rss_bytes"]),
            "peak_rss_ratio": round(m10["peak_rss_bytes"] / m1["peak_rss_bytes"], 2),
            "peak_pss_mib_1x": mib(m1["peak_pss_bytes"]),
            f"peak_pss_mib_{args.copies}x": mib(m10["peak_pss_bytes"]),
            "peak_object_store_mib_1x": mib(m1["peak_object_store_bytes"]),
            f"peak_object_store_mib_{args.copies}x": mib(m10["peak_object_store_bytes"]),
            "naive_peak_rss_mib": mib(naive["memory"]["peak_rss_bytes"]),
        }
        results["loadavg_end"] = os.getloadavg()
        print(json.dumps(results["summary"], indent=1))
        if args.json:
            save()
            log(f"wrote {args.json}")
        return results
    finally:
        if loader is not None:
            loader._iterator = None
            del loader
        try:
            import ray

            ray.shutdown()
        finally:
            if server is not None:
                server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            if watchdog is not None:
                watchdog.communicate(b"done")


if __name__ == "__main__":
    main()
