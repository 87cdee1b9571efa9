"""`histodiff evaluate`: does the synthetic data make a better classifier, and by how much?

    histodiff evaluate --config cpu --tiles tiles/crc5 --synthetic pretrained=synthetic/crc5 \\
        --synthetic scratch=synthetic/crc5-no-pretraining --judge runs/judge --output eval/crc5

Arms, each trained for ``evaluate.seeds`` seeds with the same downstream model and the same
budget of optimizer steps (``downstream.epochs`` passes over the *real* labeled tiles: an arm with
synthetic tiles gets no more steps than the real one):

* ``real``: the real labeled train tiles with rotations and flips only (tissue has no orientation);
* ``real+aug``: the same plus colour augmentation: HED stain jitter and brightness / contrast /
  saturation jitter;
* ``real+aug+syn:NAME``: real+aug plus the kept synthetic tiles of a generate output,
  ``evaluate.synthetic_ratio`` × the real count, per class in proportion to the real tiles.

Every model is scored on the tile set's test split and on each external test set (``--test
NAME=DIR``: class folders named like the training classes, read through ingest's checks and µm/px
resampling; bad files are quarantined and listed, never fatal).

Each (arm, seed) trains as a Ray task and is stored under ``OUT/runs/`` as it finishes: a rerun
after a kill trains only the missing ones. Model selection (the epoch, early stopping) reads only the
val split; each model sees the test split once, after its training has finished, and nothing
downstream of that choice reads test results. Reported per arm: accuracy, balanced accuracy,
macro-F1 (mean ± sd and a 95% t-interval over seeds), per-class recall and the confusion matrix
summed over seeds. Generation quality per synthetic set and class: FID, KID and precision/recall
between the kept synthetic tiles and the real val tiles, on the judge's penultimate features (an
in-domain network trained here on the real labeled tiles; no Inception weights can be had).
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histodiff_ray.config import Config, SelectionConfig
from histodiff_ray.data.tiles import decode_images, load_tile_table, require_manifest
from histodiff_ray.errors import HistodiffError
from histodiff_ray.storage import StorageError, check_access, exists, open_location, read_bytes, write_atomic


def load_synthetic(cfg: Config, uri: str, real_counts: np.ndarray, ratio: float,
                   selection: SelectionConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Kept synthetic tiles of a generate output: per class round(ratio × real count), in tile
    order. With ``selection``, the rules are re-applied to the stored scores in memory (a sweep
    trying thresholds) instead of reading the output's index."""
    out = open_location(uri, cfg.storage)
    if selection is not None:
        from histodiff_ray.generate import load_shards
        from histodiff_ray.selection import decide

        index = load_shards(out, ["tile_id", "label", "shard", "index", "confidence", "nearest_centroid", "real_distance"])
        kept, _ = decide(index.column("label").to_numpy(), index.column("confidence").to_numpy(),
                         index.column("nearest_centroid").to_numpy(), index.column("real_distance").to_numpy(), selection)
        index = index.append_column("kept", pa.array(kept))
    else:
        try:
            index = pq.read_table(io.BytesIO(read_bytes(out.join("index.parquet"))), columns=["tile_id", "label", "shard", "kept", "index"])
        except FileNotFoundError:
            raise HistodiffError(f"{uri} holds no finished synthetic set (index.parquet is missing); run `histodiff generate` first") from None
    rows = index.filter(index.column("kept")).sort_by([("label", "ascending"), ("index", "ascending")]).to_pylist()
    wanted = {c: int(round(ratio * n)) for c, n in enumerate(real_counts)}
    chosen = []
    for row in rows:
        if wanted.get(row["label"], 0) > 0:
            chosen.append(row)
            wanted[row["label"]] -= 1
    from histodiff_ray.generate import read_tile_images

    images = read_tile_images(out, [r["tile_id"] for r in chosen], [r["shard"] for r in chosen])
    labels = [r["label"] for r in chosen]
    short = {c: n for c, n in wanted.items() if n > 0}
    if short:
        names = json.loads(read_bytes(out.join("plan.json")))["classes"]
        missing = ", ".join(f"{names[c]} {n}" for c, n in short.items())
        print(f"[evaluate] {uri}: fewer kept tiles than synthetic_ratio × real asks for (missing: {missing}); "
              "using all there are", flush=True)
    return (decode_images(images) if images else np.zeros((0, cfg.data.tile_size, cfg.data.tile_size, 3), np.uint8),
            np.asarray(labels, np.int64))


