"""`histodiff train-judge`: the classifier that decides which synthetic tiles to keep.

It is trained on the real labeled train tiles only (pixels, a timm model), with the epoch chosen
on the val split. Its folder holds the model (safetensors + config.json) and the class centroids of
its features over the val tiles, which selection's centroid-agreement rule compares against. The
centroids come from tiles the judge was not trained on: on its own train tiles the features sit
tighter around their class than on any new tile, real or synthetic::

    JUDGE/model.safetensors  JUDGE/config.json  JUDGE/centroids.safetensors  JUDGE/history.json

It is deliberately a different network from the latent classifier that guides sampling: a tile
that fooled the guide must still convince an independent judge.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file

from histodiff_ray.config import Config
from histodiff_ray.console import logger
from histodiff_ray.data.tiles import decode_images, load_tile_table, require_manifest
from histodiff_ray.downstream import load_tile_classifier, predict, save_tile_classifier, train_tile_classifier
from histodiff_ray.errors import HistodiffError
from histodiff_ray.selection import class_centroids
from histodiff_ray.storage import download_dir, open_location, read_bytes, upload_dir

log = logger(__name__)


def train_judge(cfg: Config, tiles: str, output: str) -> dict:
    tiles_loc, out = open_location(tiles, cfg.storage), open_location(output, cfg.storage)
    manifest = require_manifest(tiles_loc)
    classes = manifest["classes"]
    train = load_tile_table(tiles_loc, "train", labeled_only=True)
    val = load_tile_table(tiles_loc, "val")
    if train.num_rows == 0 or val.num_rows == 0:
        raise HistodiffError(
            f"train-judge: {tiles} needs labeled train tiles and val tiles (has {train.num_rows} and {val.num_rows})"
        )
    train_x, train_y = decode_images(train.column("image")), train.column("label").to_numpy().astype(np.int64)
    val_x, val_y = decode_images(val.column("image")), val.column("label").to_numpy().astype(np.int64)
    missing = [classes[k] for k in range(len(classes)) if not np.any(train_y == k)]
    if missing:
        raise HistodiffError(
            f"train-judge: no labeled train tiles for class(es) {missing} in {tiles}; raise data.label_fraction"
        )

    def show_epoch(row):
        log.info(
            f"[judge] epoch {row['epoch']}/{cfg.downstream.epochs}: loss {row['loss']:.3f}, "
            f"val acc {row['val_acc']:.3f}, val macro-F1 {row['val_macro_f1']:.3f}"
        )

    model, history = train_tile_classifier(
        train_x, train_y, val_x, val_y, cfg.downstream, len(classes), seed=cfg.seed, log=show_epoch
    )
    _, features = predict(model, val_x)
    centroids = class_centroids(torch.from_numpy(features), torch.from_numpy(val_y), len(classes))
    best = max(history, key=lambda r: r["val_macro_f1"])
    summary = {
        "tiles": tiles_loc.uri,
        "classes": classes,
        "train_tiles": int(train.num_rows),
        "val_tiles": int(val.num_rows),
        "best_epoch": best["epoch"],
        "val_acc": best["val_acc"],
        "val_macro_f1": best["val_macro_f1"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_tile_classifier(model, cfg.downstream.arch, classes, cfg.data.tile_size, tmp, extra={"judge": summary})
        save_file(
            {"centroids": torch.as_tensor(np.asarray(centroids), dtype=torch.float32).contiguous()},
            os.path.join(tmp, "centroids.safetensors"),
        )
        with open(os.path.join(tmp, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
        upload_dir(tmp, out)
    return summary


def read_judge_config(judge_dir: str, storage) -> dict:
    """A judge folder's config.json (architecture, classes, tile size) without loading its weights."""
    try:
        return json.loads(read_bytes(open_location(judge_dir, storage).join("config.json")))
    except FileNotFoundError:
        raise HistodiffError(
            f"no judge at {judge_dir}: its config.json is missing (train one with `histodiff train-judge`)"
        ) from None


def load_judge(judge_dir: str, storage) -> tuple[torch.nn.Module, dict, np.ndarray]:
    """(model, config, centroids K×D) from a judge folder, local or S3."""

    with tempfile.TemporaryDirectory(prefix="judge-") as tmp:
        local = download_dir(open_location(judge_dir, storage), tmp)
        model, config = load_tile_classifier(local)
        centroids = load_file(os.path.join(local, "centroids.safetensors"))["centroids"].numpy()
    return model, config, centroids


def judge_probabilities(cfg: Config, judge_dir: str, tiles: str) -> tuple[dict[str, list[float]], dict]:
    """The judge's class probabilities for every *unlabeled train* tile of the tile set: tile_id →
    probabilities, and a summary. Val and test tiles are never labeled this way."""
    tiles_loc = open_location(tiles, cfg.storage)
    classes = require_manifest(tiles_loc)["classes"]
    model, config, _ = load_judge(judge_dir, cfg.storage)
    if config["classes"] != classes:
        raise HistodiffError(
            f"the judge at {judge_dir} knows classes {config['classes']}, the tile set {tiles} has {classes}"
        )
    table = load_tile_table(tiles_loc, "train", columns=["tile_id", "image", "labeled"])
    unlabeled = table.filter(pc.invert(table.column("labeled")))
    probs, _ = predict(model, decode_images(unlabeled.column("image")))
    best = probs.argmax(1)
    summary = {
        "judge": judge_dir,
        "unlabeled": unlabeled.num_rows,
        "most_likely": {name: int((best == k).sum()) for k, name in enumerate(classes)},
    }
    return dict(zip(unlabeled.column("tile_id").to_pylist(), probs.astype(np.float32).tolist())), summary


def pseudo_labels(cfg: Config, judge_dir: str, tiles: str) -> tuple[dict[str, int], dict]:
    """Hard labels for the unlabeled train tiles where the judge's confidence is at least
    ``guidance.pseudo_label_threshold``: tile_id → class, and a summary (counts per class). Labeled
    tiles keep their own labels."""
    probs, summary = judge_probabilities(cfg, judge_dir, tiles)
    threshold = cfg.guidance.pseudo_label_threshold
    labels = {tile: int(np.argmax(p)) for tile, p in probs.items() if max(p) >= threshold}
    classes = list(summary["most_likely"])
    summary = {
        "judge": judge_dir,
        "threshold": threshold,
        "unlabeled": summary["unlabeled"],
        "kept": {name: sum(1 for k in labels.values() if k == i) for i, name in enumerate(classes)},
    }
    return labels, summary
