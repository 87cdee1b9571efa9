"""`histodiff generate`: class-guided synthesis as a resumable batch job over a Ray actor pool.

    histodiff generate --config cpu --ldm runs/finetune --classifier runs/classifier \\
        --judge runs/judge --tiles tiles/crc5 --per-class 500 --output s3://synthetic/crc5

1. **Plan.** Each class gets ``per_class`` tiles in shards of ``generate.shard_size``; tile i of
   class c is sampled from its own seed (``tile_seed``), so a tile does not depend on which actor
   or batch drew it. ``OUT/plan.json`` records the plan and a hash of everything that decides the
   pixels and scores; a rerun with other settings is refused instead of mixing two sets.
2. **Synthesize.** Ray Data sends the plan rows of missing shards to an actor pool
   (``ActorPoolStrategy``; each actor loads the diffusion model, the guiding classifier and the
   judge once). An actor runs guided DDIM, decodes, scores each tile (judge confidence, centroid
   agreement, distance to the nearest real train tile) and writes its shard atomically as
   ``OUT/shards/<CLASS>-<NNNNN>.parquet``. A shard is the unit of resumption: a rerun after a kill
   skips the shards that exist and produces exactly the missing ones (and any that are damaged).
3. **Select.** From the stored scores, the selection rules and the per-class cap decide what is
   kept (``histodiff_ray/data/synthetic.py``, which also holds the set's format and reader).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from tqdm import tqdm

from histodiff_ray.config import Config, StorageConfig, hashable
from histodiff_ray.console import logger
from histodiff_ray.data.images import encode_png
from histodiff_ray.data.latents import _storage_dict
from histodiff_ray.data.shards import damaged_shards
from histodiff_ray.data.synthetic import PLAN_FORMAT, SHARD_SCHEMA, select_synthetic, selection_report, shard_records
from histodiff_ray.data.tiles import decode_images, iter_tile_tables, require_manifest
from histodiff_ray.diffusion.guidance import classifier_cond_fn
from histodiff_ray.downstream import predict
from histodiff_ray.errors import HistodiffError
from histodiff_ray.judge import load_judge, read_judge_config
from histodiff_ray.ldm import LatentDiffusion
from histodiff_ray.models.classifier import load_classifier
from histodiff_ray.raycluster import init_ray
from histodiff_ray.selection import SIGNATURE_SIZE, box_thumbnails, nearest_centroid_scores, nearest_real_distance
from histodiff_ray.storage import Location, download_dir, open_location, read_bytes, read_run_info, write_atomic

log = logger(__name__)


def tile_seed(seed: int, label: int, index: int) -> int:
    """A 63-bit seed per (config seed, class, tile index)."""
    return int(np.random.SeedSequence([seed, label, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sha256_of(loc: Location) -> str:
    return hashlib.sha256(read_bytes(loc)).hexdigest()


def make_plan(cfg: Config, classes: list[str], per_class: int, sources: dict) -> dict:
    g = cfg.generate
    shards = []
    for label, name in enumerate(classes):
        for i, start in enumerate(range(0, per_class, g.shard_size)):
            shards.append(
                {
                    "shard": f"{name}-{i:05d}",
                    "label": label,
                    "label_name": name,
                    "start": start,
                    "count": min(g.shard_size, per_class - start),
                }
            )
    decides = {
        "sources": sources,
        "seed": cfg.seed,
        "sampling": hashable(dataclasses.asdict(cfg.sampling)),
        "guidance": cfg.guidance.kind,
        "shard_size": g.shard_size,
        "per_class": per_class,
        "classes": classes,
    }
    digest = hashlib.sha256(json.dumps(decides, sort_keys=True).encode()).hexdigest()[:16]
    return {"format": PLAN_FORMAT, "hash": digest, **decides, "shards": shards}


class Synthesizer:
    """A Ray Data callable class: models are loaded once per actor; each call makes whole shards."""

    def __init__(self, plan: dict, out: str, storage: dict, real_thumbs, threads: int, compile_unet: bool = False):

        torch.set_num_threads(threads)
        st = StorageConfig(**storage)
        src = plan["sources"]
        self.plan, self.out = plan, open_location(out, st)
        self.ldm = LatentDiffusion.from_run(open_location(src["ldm"], st))
        if compile_unet:  # compiled once per actor and shard size; pays off over long jobs
            self.ldm.unet = torch.compile(self.ldm.unet)
        self.guide = None  # classifier-free guidance: the UNet itself is class-conditional
        if src["classifier"] is not None:
            with tempfile.TemporaryDirectory(prefix="guide-") as tmp:
                local = download_dir(open_location(src["classifier"], st).join("model", "classifier"), tmp)
                self.guide = (
                    load_classifier(local)
                    .to(self.ldm.device, memory_format=torch.channels_last)
                    .eval()
                    .requires_grad_(False)
                )
        self.judge, _, self.centroids = load_judge(src["judge"], st)
        self.judge.to(self.ldm.device)  # scoring and the memorization search run where the sampling does
        self.real_thumbs = ray.get(real_thumbs) if isinstance(real_thumbs, ray.ObjectRef) else real_thumbs

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        tables = [self.make_shard(r) for r in rows]
        table = pa.concat_tables(tables).drop_columns(["image", "probs"])
        return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}

    def make_shard(self, row: dict) -> pa.Table:

        plan, s = self.plan, self.plan["sampling"]
        label, count, start = int(row["label"]), int(row["count"]), int(row["start"])
        seeds = [tile_seed(plan["seed"], label, start + i) for i in range(count)]
        labels = torch.full((count,), label, dtype=torch.long, device=self.ldm.device)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        if self.guide is not None:
            scale = s["guidance_scale"]
            steering = {"cond_fn": classifier_cond_fn(self.guide, labels), "guidance_scale": scale}
        else:
            scale = s["cfg_scale"]
            steering = {"labels": labels, "cfg_scale": scale}
        z = self.ldm.sample(
            count,
            steps=s["ddim_steps"],
            eta=s["eta"],
            sampler=s.get("sampler", "ddim"),
            karras_sigmas=s.get("karras_sigmas", False),
            generator=generators,
            **steering,
        )
        tiles = self.ldm.decode(z)
        probs, features = predict(self.judge, tiles)
        nearest, similarity = nearest_centroid_scores(features, self.centroids, np.full(count, label))
        real_distance = nearest_real_distance(tiles, self.real_thumbs, device=self.ldm.device)
        src = plan["sources"]
        name = row["label_name"]
        table = pa.table(
            {
                "tile_id": [f"{name}-{start + i:06d}" for i in range(count)],
                "image": [encode_png(t) for t in tiles],
                "label": np.full(count, label, np.int16),
                "label_name": [name] * count,
                "index": np.arange(start, start + count, dtype=np.int32),
                "seed": np.array(seeds, np.int64),
                "shard": [row["shard"]] * count,
                "ldm": [src["ldm"]] * count,
                "ldm_sha256": [src["ldm_sha256"]] * count,
                "classifier": [src["classifier"]] * count,
                "classifier_sha256": [src["classifier_sha256"]] * count,
                "judge": [src["judge"]] * count,
                "guidance": [plan["guidance"]] * count,
                "guidance_scale": np.full(count, scale, np.float32),
                "ddim_steps": np.full(count, s["ddim_steps"], np.int32),
                "eta": np.full(count, s["eta"], np.float32),
                "probs": [p.astype(np.float32) for p in probs],
                "confidence": probs[:, label].astype(np.float32),
                "nearest_centroid": nearest.astype(np.int16),
                "centroid_similarity": similarity.astype(np.float32),
                "real_distance": np.asarray(real_distance, np.float32),
            },
            schema=SHARD_SCHEMA,
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        write_atomic(self.out.join("shards", f"{row['shard']}.parquet"), sink.getvalue().to_pybytes())
        return table


def generate(
    cfg: Config,
    *,
    ldm: str,
    classifier: str | None,
    judge: str,
    tiles: str,
    output: str,
    per_class: int | None = None,
    progress: bool = True,
) -> dict:
    """Plan, synthesize the missing shards, then select; returns the summary. ``classifier`` is the
    guide's run with ``guidance.kind: classifier`` and None with ``classifier_free``."""

    out = open_location(output, cfg.storage)
    tiles_loc = open_location(tiles, cfg.storage)
    classes = require_manifest(tiles_loc)["classes"]
    per_class = per_class or cfg.generate.per_class
    ldm_loc = open_location(ldm, cfg.storage)
    if cfg.guidance.kind == "classifier":
        if classifier is None:
            raise HistodiffError(
                "guidance.kind=classifier needs --classifier (a train-classifier run); "
                "or set guidance.kind=classifier_free for a UNet fine-tuned with classes"
            )
        clf_loc = open_location(classifier, cfg.storage)
        guide_info = read_run_info(clf_loc)
        guide_classes, guide_name = guide_info.get("classes"), f"the classifier at {classifier}"
    else:
        if classifier is not None:
            raise HistodiffError("guidance.kind=classifier_free guides with the UNet itself; drop --classifier")
        guide_classes, guide_name = read_run_info(ldm_loc).get("classes"), f"the diffusion model at {ldm}"
        if guide_classes is None:
            raise HistodiffError(f"{ldm} is unconditional; fine-tune it with guidance.kind=classifier_free first")
    if guide_classes != classes:
        raise HistodiffError(f"{guide_name} knows classes {guide_classes}, the tile set {tiles} has {classes}")
    judge_config = read_judge_config(judge, cfg.storage)  # its weights are loaded by the actors, not the driver
    if judge_config["classes"] != classes:
        raise HistodiffError(
            f"the judge at {judge} knows classes {judge_config['classes']}, the tile set {tiles} has {classes}"
        )
    sources = {
        "ldm": ldm_loc.uri,
        "ldm_sha256": sha256_of(ldm_loc.join("model", "unet", "diffusion_pytorch_model.safetensors")),
        "classifier": None,
        "classifier_sha256": None,
        "judge": open_location(judge, cfg.storage).uri,
        "tiles": tiles_loc.uri,
    }
    if cfg.guidance.kind == "classifier":
        sources["classifier"] = clf_loc.uri
        sources["classifier_sha256"] = sha256_of(
            clf_loc.join("model", "classifier", "diffusion_pytorch_model.safetensors")
        )
    plan = make_plan(cfg, classes, per_class, sources)
    _save_or_check_plan(out, plan)

    unmade = damaged_shards(out, shard_records(plan), SHARD_SCHEMA)
    for path, reason in unmade.items():
        if reason != "missing":
            log.info(f"[generate] {out.join(path)} is damaged ({reason}): making it again")
    todo = [s for s in plan["shards"] if f"shards/{s['shard']}.parquet" in unmade]
    total = sum(s["count"] for s in plan["shards"])
    log.info(
        f"[generate] {total} tiles in {len(plan['shards'])} shards; {len(plan['shards']) - len(todo)} shards already "
        "done, "
        f"{len(todo)} to make"
    )
    if todo:
        init_ray(cfg)
        thumbs = ray.put(train_thumbnails(tiles_loc))
        g = cfg.generate
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            Synthesizer,
            fn_constructor_kwargs={
                "plan": plan,
                "out": out.uri,
                "storage": _storage_dict(cfg),
                "real_thumbs": thumbs,
                "threads": g.threads_per_actor,
                "compile_unet": g.compile,
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=g.actors),
            num_cpus=cfg.ray.cpus_per_worker,
            num_gpus=cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0,
        )
        _drain(ds, sum(s["count"] for s in todo), progress)
    summary = select_synthetic(cfg, output, cfg.selection)
    log.info(selection_report(summary))
    return summary