def load_test_set(cfg: Config, name: str, uri: str, classes: list[str], mpp: float | None = None,
                  known_ids: set[str] = frozenset()) -> tuple[np.ndarray, np.ndarray, dict]:
    """An external test set at ``uri``: ``<CLASS>/<image>`` folders named like the training classes,
    each image made into one tile by ingest's own code (the same decoding checks, µm/px resampling
    from ``mpp`` and tile size). Returns (uint8 tiles, labels, a summary listing quarantined files).
    ``known_ids`` are the tile set's own tile ids: pixel-identical tiles (content-hash ids) are
    counted as ``in_tile_set`` (a held-out set should have none). Read once per evaluation, in the
    driver; never used for training or any choice."""
    from histodiff_ray.data.ingest import TileOptions, plan_sources, process_files

    where = f"--test {name}={uri}"
    loc = open_location(uri, cfg.storage)
    try:
        check_access(loc, "read")
        work, quarantined = plan_sources(loc, labeled=True, source_name=name)
    except StorageError as exc:
        raise HistodiffError(f"{where}: {exc}") from None
    found = {f.label_name for f in work}
    if not found:
        raise HistodiffError(f"{where}: no images in class folders; lay it out as <CLASS>/<image> with CLASS one of {classes}")
    extra, missing = sorted(found - set(classes)), sorted(set(classes) - found)
    if extra or missing:
        raise HistodiffError(f"{where}: its classes do not match the training classes: extra {', '.join(extra) or 'none'}; "
                             f"missing {', '.join(missing) or 'none'}")
    opts = TileOptions(True, cfg.data.tile_size, cfg.data.microns_per_pixel, mpp, cfg.data.tissue_fraction, cfg.data.max_image_pixels)
    tiles, labels, ids, undecodable = [], [], [], []
    for result in process_files(work, loc.filesystem, opts, known={}):
        if result.reason:
            undecodable.append({"path": result.uri, "reason": result.reason})
            continue
        for tile in result.tiles:
            tiles.append(tile["image"])
            labels.append(classes.index(tile["label_name"]))
            ids.append(tile["tile_id"])
    if not tiles:
        raise HistodiffError(f"{where}: none of its {len(work)} images could be read ({undecodable[0]['reason']}: {undecodable[0]['path']})")
    quarantined += undecodable
    if quarantined:
        print(f"[evaluate] {where}: {len(quarantined)} files quarantined, e.g. {quarantined[0]['path']}: {quarantined[0]['reason']}",
              flush=True)
    y = np.asarray(labels, np.int64)
    summary = {"uri": uri, "tiles": len(tiles), "per_class": {c: int((y == k).sum()) for k, c in enumerate(classes)},
               "mpp": mpp, "quarantined": quarantined, "digest": _digest(json.dumps([ids, labels]).encode()),
               "in_tile_set": sum(1 for i in ids if i in known_ids)}
    if summary["in_tile_set"]:
        print(f"[evaluate] {where}: {summary['in_tile_set']} of its tiles are also in the tile set", flush=True)
    return decode_images(tiles), y, summary


