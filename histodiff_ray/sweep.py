"""`histodiff sweep`: Ray Tune over guidance scale, selection threshold and synthetic ratio.

    histodiff sweep --config cpu --tiles tiles/crc5 --ldm runs/finetune --classifier runs/classifier \\
        --judge runs/judge --output sweeps/crc5 sweep.trials=12

Guidance scales come from a grid (``sweep.guidance_scales``): the driver generates the synthetic
set of every scale on it first, one after the other (``OUT/synthetic/g<scale>``; resumable, so a
rerun makes only what is missing). Trials then only read: each applies its threshold τ to the stored
scores in memory and trains a short downstream classifier on real + selected synthetic tiles, so
trials that share a scale never write into one folder, however many run at once. The objective is
the val macro-F1 (the test split is never read); ASHA stops weak trials after their first epochs.

``sweep.concurrency`` trials run at once (1 on the cpu profile: each trains a downstream classifier
with torch threads on all cores). A trial holds a token 0.01 CPU, since Tune needs a non-empty
request and a whole core per trial would leave a 2-core machine idle between trials' threads.

Writes ``OUT/trials.csv`` (one row per trial) and ``OUT/best.yaml``, a complete config with the
best values that ``histodiff generate --config OUT/best.yaml`` and ``evaluate`` take as they are.
"""

from __future__ import annotations

import csv
import dataclasses
import io

import numpy as np
import ray.tune
import yaml
from ray.tune.schedulers import ASHAScheduler

from histodiff_ray.config import Config, StorageConfig, config_from_dict
from histodiff_ray.console import logger
from histodiff_ray.data.tiles import decode_images, load_tile_table
from histodiff_ray.downstream import train_tile_classifier
from histodiff_ray.errors import HistodiffError
from histodiff_ray.evaluate import load_synthetic
from histodiff_ray.generate import generate
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import open_location, write_atomic

log = logger(__name__)


def _synthetic_uri(output: str, scale: float) -> str:
    return f"{output.rstrip('/')}/synthetic/g{scale:g}"


def trial(params: dict, storage: dict) -> None:
    """One Tune trial (a function trainable): select from its guidance scale's set, train.
    ``storage`` (credentials included) comes through the object store, never Tune's saved params."""

    cfg = config_from_dict(params["cfg"])
    cfg.storage = StorageConfig(**storage)
    cfg.sampling.guidance_scale = float(params["guidance_scale"])
    cfg.selection.confidence_threshold = float(params["confidence_threshold"])
    cfg.evaluate.synthetic_ratio = float(params["synthetic_ratio"])
    a = params["args"]
    syn_uri = _synthetic_uri(a["output"], cfg.sampling.guidance_scale)
    tiles = open_location(a["tiles"], cfg.storage)
    train, val = load_tile_table(tiles, "train", labeled_only=True), load_tile_table(tiles, "val")
    train_x, train_y = decode_images(train.column("image")), train.column("label").to_numpy().astype(np.int64)
    val_x, val_y = decode_images(val.column("image")), val.column("label").to_numpy().astype(np.int64)
    k = int(max(train_y.max(), val_y.max())) + 1
    syn_x, syn_y = load_synthetic(
        cfg, syn_uri, np.bincount(train_y, minlength=k), cfg.evaluate.synthetic_ratio, selection=cfg.selection
    )
    x, y = np.concatenate([train_x, syn_x]), np.concatenate([train_y, syn_y])
    # ASHA decides when to stop, from a val score after every epoch.
    cfg.downstream.epochs, cfg.downstream.patience, cfg.downstream.val_every = cfg.sweep.epochs, cfg.sweep.epochs, 1
    # The step budget is the real tiles' (as in evaluate): a trial with more synthetic tiles gets no more steps.
    train_tile_classifier(
        x,
        y,
        val_x,
        val_y,
        cfg.downstream,
        k,
        seed=cfg.seed,
        budget_tiles=len(train_y),
        log=lambda row: ray.tune.report(
            {
                "val_macro_f1": row["val_macro_f1"],
                "val_acc": row["val_acc"],
                "epoch": row["epoch"],
                "synthetic_tiles": int(len(syn_y)),
            }
        ),
    )