def train_thumbnails(tiles: Location) -> np.ndarray:
    """Box thumbnails of every train tile, for the memorization audit, decoded one shard at a
    time: the driver never holds the tiles themselves (19 GB at 256 px and 10⁵ tiles; their
    thumbnails take 77 MB)."""

    parts = [
        box_thumbnails(decode_images(t.column("image")))
        for t in iter_tile_tables(tiles, "train", columns=["image"])
        if t.num_rows
    ]
    return np.concatenate(parts) if parts else np.zeros((0, SIGNATURE_SIZE, SIGNATURE_SIZE, 3), np.float32)


def _drain(ds, tiles: int, progress: bool) -> None:

    with tqdm(total=tiles, unit="tile", desc="generate", disable=not progress, mininterval=1.0) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(batch.num_rows)


def _save_or_check_plan(out: Location, plan: dict) -> None:
    try:
        existing = json.loads(read_bytes(out.join("plan.json")))
    except FileNotFoundError:
        write_atomic(out.join("plan.json"), json.dumps(plan, indent=1, sort_keys=True).encode())
        return
    if existing.get("hash") != plan["hash"]:
        changed = sorted(
            k
            for k in ("sources", "seed", "sampling", "shard_size", "per_class", "classes")
            if existing.get(k) != plan[k]
        )
        raise HistodiffError(
            f"{out} already holds tiles generated with other settings (differs in: {', '.join(changed)}); "
            "use a new --output, or delete it to start over"
        )