def _train_and_test(cfg_dict: dict, arm: str, seed: int, train: tuple, val: tuple, tests: dict, colour_augment: bool,
                    budget_tiles: int, classes: list[str]) -> dict:
    """One (arm, seed): train with early stopping on val, then read each test set once. ``train``,
    ``val`` and each of ``tests`` (name → ...) are (uint8 tiles, labels); ``tests["test"]`` is the
    tile set's own test split. Ray resolves them from the object store."""
    import torch

    from histodiff_ray.config import config_from_dict
    from histodiff_ray.downstream import predict, step_budget, train_tile_classifier
    from histodiff_ray.metrics import classification_report

    torch.set_num_threads(1)
    (train_x, train_y), (val_x, val_y) = train, val
    cfg = config_from_dict(cfg_dict)
    k = len(classes)
    started, started_cpu = time.perf_counter(), time.process_time()
    model, history = train_tile_classifier(train_x, train_y, val_x, val_y, cfg.downstream, k, seed=seed,
                                           colour_augment=colour_augment, budget_tiles=budget_tiles)
    # Wall time depends on what else the machine runs; this process's CPU time (one torch thread,
    # val scoring included) much less so.
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    best = max(history, key=lambda r: r["val_macro_f1"])
    reports = {}
    for name, (test_x, test_y) in tests.items():
        probs, _ = predict(model, test_x)
        reports[name] = classification_report(test_y, probs.argmax(1), k, class_names=classes)
    _, steps_per_epoch = step_budget(cfg.downstream, budget_tiles)
    return {"arm": arm, "seed": seed, "best_epoch": best["epoch"], "val_macro_f1": best["val_macro_f1"],
            "train_tiles": int(len(train_y)), "steps": cfg.downstream.epochs * steps_per_epoch, "steps_run": history[-1]["step"],
            "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "history": history,
            "test": reports.pop("test"), "external": reports}