def sweep(cfg: Config, *, tiles: str, ldm: str, classifier: str, judge: str, output: str) -> dict:

    s = cfg.sweep
    init_ray(cfg)
    out = open_location(output, cfg.storage)
    for scale in s.guidance_scales:
        log.info(f"[sweep] the synthetic set at guidance scale {scale:g}")
        generate(
            dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, guidance_scale=float(scale))),
            ldm=ldm,
            classifier=classifier,
            judge=judge,
            tiles=tiles,
            output=_synthetic_uri(output, scale),
            per_class=s.per_class,
        )
    space = {
        "cfg": cfg.to_dict(),  # without secrets: Tune saves its params with the trial
        "args": {"tiles": tiles, "ldm": ldm, "classifier": classifier, "judge": judge, "output": output},
        "guidance_scale": ray.tune.choice(list(s.guidance_scales)),
        "confidence_threshold": ray.tune.uniform(*s.confidence_threshold_range),
        "synthetic_ratio": ray.tune.uniform(*s.synthetic_ratio_range),
    }
    parent, name = out.path.rstrip("/").rsplit("/", 1)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(
            ray.tune.with_parameters(trial, storage=dataclasses.asdict(cfg.storage)),
            {"cpu": 0.01, "gpu": s.gpus_per_trial},
        ),
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            metric="val_macro_f1",
            mode="max",
            num_samples=s.trials,
            max_concurrent_trials=s.concurrency,
            scheduler=ASHAScheduler(
                time_attr="training_iteration", max_t=s.epochs, grace_period=s.grace_epochs, reduction_factor=2
            ),
        ),
        run_config=ray.tune.RunConfig(name=f"{name}-tune", storage_path=parent, storage_filesystem=out.filesystem),
    )
    results = tuner.fit()
    rows = []
    for result in results:
        if result.metrics is None:
            continue
        history = result.metrics_dataframe
        best_epoch = (
            history["val_macro_f1"].max()
            if history is not None and len(history)
            else result.metrics.get("val_macro_f1")
        )
        rows.append(
            {
                "trial": result.path.rstrip("/").rsplit("/", 1)[-1],
                "guidance_scale": result.config["guidance_scale"],
                "confidence_threshold": round(result.config["confidence_threshold"], 4),
                "synthetic_ratio": round(result.config["synthetic_ratio"], 4),
                "epochs": int(result.metrics.get("training_iteration", 0)),
                "val_macro_f1": float(best_epoch),
                "synthetic_tiles": result.metrics.get("synthetic_tiles"),
                "error": str(result.error) if result.error else "",
            }
        )
    if not any(not r["error"] for r in rows):
        raise HistodiffError(f"sweep: every trial failed; first error: {rows[0]['error'] if rows else 'no trials ran'}")
    rows.sort(key=lambda r: -r["val_macro_f1"])
    best = next(r for r in rows if not r["error"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out.join("trials.csv"), buf.getvalue().encode())
    best_cfg = dataclasses.replace(cfg)
    best_dict = best_cfg.to_dict()
    best_dict["sampling"]["guidance_scale"] = float(best["guidance_scale"])
    best_dict["selection"]["confidence_threshold"] = float(best["confidence_threshold"])
    best_dict["evaluate"]["synthetic_ratio"] = float(best["synthetic_ratio"])
    config_from_dict(best_dict)  # the file must load as a config
    header = (
        f"# histodiff sweep {output}: best of {len(rows)} trials, val macro-F1 {best['val_macro_f1']:.4f}\n"
        f"# use: histodiff generate --config {out.join('best.yaml').uri} ...; histodiff evaluate --config ...\n"
    )
    write_atomic(out.join("best.yaml"), (header + yaml.safe_dump(best_dict, sort_keys=False)).encode())
    return {"best": best, "trials": rows, "best_config": out.join("best.yaml").uri}


def sweep_report(result: dict, output: str) -> str:
    """What `histodiff sweep` prints: the best trial and where the trials and its config are."""
    best = result["best"]
    return (
        f"best of {len(result['trials'])} trials: guidance_scale {best['guidance_scale']}, confidence_threshold "
        f"{best['confidence_threshold']}, synthetic_ratio {best['synthetic_ratio']}: val macro-F1 "
        f"{best['val_macro_f1']:.4f}\ntrials: {output}/trials.csv; best config: {result['best_config']}"
    )
