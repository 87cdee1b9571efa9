"""`histodiff encode-latents`: encode a tile set once with the autoencoder, so diffusion training
never runs the VAE encoder per step.

A latent set mirrors its tile set: ``manifest.json`` + ``shards/*.parquet`` with one row per tile
(tile_id, label, labeled, split, source, and the posterior mean as float16 bytes). The manifest
records the autoencoder it came from and the scale factor 1/std of the train latents (LDM's
scale-by-std), which makes the diffusion model's inputs unit-variance.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from ray.data.expressions import col, lit
from tqdm import tqdm

from histodiff_ray.config import Config, StorageConfig
from histodiff_ray.console import logger
from histodiff_ray.data.shards import check_shards, write_shard
from histodiff_ray.data.tiles import SHARD_SCHEMA, decode_png, read_parquet, require_manifest, shard_paths
from histodiff_ray.errors import HistodiffError
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import Location, download_dir, open_location, read_bytes, write_atomic

log = logger(__name__)

LATENT_FORMAT = "histodiff-latents/1"
META_COLUMNS = ["tile_id", "label", "labeled", "split", "source"]
LATENT_SCHEMA = pa.schema([SHARD_SCHEMA.field(c) for c in META_COLUMNS] + [pa.field("latent", pa.binary())])


class LatentEncoder:
    """A Ray Data callable class: the autoencoder is loaded once per actor."""

    def __init__(self, vae_dir: str, storage: dict):
        # Here, not at the top: every process that streams latents (Ray Data's tasks and coordinators,
        # anew for each Train run) imports this module to unpickle decode_latents, and torch and
        # diffusers would add ~6 CPU-seconds to each one's start.
        import torch  # noqa: PLC0415

        from histodiff_ray.models import default_device, to_tensor  # noqa: PLC0415
        from histodiff_ray.models.autoencoder import load_autoencoder  # noqa: PLC0415

        torch.set_num_threads(1)  # one thread per actor: actors, not threads, scale across cores
        self.torch, self.to_tensor, self.device = torch, to_tensor, default_device()
        with tempfile.TemporaryDirectory(prefix="vae-") as tmp:
            local = download_dir(open_location(vae_dir, StorageConfig(**storage)), tmp)
            # Channels-last (to_tensor keeps the tiles' NHWC layout): oneDNN's fast path, 1.5x the encoder's
            # rate in NCHW here (bench/stages.py).
            self.vae = load_autoencoder(local).to(self.device, memory_format=torch.channels_last).eval()

    def __call__(self, batch: dict) -> dict:
        x = self.to_tensor(np.stack([decode_png(b) for b in batch["image"]])).to(self.device)
        with self.torch.no_grad():
            mean = self.vae.encode(x).latent_dist.mean.float().cpu().numpy()
        out = {c: batch[c] for c in META_COLUMNS}
        out["latent"] = [m.astype(np.float16).tobytes() for m in mean]
        return out


def encode_latents(cfg: Config, tiles: str, vae_dir: str, output: str, actors: int = 2, progress: bool = True) -> dict:
    """Encode every tile of the tile set at ``tiles`` into a latent set at ``output``.

    The actors stream; the latents are then gathered at the driver to compute the scale factor and
    write sorted shards (2 KB per tile at the cpu profile, 24 KB at the paper's: fine to ~10⁵–10⁶
    tiles; beyond that this step should write shards from the actors directly). The manifest's
    ``encoding`` records the call's wall time and the stream's timing (see ``_gather``)."""

    called = time.perf_counter()
    tiles_loc, out = open_location(tiles, cfg.storage), open_location(output, cfg.storage)
    manifest = require_manifest(tiles_loc)
    init_ray(cfg)
    ds = read_parquet(shard_paths(tiles_loc, manifest), tiles_loc.filesystem)
    # A shard (4,096 tiles) is one block, and an actor takes a block at a time: blocks of 512 keep
    # every actor busy, from a one-shard tile set to the last shard of a large one. The pool is
    # started whole: autoscaling from one actor left the second idle for most of a crc5 encode.
    ds = ds.repartition(target_num_rows_per_block=512).select_columns(["image"] + META_COLUMNS)
    ds = ds.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={"vae_dir": vae_dir, "storage": _storage_dict(cfg)},
        batch_size=64,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.ray.cpus_per_worker,
        num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0,
    )
    tables, timing = _gather(ds, sum(s["rows"] for s in manifest["shards"]), progress)
    if not tables:
        raise HistodiffError(f"encode-latents: the tile set at {tiles} has no tiles")
    latents = pa.concat_tables(tables).sort_by("tile_id").select(LATENT_SCHEMA.names).cast(LATENT_SCHEMA)
    # The shape is the autoencoder's, whatever this command's config says about autoencoders.
    vae_config = json.loads(read_bytes(open_location(vae_dir, cfg.storage).join("config.json")))
    c = vae_config["latent_channels"]
    side = cfg.data.tile_size // 2 ** (len(vae_config["block_out_channels"]) - 1)
    train = latents.filter(pc.equal(latents.column("split"), "train"))
    sample = np.stack([np.frombuffer(b, np.float16) for b in train.column("latent").to_pylist()[:4096]]).astype(
        np.float32
    )
    scale_factor = float(1.0 / sample.std())
    shards = []
    per_shard = 16384
    for i, start in enumerate(range(0, latents.num_rows, per_shard)):
        shards.append(write_shard(out, f"shards/part-{i:05d}.parquet", latents.slice(start, per_shard)))
    latent_manifest = {
        "format": LATENT_FORMAT,
        "tiles": tiles_loc.uri,
        "autoencoder": vae_dir,
        "latent_shape": [c, side, side],
        "scale_factor": scale_factor,
        "classes": manifest["classes"],
        "counts": manifest["counts"],
        "labeled_train": manifest["labeled_train"],
        "shards": shards,
        "rows": latents.num_rows,
        "encoding": {"seconds": round(time.perf_counter() - called, 2), **timing},
    }
    write_atomic(out.join("manifest.json"), json.dumps(latent_manifest, indent=1, sort_keys=True).encode())
    return latent_manifest


def _gather(ds, total: int, progress: bool) -> tuple[list[pa.Table], dict]:
    """The encoded tables, gathered as the stream yields them, and its timing: seconds until the first
    latents (actors starting, the model loading) and tiles/s from then on (the stream's steady rate,
    which bench/stages.py compares with a plain loop)."""

    tables, start, first = [], time.perf_counter(), None
    with tqdm(total=total, unit="tile", desc="encode-latents", disable=not progress, mininterval=1.0) as bar:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first is None:
                first, first_rows = time.perf_counter(), table.num_rows
            tables.append(table)
            bar.update(table.num_rows)
    end, rows = time.perf_counter(), sum(t.num_rows for t in tables)
    timing = {"first_latents_s": round((first or end) - start, 2)}
    if first is not None and end > first and rows > first_rows:
        timing["steady_tiles_per_s"] = round((rows - first_rows) / (end - first), 1)
    rate = f", then {timing['steady_tiles_per_s']:.0f} tiles/s" if "steady_tiles_per_s" in timing else ""
    log.info(f"[encode-latents] {rows} tiles; first latents after {timing['first_latents_s']:.1f} s{rate}")
    return [t for t in tables if t.num_rows], timing


def _storage_dict(cfg: Config) -> dict:
    """Storage settings for actors, credentials included (they are needed to read the model);
    they travel inside Ray's object store, never through logs or job metadata."""

    return dataclasses.asdict(cfg.storage)


