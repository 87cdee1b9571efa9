"""`histodiff fidelity`: how real do the kept synthetic tiles look, class by class?

    histodiff fidelity --config cpu --tiles tiles/crc5 --synthetic cg=synthetic/cg \\
        --synthetic cfg=synthetic/cfg --oracle runs/oracle --output fidelity/

Per synthetic set and class, the *kept* synthetic tiles are compared with the *real val* tiles:

* **oracle agreement**: the share of kept tiles of class c that an *oracle* classifies as c. The
  oracle is a timm tile classifier (the judge's and the evaluation's builder, ``downstream.*``)
  trained on *every* train tile of the tile set with its label, not only the ``data.label_fraction``
  share that the method gets, with its epoch chosen on val. It is a measuring instrument and nothing
  else: it never feeds the generator, the guidance, the selection or any model choice, and it never
  reads the test split (see :func:`oracle_note`).
* **precision / recall** (Kynkäänniemi et al. 2019, k = 3) and **FID / KID** on the oracle's
  penultimate features (``metrics.py``).
* **C2ST**, a classifier two-sample test: a tiny CNN learns to tell real from synthetic pixels on one
  half of the tiles and is scored on the other half (0.5: indistinguishable, 1.0: always told apart).

With ``--autoencoder RUN`` the same numbers are also measured for real *train* tiles passed through
that autoencoder (as many per class as the sets generated): the **ceiling** of any generator whose
tiles its decoder draws, since a perfect latent generator would produce exactly such tiles. With
``--judge`` they are first selected as `generate` selects, so the ceiling reads in the kept set's
terms (how many a class keeps, the oracle's agreement with what is kept). It says which targets the
first stage already rules out (docs/fidelity.md). The tiles are unlabeled for the method (the judge
never learnt them); the oracle did learn them, so their agreement is an upper bound.

Outputs: ``OUT/fidelity.json`` (every number, the oracle's val accuracy, the sets and paths measured)
and ``OUT/fidelity.md`` (one table per set). The oracle lives in its own folder (``--oracle``), like a
judge; a folder that already holds one for the same tile set is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from histodiff_ray.config import Config
from histodiff_ray.console import logger
from histodiff_ray.data.synthetic import read_tile_images
from histodiff_ray.data.tiles import decode_images, load_tile_table, require_manifest
from histodiff_ray.downstream import (
    load_tile_classifier,
    predict,
    save_tile_classifier,
    train_tile_classifier,
)
from histodiff_ray.errors import HistodiffError
from histodiff_ray.judge import load_judge, read_judge_config
from histodiff_ray.ldm import LatentDiffusion
from histodiff_ray.metrics import fid, kid, precision_recall
from histodiff_ray.models import to_tensor
from histodiff_ray.models.autoencoder import load_autoencoder, reconstruct
from histodiff_ray.plots import curves_png
from histodiff_ray.selection import decide, nearest_centroid_scores
from histodiff_ray.storage import (
    Location,
    download_dir,
    exists,
    open_location,
    read_bytes,
    read_run_info,
    upload_dir,
    write_atomic,
)

log = logger(__name__)

KNN_K = 3  # Kynkäänniemi et al.'s k
C2ST_STEPS = 300  # optimizer steps: ~6 s on one CPU thread for 64-px tiles, whatever their number
C2ST_MIN_TILES = 20  # tiles of each side (after balancing) below which a C2ST is not run


# --- oracle ----------------------------------------------------------------------------------------


def oracle_note(oracle: dict) -> str:
    """The sentence that says what the oracle is and why measuring with it is fair."""
    return (
        f"Oracle: a {oracle['architecture']} tile classifier trained on all {oracle['train_tiles']} train tiles "
        "of the tile set with their labels (more labels than the method gets: data.label_fraction does not "
        f"apply to it), epoch chosen on val (val accuracy {oracle['val_acc']:.3f}, "
        f"macro-F1 {oracle['val_macro_f1']:.3f}). "
        "It is a measuring instrument only: it never feeds the generator, the guidance, the selection or any model "
        "choice, and it reads val only to choose its own epoch, never the test split. Its extra labels make it a "
        "stricter, independent judge of the synthetic tiles, not a help to them."
    )


def _tiles_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def train_or_load_oracle(cfg: Config, tiles: str, oracle: str) -> tuple[torch.nn.Module, dict, bool]:
    """(model, summary, reused): the oracle in the folder ``oracle`` when it holds one for this tile
    set, else a new one trained on every labeled train tile (epoch chosen on val) and saved there."""
    tiles_loc, oracle_loc = open_location(tiles, cfg.storage), open_location(oracle, cfg.storage)
    manifest = require_manifest(tiles_loc)
    classes, digest = manifest["classes"], _tiles_digest(manifest)
    # The weights are written last (upload_dir goes in name order): without them the folder holds no oracle yet.
    if exists(oracle_loc.join("model.safetensors")):
        config = json.loads(read_bytes(oracle_loc.join("config.json")))
        summary = config.get("oracle")
        if summary is None:
            raise HistodiffError(
                f"{oracle} holds a tile classifier that is not a fidelity oracle; use another --oracle folder"
            )
        if summary["tiles_digest"] != digest:
            raise HistodiffError(
                f"the oracle at {oracle} was trained on another tile set ({summary['tiles']}); "
                f"use another --oracle folder for {tiles}"
            )
        with tempfile.TemporaryDirectory(prefix="oracle-") as tmp:
            model, _ = load_tile_classifier(download_dir(oracle_loc, tmp))
        log.info(f"[fidelity] reusing the oracle at {oracle_loc.uri} (val accuracy {summary['val_acc']:.3f})")
        return model, summary, True

    # Every train tile with a label, whatever its `labeled` mark (that mark is the method's budget).
    train, val = load_tile_table(tiles_loc, "train"), load_tile_table(tiles_loc, "val")
    train_y, val_y = train.column("label").to_numpy().astype(np.int64), val.column("label").to_numpy().astype(np.int64)
    train_x, val_x = decode_images(train.column("image")), decode_images(val.column("image"))
    train_x, train_y = train_x[train_y >= 0], train_y[train_y >= 0]
    missing = [classes[k] for k in range(len(classes)) if not np.any(train_y == k)]
    if not classes or missing or len(val_y) == 0:
        raise HistodiffError(
            f"fidelity: {tiles} needs labeled train tiles of every class and val tiles to train an "
            f"oracle (classes without train tiles: {missing or 'none'}; val tiles: {len(val_y)})"
        )

    def show_epoch(row):
        log.info(
            f"[oracle] epoch {row['epoch']}/{cfg.downstream.epochs}: loss {row['loss']:.3f}, "
            f"val acc {row['val_acc']:.3f}, val macro-F1 {row['val_macro_f1']:.3f}"
        )

    model, history = train_tile_classifier(
        train_x, train_y, val_x, val_y, cfg.downstream, len(classes), seed=cfg.seed, log=show_epoch
    )
    best = max(history, key=lambda r: r["val_macro_f1"])
    summary = {
        "tiles": tiles_loc.uri,
        "tiles_digest": digest,
        "classes": classes,
        "architecture": cfg.downstream.arch,
        "train_tiles": int(len(train_y)),
        "val_tiles": int(len(val_y)),
        "best_epoch": best["epoch"],
        "val_acc": best["val_acc"],
        "val_macro_f1": best["val_macro_f1"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_tile_classifier(model, cfg.downstream.arch, classes, int(train_x.shape[1]), tmp, extra={"oracle": summary})
        with open(os.path.join(tmp, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
        upload_dir(tmp, oracle_loc)
    return model, summary, False


def oracle_agreement(pred: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[list[float | None], float | None]:
    """Per class c, the share of tiles made for c (``target == c``) that the oracle assigns to c
    (None for a class without tiles); and the same share over all tiles."""
    pred, target = np.asarray(pred), np.asarray(target)
    per_class = [float(np.mean(pred[target == c] == c)) if np.any(target == c) else None for c in range(num_classes)]
    return per_class, float(np.mean(pred == target)) if len(target) else None


# --- classifier two-sample test --------------------------------------------------------------------


def _c2st_net() -> torch.nn.Module:
    """Three strided convolutions and a linear layer (~15k weights): enough to see colour, texture
    and sharpness, small enough to train in seconds on one CPU thread."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 1),
    )