def evaluate(cfg: Config, tiles: str, output: str, *, synthetic: dict[str, str] | None = None, judge: str | None = None,
             tests: dict[str, str] | None = None, test_mpp: dict[str, float] | None = None) -> dict:
    """Train and score every arm × seed (see the module docstring); ``tests`` are external test sets
    (name → folder), ``test_mpp`` their microns per pixel where known (name → µm/px)."""
    import ray

    from histodiff_ray.raycluster import init_ray

    if "test" in (tests or {}):
        raise HistodiffError("--test: the name 'test' is the tile set's own test split; call the external set something else")
    unknown = sorted(set(test_mpp or {}) - set(tests or {}))
    if unknown:
        raise HistodiffError(f"--test-mpp names {', '.join(unknown)}, which no --test NAME=DIR gives")
    e = cfg.evaluate
    tiles_loc, out = open_location(tiles, cfg.storage), open_location(output, cfg.storage)
    manifest = require_manifest(tiles_loc)
    classes = manifest["classes"]
    splits = {}
    for split, labeled_only in (("train", True), ("val", False), ("test", False)):
        table = load_tile_table(tiles_loc, split, labeled_only=labeled_only)
        splits[split] = (decode_images(table.column("image")), table.column("label").to_numpy().astype(np.int64))
        if table.num_rows == 0:
            raise HistodiffError(f"evaluate: {tiles} has no {'labeled ' if labeled_only else ''}{split} tiles")
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits["train"], splits["val"], splits["test"]
    real_counts = np.bincount(train_y, minlength=len(classes))
    test_sets, external = {"test": (test_x, test_y)}, {}
    if tests:
        own_ids = set(pa.concat_tables([load_tile_table(tiles_loc, split, columns=["tile_id"]) for split in ("train", "val", "test")])
                      .column("tile_id").to_pylist())
    for name, uri in (tests or {}).items():
        x, y, external[name] = load_test_set(cfg, name, uri, classes, (test_mpp or {}).get(name), own_ids)
        test_sets[name] = (x, y)
    # arm → (tiles, labels, colour augmentation, the synthetic set's identity)
    arms = {"real": (train_x, train_y, False, None), "real+aug": (train_x, train_y, True, None)}
    synthetic_sets = {}
    for name, uri in (synthetic or {}).items():
        syn_x, syn_y = load_synthetic(cfg, uri, real_counts, e.synthetic_ratio)
        synthetic_sets[name] = (syn_x, syn_y)
        index_digest = _digest(read_bytes(open_location(uri, cfg.storage).join("index.parquet")))  # a re-selection changes it
        arms[f"real+aug+syn:{name}"] = (np.concatenate([train_x, syn_x]), np.concatenate([train_y, syn_y]), True, (uri, index_digest))

    # Each finished (arm, seed) is stored under a key of everything it depends on, so a rerun after
    # a kill trains only the missing ones.
    todo, runs = {}, []
    tiles_digest = _digest(json.dumps(manifest, sort_keys=True).encode())
    for arm in arms:
        for seed in range(e.seeds):
            key = _digest(json.dumps({"tiles": tiles_digest, "arm": arm, "synthetic": arms[arm][3], "seed": seed,
                                      "ratio": e.synthetic_ratio, "downstream": cfg.to_dict()["downstream"],
                                      "external": {n: t["digest"] for n, t in external.items()}}, sort_keys=True).encode())
            stored = out.join("runs", f"{key}.json")
            if exists(stored):
                runs.append(json.loads(read_bytes(stored)))
            else:
                todo[(arm, seed)] = stored
    if runs:
        print(f"[evaluate] {len(runs)} of {len(runs) + len(todo)} runs finished before: reused", flush=True)
    if todo:
        init_ray(cfg)
        task = ray.remote(num_cpus=e.cpus_per_run)(_train_and_test)
        val_ref, tests_ref = ray.put((val_x, val_y)), ray.put(test_sets)
        refs = {}
        for arm, (x, y, colour, _) in arms.items():
            data = ray.put((x, y))
            for seed in range(e.seeds):
                if (arm, seed) in todo:
                    refs[task.remote(cfg.to_dict(), arm, seed, data, val_ref, tests_ref, colour, len(train_y), classes)] = todo[(arm, seed)]
        runs += _gather(refs)
    runs.sort(key=lambda r: (r["arm"], r["seed"]))

    table = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        confusion = np.sum([r["test"]["confusion"] for r in mine], axis=0).tolist()
        table[arm] = {
            "train_tiles": mine[0]["train_tiles"], "steps": mine[0]["steps"],
            **{m: _unit_ci([r["test"][m] for r in mine]) for m in ("accuracy", "balanced_accuracy", "macro_f1")},
            "external": {name: {m: _unit_ci([r["external"][name][m] for r in mine]) for m in ("accuracy", "balanced_accuracy", "macro_f1")}
                         for name in external},
            "val_macro_f1": _unit_ci([r["val_macro_f1"] for r in mine]),
            "per_class_recall": {c: float(np.mean([r["test"]["per_class_recall"][c] for r in mine
                                                   if r["test"]["per_class_recall"][c] is not None] or [np.nan]))
                                 for c in mine[0]["test"]["per_class_recall"]},
            "confusion": confusion,
        }
    result = {"tiles": tiles_loc.uri, "classes": classes, "seeds": e.seeds, "synthetic": synthetic or {},
              "synthetic_ratio": e.synthetic_ratio, "downstream": cfg.to_dict()["downstream"], "arms": table,
              "runs": runs, "external_tests": external,
              "test_tiles": int(len(test_y)), "val_tiles": int(len(val_y)), "real_train_tiles": int(len(train_y))}
    if judge and synthetic_sets:
        result["generation"] = generation_metrics(cfg, judge, synthetic_sets, val_x, val_y, classes)
    write_atomic(out.join("evaluation.json"), json.dumps(result, indent=1, sort_keys=True, default=_jsonable).encode())
    write_atomic(out.join("table.md"), results_table(result).encode())
    return result