def load_latent_manifest(root: Location) -> dict:
    try:
        manifest = json.loads(read_bytes(root.join("manifest.json")))
    except FileNotFoundError:
        raise HistodiffError(f"no latent set at {root}; run `histodiff encode-latents --output {root}` first") from None
    if manifest.get("format") != LATENT_FORMAT:
        raise HistodiffError(f"{root}/manifest.json is not a {LATENT_FORMAT} manifest")
    return manifest


def decode_latents(
    batch: dict,
    shape: list[int],
    pseudo_labels: dict[str, int] | None = None,
    soft_labels: dict[str, list[float]] | None = None,
) -> dict:
    """Float32 latents, and labels with −1 wherever the label may not be used (``labeled`` false),
    unless ``pseudo_labels`` (tile_id → class) gives one.

    ``soft_labels`` (tile_id → class probabilities, for distillation) adds a ``target`` column: one-hot
    for labeled tiles, the given probabilities for unlabeled ones (labeled then with their most likely
    class), zeros for the rest."""
    latents = np.stack([np.frombuffer(b, np.float16).reshape(shape) for b in batch["latent"]]).astype(np.float32)
    labels = np.where(np.asarray(batch["labeled"], dtype=bool), np.asarray(batch["label"], dtype=np.int64), -1)
    if pseudo_labels:
        guessed = np.array([pseudo_labels.get(t, -1) for t in batch["tile_id"]], dtype=np.int64)
        labels = np.where(labels < 0, guessed, labels)
    out = {"latent": latents, "label": labels}
    if soft_labels:
        target = np.zeros((len(labels), len(next(iter(soft_labels.values())))), np.float32)
        for i, tile in enumerate(batch["tile_id"]):
            if labels[i] >= 0:
                target[i, labels[i]] = 1.0
            elif tile in soft_labels:
                target[i] = soft_labels[tile]
                labels[i] = int(target[i].argmax())
        out["target"] = target
    return out


def read_latents(
    root: Location,
    split: str | None = "train",
    labeled_only: bool = False,
    pseudo_labels: dict[str, int] | None = None,
    soft_labels: dict[str, list[float]] | None = None,
):
    """A Ray Dataset of float32 latents (unscaled) with labels (−1 where unlabeled); ``pseudo_labels``
    (tile_id → class) or ``soft_labels`` (tile_id → probabilities, see ``decode_latents``) label
    unlabeled tiles, and ``labeled_only`` keeps the tiles with a label."""

    manifest = load_latent_manifest(root)
    check_shards(
        root,
        manifest["shards"],
        LATENT_SCHEMA,
        f"re-run `histodiff encode-latents` for {manifest['tiles']} with --output {root}: it rewrites the latent set",
    )
    ds = read_parquet([root.join(s["path"]).path for s in manifest["shards"]], root.filesystem)
    if split is not None:
        ds = ds.filter(expr=col("split") == lit(split))
    guessed = pseudo_labels or soft_labels
    if labeled_only and not guessed:
        ds = ds.filter(expr=col("labeled") == lit(True))
    ds = ds.select_columns(["latent", "label", "labeled", "tile_id"]).map_batches(
        decode_latents,
        fn_kwargs={"shape": manifest["latent_shape"], "pseudo_labels": pseudo_labels, "soft_labels": soft_labels},
        batch_format="numpy",
        batch_size=1024,
    )
    return ds.filter(expr=col("label") >= lit(0)) if labeled_only and guessed else ds