def _balanced(
    real_groups: np.ndarray, fake_groups: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices with as many real as fake tiles in every group: the larger side is subsampled."""
    real_idx, fake_idx = [], []
    for g in np.intersect1d(real_groups, fake_groups):
        r, f = np.flatnonzero(real_groups == g), np.flatnonzero(fake_groups == g)
        n = min(len(r), len(f))
        real_idx.append(rng.choice(r, n, replace=False))
        fake_idx.append(rng.choice(f, n, replace=False))
    empty = np.zeros(0, np.int64)
    return (np.concatenate(real_idx) if real_idx else empty), (np.concatenate(fake_idx) if fake_idx else empty)


def _c2st_fit_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, seed: int, steps: int, batch_size: int
) -> torch.Tensor:
    """Train :func:`_c2st_net` for ``steps`` optimizer steps; its 0/1 predictions on ``test_x``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = _c2st_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Decaying to 0 ends training on a settled model: at a constant rate the held-out accuracy swings.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    done = 0
    while done < steps:
        order = torch.randperm(len(train_x), generator=g)
        for start in range(0, len(order) - 1, batch_size):  # - 1: BatchNorm needs batches of two or more
            idx = order[start : start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(train_x[idx]).squeeze(1), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            done += 1
            if done == steps:
                break
    model.eval()
    with torch.no_grad():
        return torch.cat([model(test_x[s : s + 256]).squeeze(1) > 0 for s in range(0, len(test_x), 256)]).float()


def c2st(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    real_groups: np.ndarray | None = None,
    fake_groups: np.ndarray | None = None,
    seed: int = 0,
    steps: int = C2ST_STEPS,
    batch_size: int = 64,
    min_tiles: int = C2ST_MIN_TILES,
) -> dict | None:
    """Classifier two-sample test on uint8 N×H×W×3 tiles (Lopez-Paz & Oquab 2017).

    Both sides are first cut to equal counts by subsampling the larger one, within each group when
    ``*_groups`` are given (e.g. classes: then the class mix cannot give a side away). Each side is
    split in halves; a small CNN (:func:`_c2st_net`) trains for ``steps`` optimizer steps on one half
    of each and is scored on the other. A fixed step budget rather than epochs: a few hundred tiles
    need many passes to learn a subtle difference such as blur, thousands need only a few.

    Returns ``{"accuracy", "p_value", "n_per_side", "n_test"}``: the held-out accuracy (0.5 =
    indistinguishable) and its one-sided binomial p-value under "indistinguishable"; None when fewer
    than ``min_tiles`` tiles per side remain.
    """
    rng = np.random.default_rng(seed)
    real_groups = np.zeros(len(real), np.int64) if real_groups is None else np.asarray(real_groups)
    fake_groups = np.zeros(len(fake), np.int64) if fake_groups is None else np.asarray(fake_groups)
    real_idx, fake_idx = _balanced(real_groups, fake_groups, rng)
    n = len(real_idx)
    if n < max(min_tiles, 2):
        return None
    real_idx, fake_idx = rng.permutation(real_idx), rng.permutation(fake_idx)
    half = n // 2
    x = to_tensor(
        np.concatenate([real[real_idx[:half]], fake[fake_idx[:half]], real[real_idx[half:]], fake[fake_idx[half:]]])
    )
    y = torch.cat([torch.zeros(half), torch.ones(half), torch.zeros(n - half), torch.ones(n - half)])
    # One thread: this net is too small to gain from intra-op threads, and on a busy machine their
    # synchronisation made it ~30x slower (300 s instead of 11 s with 2 threads on 2 shared cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pred = _c2st_fit_predict(
            x[: 2 * half], y[: 2 * half], x[2 * half :], seed=seed, steps=steps, batch_size=batch_size
        )
    finally:
        torch.set_num_threads(threads)
    test_y = y[2 * half :]
    correct, total = int((pred == test_y).sum()), len(test_y)
    # P(at least `correct` right | each test tile a fair coin): exact binomial tail.
    p_value = sum(math.comb(total, k) for k in range(correct, total + 1)) / 2**total
    return {"accuracy": correct / total, "p_value": p_value, "n_per_side": n, "n_test": total}


# --- one synthetic set -----------------------------------------------------------------------------


def load_kept_synthetic(cfg: Config, uri: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every kept tile of a generate output, as selected in its ``index.parquet``: (uint8 tiles,
    labels) in class and tile order, and the number of tiles generated per class."""

    out = open_location(uri, cfg.storage)
    try:
        index = pq.read_table(
            io.BytesIO(read_bytes(out.join("index.parquet"))), columns=["tile_id", "label", "shard", "kept", "index"]
        )
    except FileNotFoundError:
        raise HistodiffError(
            f"{uri} holds no finished synthetic set (index.parquet is missing); run `histodiff generate` first"
        ) from None
    set_classes = json.loads(read_bytes(out.join("plan.json")))["classes"]
    if set_classes != classes:
        raise HistodiffError(f"the synthetic set at {uri} has classes {set_classes}, the tile set has {classes}")
    generated = np.bincount(index.column("label").to_numpy(), minlength=len(classes))
    kept = index.filter(index.column("kept")).sort_by([("label", "ascending"), ("index", "ascending")])
    images = read_tile_images(out, kept.column("tile_id").to_pylist(), kept.column("shard").to_pylist())
    tiles = decode_images(images) if images else np.zeros((0, cfg.data.tile_size, cfg.data.tile_size, 3), np.uint8)
    return tiles, kept.column("label").to_numpy().astype(np.int64), generated


def measure_set(
    real_x: np.ndarray,
    real_y: np.ndarray,
    real_features: np.ndarray,
    fake_x: np.ndarray,
    fake_y: np.ndarray,
    fake_features: np.ndarray,
    fake_pred: np.ndarray,
    generated: np.ndarray,
    classes: list[str],
    *,
    seed: int = 0,
    c2st_min_tiles: int = C2ST_MIN_TILES,
) -> dict[str, dict]:
    """The fidelity numbers of one synthetic set, per class name and over ``"all"`` classes; a number
    that the tile counts do not allow (too few tiles) is None."""
    agreement, overall_agreement = oracle_agreement(fake_pred, fake_y, len(classes))
    rows = {}
    for c, name in list(enumerate(classes)) + [(None, "all")]:
        r_mask = np.ones(len(real_y), bool) if c is None else real_y == c
        f_mask = np.ones(len(fake_y), bool) if c is None else fake_y == c
        r, f = real_features[r_mask], fake_features[f_mask]
        row = {
            "generated": int(generated.sum() if c is None else generated[c]),
            "kept": int(f_mask.sum()),
            "real_val": int(r_mask.sum()),
            "oracle_agreement": overall_agreement if c is None else agreement[c],
            "precision": None,
            "recall": None,
            "fid": None,
            "kid": None,
            "kid_sd": None,
        }
        if len(r) > KNN_K and len(f) > KNN_K:
            row["precision"], row["recall"] = precision_recall(r, f, k=KNN_K)
        if len(r) >= 2 and len(f) >= 2:
            row["fid"] = fid(r, f)
            row["kid"], row["kid_sd"] = kid(r, f, seed=seed)
        # Over all classes the C2ST compares class-matched samples, so a different class mix is no giveaway.
        groups = {"real_groups": real_y[r_mask], "fake_groups": fake_y[f_mask]} if c is None else {}
        row["c2st"] = c2st(real_x[r_mask], fake_x[f_mask], seed=seed, min_tiles=c2st_min_tiles, **groups)
        rows[name] = row
    return rows


def autoencoder_folder(cfg: Config, run: str) -> Location:
    """The autoencoder folder of the finished train-autoencoder run ``run``."""
    vae_loc = open_location(run, cfg.storage).join("model", "vae")
    if not exists(vae_loc.join("config.json")):
        raise HistodiffError(
            f"no autoencoder at {vae_loc.uri}: give --autoencoder a finished train-autoencoder run folder"
        )
    return vae_loc


def reconstructed_train_tiles(
    tiles_loc: Location, vae_loc: Location, per_class: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class[c]`` *unlabeled* train tiles of each class c (in the tile set's order:
    tiles whose labels the method never saw, so the judge did not learn them) through the autoencoder
    in ``vae_loc``: (uint8 tiles, labels)."""
    train = load_tile_table(tiles_loc, "train", columns=["image", "label", "labeled"])
    labels = train.column("label").to_numpy().astype(np.int64)
    unseen = ~train.column("labeled").to_numpy(zero_copy_only=False)
    rows = [np.flatnonzero((labels == c) & unseen)[:n] for c, n in enumerate(per_class)]
    rows = np.concatenate(rows).astype(np.int64)
    with tempfile.TemporaryDirectory(prefix="vae-") as tmp:
        vae = load_autoencoder(download_dir(vae_loc, tmp)).eval()
    tiles = decode_images(train.column("image").take(rows))
    return reconstruct(vae, tiles), labels[rows]


def judge_keeps(cfg: Config, judge: str, tiles: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Which tiles `generate`'s selection would keep as their class: the judge's confidence ≥ τ and
    the nearest centroid (``selection.*``); without the memorization audit, since these are real tiles."""
    model, _, centroids = load_judge(judge, cfg.storage)
    probs, features = predict(model, tiles)
    nearest, _ = nearest_centroid_scores(features, centroids, labels)
    no_audit = dataclasses.replace(cfg.selection, min_real_distance=0.0)
    kept, _ = decide(labels, probs[np.arange(len(labels)), labels], nearest, None, no_audit)
    return kept


def fidelity(
    cfg: Config,
    tiles: str,
    synthetic: dict[str, str],
    oracle: str,
    output: str,
    *,
    autoencoder: str | None = None,
    judge: str | None = None,
    c2st_min_tiles: int = C2ST_MIN_TILES,
) -> dict:
    """Measure each synthetic set (name → generate output) against the real val tiles of ``tiles``
    with the oracle in ``oracle`` (trained there first when absent), and with ``autoencoder`` (a
    train-autoencoder run) the ceiling its decoder sets, selected by ``judge`` when given; writes
    OUT/fidelity.json and OUT/fidelity.md and returns the result."""
    if not synthetic:
        raise HistodiffError("fidelity: give at least one --synthetic set")
    tiles_loc, out = open_location(tiles, cfg.storage), open_location(output, cfg.storage)
    classes = require_manifest(tiles_loc)["classes"]
    if judge and not autoencoder:
        raise HistodiffError("fidelity: --judge selects the ceiling's tiles; give --autoencoder with it")
    # Wrong paths fail before the work: the autoencoder's folder, the judge's classes.
    vae_loc = autoencoder_folder(cfg, autoencoder) if autoencoder else None
    if judge and (judge_classes := read_judge_config(judge, cfg.storage)["classes"]) != classes:
        raise HistodiffError(f"the judge at {judge} knows classes {judge_classes}, the tile set has {classes}")
    model, summary, reused = train_or_load_oracle(cfg, tiles, oracle)
    val = load_tile_table(tiles_loc, "val")
    val_x, val_y = decode_images(val.column("image")), val.column("label").to_numpy().astype(np.int64)
    _, val_features = predict(model, val_x)

    def measure(x: np.ndarray, y: np.ndarray, generated: np.ndarray) -> dict[str, dict]:
        probs, features = predict(model, x)
        return measure_set(
            val_x,
            val_y,
            val_features,
            x,
            y,
            features,
            probs.argmax(1),
            generated,
            classes,
            seed=cfg.seed,
            c2st_min_tiles=c2st_min_tiles,
        )

    sets, most_generated = {}, np.zeros(len(classes), np.int64)
    for name, uri in synthetic.items():
        syn_x, syn_y, generated = load_kept_synthetic(cfg, uri, classes)
        if len(syn_x) and syn_x.shape[1:] != val_x.shape[1:]:
            raise HistodiffError(
                f"the synthetic set at {uri} has {syn_x.shape[1]} px tiles, the tile set {val_x.shape[1]} px"
            )
        log.info(f"[fidelity] {name}: {len(syn_y)} kept of {int(generated.sum())} generated tiles")
        sets[name] = {"uri": open_location(uri, cfg.storage).uri, "per_class": measure(syn_x, syn_y, generated)}
        most_generated = np.maximum(most_generated, generated)
    ceiling = None
    if vae_loc:
        rec_x, rec_y = reconstructed_train_tiles(tiles_loc, vae_loc, most_generated)
        generated = np.bincount(rec_y, minlength=len(classes))
        if judge:
            kept = judge_keeps(cfg, judge, rec_x, rec_y)
            rec_x, rec_y = rec_x[kept], rec_y[kept]
        log.info(
            f"[fidelity] ceiling: {len(rec_y)} of {int(generated.sum())} real train tiles through the "
            f"autoencoder {vae_loc.uri}" + (f", kept by the judge at {judge}" if judge else "")
        )
        ceiling = {
            "autoencoder": vae_loc.uri,
            "judge": open_location(judge, cfg.storage).uri if judge else None,
            "per_class": measure(rec_x, rec_y, generated),
        }
    result = {
        "tiles": tiles_loc.uri,
        "classes": classes,
        "real_val_tiles": int(len(val_y)),
        "oracle": {
            "path": open_location(oracle, cfg.storage).uri,
            "reused": reused,
            **summary,
            "note": oracle_note(summary),
        },
        "features": "the oracle's penultimate features (forward_head(..., pre_logits=True))",
        "precision_recall_k": KNN_K,
        "c2st": {
            "steps": C2ST_STEPS,
            "min_tiles": c2st_min_tiles,
            "seed": cfg.seed,
            "what": "held-out accuracy of a small CNN telling real val from kept synthetic tiles (0.5: "
            "indistinguishable); each side subsampled to equal counts (per class for 'all')",
        },
        "sets": sets,
        "ceiling": ceiling,
    }
    write_atomic(out.join("fidelity.json"), json.dumps(result, indent=1).encode())
    write_atomic(out.join("fidelity.md"), fidelity_table(result).encode())
    return result


# --- tables ----------------------------------------------------------------------------------------

CEILING_NOTE = (
    "What a perfect generator on these latents would score: real train tiles whose labels the method never saw, "
    "encoded and decoded (posterior mean). No synthetic tile drawn by this decoder can be expected to do better. "
    "'generated' counts the tiles reconstructed; 'kept' those that generate's selection keeps (the judge's confidence "
    "and nearest centroid, no memorization audit) when a judge is given, else all of them. The oracle learnt from "
    "these very tiles, so their agreement is an upper bound."
)
TABLE_HEADER = ["class", "generated", "kept", "oracle agreement", "precision", "recall", "FID", "KID", "C2ST"]


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(per_class: dict[str, dict]) -> list[list[str]]:
    """One set's rows as text cells (``TABLE_HEADER`` columns); "-" where a number was not computable."""
    rows = []
    for name, r in per_class.items():
        test = r["c2st"]
        rows.append(
            [
                name,
                str(r["generated"]),
                str(r["kept"]),
                _num(r["oracle_agreement"]),
                _num(r["precision"]),
                _num(r["recall"]),
                _num(r["fid"], 2),
                _num(r["kid"], 4),
                "-" if test is None else f"{test['accuracy']:.3f} (n={test['n_per_side']})",
            ]
        )
    return rows


def ceiling_title(ceiling: dict) -> str:
    """The ceiling block's heading: which autoencoder drew the tiles, and which judge selected them."""
    judge = ceiling.get("judge")
    return f"ceiling: real train tiles through the autoencoder {ceiling['autoencoder']}" + (
        f", selected by the judge {judge}" if judge else ""
    )


def fidelity_table(result: dict) -> str:
    """The result as Markdown: the oracle note, then one table per synthetic set."""
    lines = [
        result["oracle"]["note"],
        "",
        f"Oracle folder: {result['oracle']['path']}. Real reference: the {result['real_val_tiles']} val tiles "
        f"of {result['tiles']}. Precision/recall (k={result['precision_recall_k']}), FID and KID on "
        f"{result['features']}. "
        f"C2ST: {result['c2st']['what']}; n = tiles per side; '-' where there are too few tiles.",
    ]
    for name, s in result["sets"].items():
        lines += [
            "",
            f"### {name}: {s['uri']}",
            "",
            "| " + " | ".join(TABLE_HEADER) + " |",
            "|---" * len(TABLE_HEADER) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(s["per_class"])]
    if result.get("ceiling"):
        lines += [
            "",
            f"### {ceiling_title(result['ceiling'])}",
            "",
            CEILING_NOTE,
            "",
            "| " + " | ".join(TABLE_HEADER) + " |",
            "|---" * len(TABLE_HEADER) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(result["ceiling"]["per_class"])]
    return "\n".join(lines) + "\n"


# --- fidelity along training -----------------------------------------------------------------------


def checkpoint_curve(
    cfg: Config, runs: list[str], tiles: str, oracle: str, output: str, *, n: int = 256, steps: int = 25
) -> list[dict]:
    """Fidelity of unconditional samples at every registered checkpoint of one or more diffusion runs
    (e.g. a pre-training run, then the fine-tune that continued it), against all real val tiles of
    ``tiles``, on the oracle's features: k-NN precision / recall, FID and a C2ST per checkpoint,
    against the training samples seen so far (a fine-tune continues its parent's count). The same
    ``n`` seeds are sampled at every checkpoint (DDIM, ``steps`` steps, η = 1), so the points differ
    only by the weights. Writes OUT/curve.json and OUT/curve.png; returns the rows."""

    tiles_loc, out = open_location(tiles, cfg.storage), open_location(output, cfg.storage)
    model, _, _ = train_or_load_oracle(cfg, tiles, oracle)
    val = load_tile_table(tiles_loc, "val")
    val_x = decode_images(val.column("image"))
    _, val_features = predict(model, val_x)
    rows, seen_before = [], 0
    for run in runs:
        run_loc = open_location(run, cfg.storage)
        info = read_run_info(run_loc)
        rc = info["config"]
        batch = rc["diffusion"].get("batch_size") or rc["data"]["batch_size"]
        per_step = batch * rc["ray"]["num_workers"] * rc["diffusion"]["grad_accum_steps"]
        snapshot = json.loads(read_bytes(run_loc.join("checkpoint_manager_snapshot.json")))
        names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
        ldm = LatentDiffusion.from_run(run_loc)
        points = []
        for name in names:
            ckpt = run_loc.join(name)
            step = json.loads(read_bytes(ckpt.join("state.json")))["step"]
            points.append((step, ckpt))
        for step, ckpt in sorted(points, key=lambda p: p[0]):
            with tempfile.TemporaryDirectory(prefix="curve-") as tmp:
                local = download_dir(ckpt.join("unet_ema"), tmp)
                ldm.unet.load_state_dict(load_file(os.path.join(local, "diffusion_pytorch_model.safetensors")))
            generators = [torch.Generator().manual_seed(cfg.seed * 100_003 + i) for i in range(n)]
            fake_x = np.concatenate(
                [
                    ldm.decode(
                        ldm.sample(
                            len(g),
                            steps=steps,
                            sampler=cfg.sampling.sampler,
                            karras_sigmas=cfg.sampling.karras_sigmas,
                            generator=g,
                        )
                    )
                    for g in (generators[i : i + 64] for i in range(0, n, 64))
                ]
            )
            _, fake_features = predict(model, fake_x)
            precision, recall = precision_recall(val_features, fake_features, k=KNN_K)
            test = c2st(val_x, fake_x, seed=cfg.seed)
            row = {
                "run": run_loc.uri,
                "checkpoint_step": step,
                "samples_seen": seen_before + step * per_step,
                "precision": precision,
                "recall": recall,
                "fid": fid(val_features, fake_features),
                "c2st": None if test is None else test["accuracy"],
            }
            log.info(
                f"[fidelity-curve] {run} step {step}: precision {precision:.3f}, recall {recall:.3f}, "
                f"FID {row['fid']:.1f}, C2ST {row['c2st']}"
            )
            rows.append(row)
        seen_before += info["step"] * per_step
    write_atomic(out.join("curve.json"), json.dumps(rows, indent=1).encode())
    history = [{"step": r["samples_seen"], **{k: r[k] for k in ("precision", "recall", "fid", "c2st")}} for r in rows]
    write_atomic(
        out.join("curve.png"), curves_png(history, "unconditional samples vs real val tiles, by training samples seen")
    )
    return rows
