"""`histodiff pipeline`: every stage in one command, resumable and cached by config hash.

    histodiff pipeline --config cpu --labeled ../shared/data/crc5/train --unlabeled ../shared/data/unlabeled \\
        --workdir s3://work/crc5 data.label_fraction=0.05

ingest → autoencoder → latents → pretrain → finetune → classifier (with ``guidance.kind:
classifier``) → judge → generate → fidelity → evaluate → report. Each stage writes under
``WORKDIR/<stage>-<hash>``, where the hash covers the config sections the stage reads and the hashes
of the stages it builds on; ``WORKDIR/stages/<stage>-<hash>.json`` marks it done. A rerun skips the
stages whose marker exists for the same hash, and a stage that was interrupted resumes (ingest skips
stored files, training resumes from its latest checkpoint, generate from its finished shards).
Changing a setting reruns exactly the stages that depend on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from histodiff_ray.config import Config, hashable
from histodiff_ray.console import logger
from histodiff_ray.data.ingest import ingest
from histodiff_ray.data.latents import encode_latents
from histodiff_ray.evaluate import evaluate
from histodiff_ray.fidelity import fidelity
from histodiff_ray.generate import generate
from histodiff_ray.judge import train_judge
from histodiff_ray.report import build_report
from histodiff_ray.storage import exists, open_location, read_bytes, write_atomic
from histodiff_ray.train.autoencoder import train_autoencoder
from histodiff_ray.train.diffusion import finetune, pretrain
from histodiff_ray.train.guide import train_classifier

log = logger(__name__)

# What each stage reads from the config (section or section.key).
STAGE_KEYS = {
    "ingest": [
        "seed",
        "data.tile_size",
        "data.microns_per_pixel",
        "data.split_seed",
        "data.val_fraction",
        "data.test_fraction",
        "data.label_fraction",
        "data.tissue_fraction",
        "data.max_image_pixels",
        "data.tiles_per_shard",
    ],
    "autoencoder": ["seed", "autoencoder", "data.batch_size", "data.augment", "ray.num_workers"],
    "latents": [],
    "pretrain": ["seed", "unet", "diffusion", "data.batch_size", "data.augment", "ray.num_workers"],
    "finetune": ["seed", "diffusion", "guidance", "data.batch_size", "data.augment", "ray.num_workers"],
    "classifier": ["seed", "classifier", "data.batch_size", "data.augment", "ray.num_workers"],
    "judge": ["seed", "downstream"],
    "generate": ["seed", "sampling", "guidance", "selection", "generate"],
    "fidelity": ["seed", "downstream"],
    "evaluate": ["evaluate", "downstream"],
}


def _pick(d: dict, key: str):
    for part in key.split("."):
        d = d[part]
    return hashable(d) if isinstance(d, dict) else d


def stage_hash(cfg: Config, stage: str, *parents: str, inputs: tuple = ()) -> str:
    d = cfg.to_dict()
    payload = {
        "stage": stage,
        "config": {k: _pick(d, k) for k in STAGE_KEYS[stage]},
        "parents": parents,
        "inputs": inputs,
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


class Stages:
    """Runs stages once per hash, with a marker file per finished stage and a line of progress."""

    def __init__(self, cfg: Config, workdir: str):
        self.cfg, self.work = cfg, open_location(workdir, cfg.storage)
        self.started = time.perf_counter()
        self.markers = {}  # stage → the marker of the hash this run uses

    def path(self, name: str, digest: str) -> str:
        return self.work.join(f"{name}-{digest}").uri

    def run(self, name: str, digest: str, fn: Callable[[str], dict | None]) -> str:
        out = self.path(name, digest)
        marker = self.markers[name] = self.work.join("stages", f"{name}-{digest}.json")
        if exists(marker):
            log.info(f"[pipeline] {name}: done before (config hash {digest}), skipped")
            return out
        log.info(f"[pipeline] {name}: running → {out}")
        t0 = time.perf_counter()
        result = fn(out) or {}
        seconds = time.perf_counter() - t0
        write_atomic(
            marker,
            json.dumps(
                {"stage": name, "hash": digest, "output": out, "seconds": round(seconds, 1), "result": result},
                indent=1,
                sort_keys=True,
                default=str,
            ).encode(),
        )
        log.info(f"[pipeline] {name}: finished in {seconds:.0f} s ({time.perf_counter() - self.started:.0f} s so far)")
        return out

    def timings(self) -> dict[str, float]:
        """Seconds of each stage this run ran or reused, from the marker of the hash it used: a workdir
        also holds the markers of other settings' runs, which are not this run's."""
        return {name: json.loads(read_bytes(marker))["seconds"] for name, marker in self.markers.items()}


def run_pipeline(
    cfg: Config,
    *,
    labeled: str,
    unlabeled: list[str],
    workdir: str,
    title: str = "histodiff_ray pipeline",
    notes: list[str] | None = None,
    unlabeled_mpp: float | None = None,
) -> dict:

    s = Stages(cfg, workdir)
    h_target = stage_hash(cfg, "ingest", inputs=(labeled,))
    target = s.run("tiles-target", h_target, lambda out: _brief(ingest(cfg, [labeled], out, labeled=True)))
    pool = None
    if unlabeled:
        h_pool = stage_hash(cfg, "ingest", inputs=tuple(unlabeled) + (unlabeled_mpp,))
        pool = s.run("tiles-pool", h_pool, lambda out: _brief(ingest(cfg, unlabeled, out, source_mpp=unlabeled_mpp)))
    else:
        h_pool = h_target
    h_ae = stage_hash(cfg, "autoencoder", h_target, h_pool)
    ae = s.run(
        "autoencoder", h_ae, lambda out: train_autoencoder(cfg, [t for t in (pool, target) if t], out)["final_metrics"]
    )
    vae = open_location(ae, cfg.storage).join("model", "vae").uri
    h_lat_t = stage_hash(cfg, "latents", h_ae, h_target)
    lat_target = s.run("latents-target", h_lat_t, lambda out: _latent_brief(encode_latents(cfg, target, vae, out)))
    lat_pool = lat_target
    h_lat_p = h_lat_t
    if pool:
        h_lat_p = stage_hash(cfg, "latents", h_ae, h_pool)
        lat_pool = s.run("latents-pool", h_lat_p, lambda out: _latent_brief(encode_latents(cfg, pool, vae, out)))
    h_pre = stage_hash(cfg, "pretrain", h_lat_p)
    pre = s.run("pretrain", h_pre, lambda out: pretrain(cfg, [(lat_pool, 1.0)], out)["final_metrics"])
    h_ft = stage_hash(cfg, "finetune", h_pre, h_lat_t)
    ft = s.run("finetune", h_ft, lambda out: finetune(cfg, [(lat_target, 1.0)], out, pre)["final_metrics"])
    runs = {"autoencoder": ae, "pretrain": pre, "finetune": ft}
    clf, h_guide = None, h_ft  # classifier-free guidance: the fine-tuned UNet guides itself
    if cfg.guidance.kind == "classifier":
        h_guide = stage_hash(cfg, "classifier", h_ft, h_lat_t)
        clf = runs["classifier"] = s.run(
            "classifier", h_guide, lambda out: train_classifier(cfg, lat_target, ft, out)["final_metrics"]
        )
    h_judge = stage_hash(cfg, "judge", h_target)
    judge = s.run("judge", h_judge, lambda out: train_judge(cfg, target, out))
    h_gen = stage_hash(cfg, "generate", h_ft, h_guide, h_judge)
    syn = s.run(
        "synthetic", h_gen, lambda out: generate(cfg, ldm=ft, classifier=clf, judge=judge, tiles=target, output=out)
    )
    h_fid = stage_hash(cfg, "fidelity", h_gen)
    fid = s.run(
        "fidelity",
        h_fid,
        lambda out: {"classes": list(fidelity(cfg, target, {cfg.guidance.kind: syn}, f"{out}/oracle", out)["classes"])},
    )
    h_eval = stage_hash(cfg, "evaluate", h_gen)
    ev = s.run(
        "evaluation",
        h_eval,
        lambda out: {"arms": list(evaluate(cfg, target, out, synthetic={"pretrained": syn}, judge=judge)["arms"])},
    )
    report = build_report(
        cfg,
        tiles=target,
        output=open_location(workdir, cfg.storage).join("report").uri,
        synthetic=syn,
        evaluation=ev,
        runs=runs,
        fidelity=fid,
        title=title,
        notes=(notes or []) + [f"stage timings (s): {s.timings()}"],
    )
    log.info(f"[pipeline] report: {report}")
    return {"report": report, "evaluation": ev, "synthetic": syn, "fidelity": fid, "timings": s.timings()}


def _brief(manifest: dict) -> dict:
    return {"kept": manifest["kept"], "classes": manifest["classes"], "quarantined": len(manifest["quarantined"])}


def _latent_brief(manifest: dict) -> dict:
    return {"rows": manifest["rows"], "scale_factor": manifest["scale_factor"]}


def pipeline_report(result: dict) -> str:
    """What `histodiff pipeline` prints: the report, the evaluation and each stage's seconds, as JSON."""
    return json.dumps({"report": result["report"], "evaluation": result["evaluation"], "seconds": result["timings"]})