def _unit_ci(values: list[float]) -> dict:
    """mean_ci for a score in [0, 1]: the t-interval, clipped to [0, 1] (with few seeds it can
    reach past the bounds)."""
    from histodiff_ray.metrics import mean_ci

    ci = mean_ci(values)
    if ci["ci_low"] is not None:
        ci["ci_low"], ci["ci_high"] = max(0.0, ci["ci_low"]), min(1.0, ci["ci_high"])
    return ci


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _gather(refs: dict) -> list[dict]:
    """Results of the task refs as they finish, each stored at once at its location (``refs`` maps
    ref → location)."""
    import ray
    from tqdm import tqdm

    results, pending = [], list(refs)
    with tqdm(total=len(refs), desc="evaluate", unit="run") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            result = ray.get(done[0])
            write_atomic(refs[done[0]], json.dumps(result, sort_keys=True, default=_jsonable).encode())
            results.append(result)
            bar.update(1)
    return results


def generation_metrics(cfg: Config, judge: str, synthetic_sets: dict, val_x: np.ndarray, val_y: np.ndarray, classes: list[str]) -> dict:
    """FID, KID and precision/recall of each synthetic set against the real val tiles, per class and
    overall, on the judge's penultimate features."""
    from histodiff_ray.downstream import predict
    from histodiff_ray.judge import load_judge
    from histodiff_ray.metrics import fid, kid, precision_recall

    model, config, _ = load_judge(judge, cfg.storage)
    _, real = predict(model, val_x)
    out = {"features": f"penultimate layer of the judge at {judge} ({config['architecture']}, trained here on the real labeled tiles)"}
    for name, (syn_x, syn_y) in synthetic_sets.items():
        _, fake = predict(model, syn_x)
        per = {}
        for c, cname in [(None, "all")] + list(enumerate(classes)):
            r = real if c is None else real[val_y == c]
            f = fake if c is None else fake[syn_y == c]
            if len(f) < 2 or len(r) < 2:
                per[cname] = {"n_real": int(len(r)), "n_synthetic": int(len(f))}
                continue
            kid_mean, kid_sd = kid(r, f, subset_size=min(len(r), len(f), 100))
            precision, recall = precision_recall(r, f, k=min(3, len(f) - 1, len(r) - 1))
            per[cname] = {"fid": float(fid(r, f)), "kid": float(kid_mean), "kid_sd": float(kid_sd), "precision": float(precision),
                          "recall": float(recall), "n_real": int(len(r)), "n_synthetic": int(len(f))}
        out[name] = per
    return out


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _fmt(ci: dict) -> str:
    if ci["ci_low"] is None:
        return f"{ci['mean']:.3f}"
    return f"{ci['mean']:.3f} ± {ci['sd']:.3f} [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"


def results_table(result: dict) -> str:
    """The accuracy table as Markdown: mean ± sd [95% CI] over seeds, on the test split and on each
    external test set."""
    external = list(result.get("external_tests", {}))
    lines = [f"Test split: {result['test_tiles']} tiles; {result['seeds']} seeds per arm; real labeled train tiles: "
             f"{result['real_train_tiles']}; synthetic ratio {result['synthetic_ratio']}."]
    lines += [f"External test set {name}: {t['tiles']} tiles from {t['uri']}." for name, t in result.get("external_tests", {}).items()]
    lines += ["", "| arm | train tiles | steps | accuracy | balanced accuracy | macro-F1 | val macro-F1 |"
              + "".join(f" {name} accuracy |" for name in external),
              "|---|---|---|---|---|---|---|" + "---|" * len(external)]
    for arm, row in result["arms"].items():
        lines.append(f"| {arm} | {row['train_tiles']} | {row['steps']} | {_fmt(row['accuracy'])} | {_fmt(row['balanced_accuracy'])} | "
                     f"{_fmt(row['macro_f1'])} | {_fmt(row['val_macro_f1'])} |"
                     + "".join(f" {_fmt(row['external'][name]['accuracy'])} |" for name in external))
    return "\n".join(lines) + "\n"
