"""`histodiff evaluate`: does the synthetic data make a better classifier, and by how much?

    histodiff evaluate --config cpu --tiles tiles/crc5 --synthetic pretrained=synthetic/crc5 \\
        --synthetic scratch=synthetic/crc5-no-pretraining --judge runs/judge --output eval/crc5

Arms, each trained for ``evaluate.seeds`` seeds with the same downstream model and the same
budget of optimizer steps (``downstream.epochs`` passes over the *real* labeled tiles: an arm with
more tiles gets no more steps than the real one):

* ``real``: the real labeled train tiles with rotations and flips only (tissue has no orientation);
* ``real+aug``: the same plus HED stain jitter (and colour jitter where configured);
* ``pseudo-label``: self-training, the cheapest other use of the unlabeled target tiles: a
  real+aug *teacher* labels the train tiles that have no label at this fraction (the tiles the
  generator's judge pseudo-labels too), keeps those it gives ≥ ``evaluate.pseudo_label_threshold``,
  and a real+aug *student* trains on labeled + pseudo-labeled tiles (the teacher's steps are extra
  compute, reported beside);
* per synthetic set NAME (``evaluate.synthetic_uses``): ``real+aug+syn:NAME`` mixes its kept tiles
  into real+aug, ``evaluate.synthetic_ratio`` × the real count per class in proportion to the real
  tiles; ``syn-first:NAME`` trains on those synthetic tiles for the first half of the budget, then on
  the real ones (real+aug) for the second half.

``evaluate.label_fractions`` repeats every arm on nested subsets of the train labels (the
label-efficiency curve): at fraction f each class keeps ceil(f × its train groups) of its labeled
groups, the first in ingest's own seeded label order, so the 1 % tiles lie inside the 5 % and all
inside the tile set's own labels (a tile set ingested at ``data.label_fraction=1.0`` gives every
fraction). A synthetic set is evaluated at the one fraction whose labels its generator used: those
of the tile set it was generated from (its ``plan.json``), checked tile by tile against the subset.

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

import dataclasses
import hashlib
import io
import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from tqdm import tqdm

from histodiff_ray.config import Config, SelectionConfig, config_from_dict
from histodiff_ray.console import logger
from histodiff_ray.data.ingest import TileOptions, labeled_at_fraction, plan_sources, process_files
from histodiff_ray.data.synthetic import SCORE_COLUMNS, decide_rows, load_shards, read_tile_images
from histodiff_ray.data.tiles import decode_images, load_tile_table, require_manifest
from histodiff_ray.downstream import predict, step_budget, train_tile_classifier
from histodiff_ray.errors import HistodiffError
from histodiff_ray.judge import load_judge, read_judge_config
from histodiff_ray.metrics import classification_report, fid, kid, mean_ci, precision_recall
from histodiff_ray.raycluster import init_ray
from histodiff_ray.storage import StorageError, check_access, exists, open_location, read_bytes, write_atomic

log = logger(__name__)


def load_synthetic(
    cfg: Config, uri: str, real_counts: np.ndarray, ratio: float, selection: SelectionConfig | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Kept synthetic tiles of a generate output: per class round(ratio × real count), in tile
    order. With ``selection``, the rules are re-applied to the stored scores in memory (a sweep
    trying thresholds) instead of reading the output's index."""
    out = open_location(uri, cfg.storage)
    if selection is not None:
        index = load_shards(out, ["tile_id", "shard", "index", *SCORE_COLUMNS])
        kept, _ = decide_rows(index, selection)
        index = index.append_column("kept", pa.array(kept))
    else:
        try:
            index = pq.read_table(
                io.BytesIO(read_bytes(out.join("index.parquet"))),
                columns=["tile_id", "label", "shard", "kept", "index"],
            )
        except FileNotFoundError:
            raise HistodiffError(
                f"{uri} holds no finished synthetic set (index.parquet is missing); run `histodiff generate` first"
            ) from None
    rows = index.filter(index.column("kept")).sort_by([("label", "ascending"), ("index", "ascending")]).to_pylist()
    wanted = {c: int(round(ratio * n)) for c, n in enumerate(real_counts)}
    chosen = []
    for row in rows:
        if wanted.get(row["label"], 0) > 0:
            chosen.append(row)
            wanted[row["label"]] -= 1

    images = read_tile_images(out, [r["tile_id"] for r in chosen], [r["shard"] for r in chosen])
    labels = [r["label"] for r in chosen]
    short = {c: n for c, n in wanted.items() if n > 0}
    if short:
        names = json.loads(read_bytes(out.join("plan.json")))["classes"]
        missing = ", ".join(f"{names[c]} {n}" for c, n in short.items())
        log.info(
            f"[evaluate] {uri}: fewer kept tiles than synthetic_ratio × real asks for (missing: {missing}); "
            "using all there are"
        )
    return (
        decode_images(images) if images else np.zeros((0, cfg.data.tile_size, cfg.data.tile_size, 3), np.uint8),
        np.asarray(labels, np.int64),
    )


def load_test_set(
    cfg: Config, name: str, uri: str, classes: list[str], mpp: float | None = None, known_ids: set[str] = frozenset()
) -> tuple[np.ndarray, np.ndarray, dict]:
    """An external test set at ``uri``: ``<CLASS>/<image>`` folders named like the training classes,
    each image made into one tile by ingest's own code (the same decoding checks, µm/px resampling
    from ``mpp`` and tile size). Returns (uint8 tiles, labels, a summary listing quarantined files).
    ``known_ids`` are the tile set's own tile ids: pixel-identical tiles (content-hash ids) are
    counted as ``in_tile_set`` (a held-out set should have none). Read once per evaluation, in the
    driver; never used for training or any choice."""

    where = f"--test {name}={uri}"
    loc = open_location(uri, cfg.storage)
    try:
        check_access(loc, "read")
        work, quarantined = plan_sources(loc, labeled=True, source_name=name)
    except StorageError as exc:
        raise HistodiffError(f"{where}: {exc}") from None
    found = {f.label_name for f in work}
    if not found:
        raise HistodiffError(
            f"{where}: no images in class folders; lay it out as <CLASS>/<image> with CLASS one of {classes}"
        )
    extra, missing = sorted(found - set(classes)), sorted(set(classes) - found)
    if extra or missing:
        raise HistodiffError(
            f"{where}: its classes do not match the training classes: extra {', '.join(extra) or 'none'}; "
            f"missing {', '.join(missing) or 'none'}"
        )
    opts = TileOptions(
        True, cfg.data.tile_size, cfg.data.microns_per_pixel, mpp, cfg.data.tissue_fraction, cfg.data.max_image_pixels
    )
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
        raise HistodiffError(
            f"{where}: none of its {len(work)} images could be read ({undecodable[0]['reason']}: "
            f"{undecodable[0]['path']})"
        )
    quarantined += undecodable
    if quarantined:
        log.info(
            f"[evaluate] {where}: {len(quarantined)} files quarantined, e.g. {quarantined[0]['path']}: "
            f"{quarantined[0]['reason']}"
        )
    y = np.asarray(labels, np.int64)
    summary = {
        "uri": uri,
        "tiles": len(tiles),
        "per_class": {c: int((y == k).sum()) for k, c in enumerate(classes)},
        "mpp": mpp,
        "quarantined": quarantined,
        "digest": _digest(json.dumps([ids, labels]).encode()),
        "in_tile_set": sum(1 for i in ids if i in known_ids),
    }
    if summary["in_tile_set"]:
        log.info(f"[evaluate] {where}: {summary['in_tile_set']} of its tiles are also in the tile set")
    return decode_images(tiles), y, summary


def _train_and_test(
    cfg_dict: dict,
    arm: str,
    use: str,
    seed: int,
    train: tuple,
    extra,
    val: tuple,
    tests: dict,
    budget_tiles: int,
    classes: list[str],
) -> dict:
    """One (arm, seed): train, choosing the epoch on val, then read each test set once. ``use`` is
    how the arm trains: ``real`` (rotations and flips only), ``aug`` (+ stain jitter),
    ``pseudo-label`` (``extra``: the unlabeled tiles) or ``first`` (``extra``: synthetic (tiles,
    labels), trained on before the real ones). ``train``, ``val`` and each of ``tests`` (name → ...)
    are (uint8 tiles, labels); ``tests["test"]`` is the tile set's own test split. Ray resolves them
    from the object store."""

    torch.set_num_threads(1)
    (train_x, train_y), (val_x, val_y) = train, val
    cfg = config_from_dict(cfg_dict)
    k, d = len(classes), cfg.downstream
    started, started_cpu = time.perf_counter(), time.process_time()

    def fit(x, y, downstream=d, init=None):
        return train_tile_classifier(
            x,
            y,
            val_x,
            val_y,
            downstream,
            k,
            seed=seed,
            colour_augment=use != "real",
            budget_tiles=budget_tiles,
            init=init,
        )

    info = {}
    if use == "pseudo-label":
        teacher, teacher_history = fit(train_x, train_y)
        probs, _ = predict(teacher, extra)
        sure = probs.max(1) >= cfg.evaluate.pseudo_label_threshold
        guessed = probs.argmax(1)[sure]
        info = {
            "teacher_steps": teacher_history[-1]["step"],
            "unlabeled_tiles": int(len(extra)),
            "pseudo_labeled": {c: int((guessed == i).sum()) for i, c in enumerate(classes)},
        }
        model, history = fit(np.concatenate([train_x, extra[sure]]), np.concatenate([train_y, guessed]))
    elif use == "first":
        # Half the budget on synthetic tiles, then, from that phase's best epoch on val, a fresh
        # one-cycle over the other half on the real ones (evaluate checks downstream.epochs >= 2).
        synthetic_epochs = d.epochs // 2
        first, first_history = fit(*extra, downstream=dataclasses.replace(d, epochs=synthetic_epochs))
        model, history = fit(
            train_x, train_y, downstream=dataclasses.replace(d, epochs=d.epochs - synthetic_epochs), init=first
        )
        last = first_history[-1]
        history = [{**r, "phase": "synthetic"} for r in first_history] + [
            {**r, "phase": "real", "epoch": r["epoch"] + last["epoch"], "step": r["step"] + last["step"]}
            for r in history
        ]
    else:
        model, history = fit(train_x, train_y)
    # Wall time depends on what else the machine runs; this process's CPU time (one torch thread,
    # val scoring included) much less so.
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    chosen = max(
        (r for r in history if "val_macro_f1" in r and r.get("phase", "real") == "real"),
        key=lambda r: r["val_macro_f1"],
    )
    reports = {}
    for name, (test_x, test_y) in tests.items():
        probs, _ = predict(model, test_x, tta=d.tta)
        reports[name] = classification_report(test_y, probs.argmax(1), k, class_names=classes)
    _, steps_per_epoch = step_budget(d, budget_tiles)
    return {
        "arm": arm,
        "use": use,
        "seed": seed,
        "best_epoch": chosen["epoch"],
        "val_macro_f1": chosen["val_macro_f1"],
        "train_tiles": int(len(train_y)),
        "steps": d.epochs * steps_per_epoch,
        "steps_run": history[-1]["step"],
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "history": history,
        **info,
        "test": reports.pop("test"),
        "external": reports,
    }


def label_subsets(
    manifest: dict, fractions: list[float], labeled: np.ndarray, labels: np.ndarray, groups: list[str], where: str
) -> dict[float, np.ndarray]:
    """fraction → mask over the train tiles whose labels may be used at that fraction (nested; see
    the module docstring). ``labeled``, ``labels`` and ``groups`` are the train tiles' columns."""

    own = manifest["label_fraction"]
    beyond = [f for f in fractions if f > own]
    if beyond:
        raise HistodiffError(
            f"evaluate.label_fractions {beyond}: {where} was ingested with data.label_fraction={own}, so no more "
            f"of its train labels may be used; ingest the same inputs with data.label_fraction=1.0 into a new "
            f"--output for a label-efficiency curve"
        )
    train_groups = {g: int(y) for g, y in zip(groups, labels)}
    labeled_groups = {g for g, mark in zip(groups, labeled) if mark}
    subsets = {}
    for f in fractions:
        keep = (
            labeled_at_fraction(train_groups, labeled_groups, f, manifest["split_seed"]) if f < own else labeled_groups
        )
        subsets[f] = labeled & np.fromiter((g in keep for g in groups), bool, len(groups))
    return subsets


def synthetic_fraction(
    cfg: Config,
    name: str,
    uri: str,
    tiles_uri: str,
    own_fraction: float,
    train_ids: np.ndarray,
    subsets: dict[float, np.ndarray],
) -> float:
    """The label fraction a synthetic set belongs to: that of the tile set it was generated from
    (``generate --tiles``, which its judge must have trained on), which must be one of ``subsets``
    with the very same labeled train tiles. (The guide's latents are not traced back here.)"""

    try:
        plan = json.loads(read_bytes(open_location(uri, cfg.storage).join("plan.json")))
    except FileNotFoundError:
        raise HistodiffError(
            f"--synthetic {name}={uri} holds no synthetic set (plan.json is missing); run `histodiff generate` first"
        ) from None
    source = plan["sources"]["tiles"]
    try:
        judge_tiles = read_judge_config(plan["sources"]["judge"], cfg.storage).get("judge", {}).get("tiles")
    except HistodiffError:  # the judge was moved or deleted since: nothing to check against
        judge_tiles = None
    if judge_tiles not in (None, source):
        raise HistodiffError(
            f"--synthetic {name}={uri}: its judge ({plan['sources']['judge']}) was trained on {judge_tiles}, its "
            f"generate run read {source}; train the judge on the tile set the set is generated from"
        )
    if source == tiles_uri:
        fraction, ids = own_fraction, None
    else:
        source_loc = open_location(source, cfg.storage)
        fraction = require_manifest(source_loc)["label_fraction"]
        ids = set(
            load_tile_table(source_loc, "train", labeled_only=True, columns=["tile_id"]).column("tile_id").to_pylist()
        )
    match = [f for f in subsets if math.isclose(f, fraction)]
    if not match:
        raise HistodiffError(
            f"--synthetic {name}={uri} was generated from {source}, labeled at data.label_fraction={fraction}: "
            f"add {fraction} to evaluate.label_fractions (now {sorted(subsets)})"
        )
    if ids is not None and ids != set(train_ids[subsets[match[0]]].tolist()):
        raise HistodiffError(
            f"--synthetic {name}={uri}: the labeled train tiles of {source}, which its generator used, are not "
            f"the ones this tile set keeps at fraction {fraction} (ingest picks labels batch by batch as files "
            f"arrive, so an ingest at {fraction} and a larger set's subset at {fraction} can differ by a few "
            f"tiles); evaluate it with --tiles {source}, whose labels its generator used"
        )
    return match[0]


def evaluate(
    cfg: Config,
    tiles: str,
    output: str,
    *,
    synthetic: dict[str, str] | None = None,
    judge: str | None = None,
    tests: dict[str, str] | None = None,
    test_mpp: dict[str, float] | None = None,
) -> dict:
    """Train and score every arm × seed (see the module docstring); ``tests`` are external test sets
    (name → folder), ``test_mpp`` their microns per pixel where known (name → µm/px)."""

    if "test" in (tests or {}):
        raise HistodiffError(
            "--test: the name 'test' is the tile set's own test split; call the external set something else"
        )
    unknown = sorted(set(test_mpp or {}) - set(tests or {}))
    if unknown:
        raise HistodiffError(f"--test-mpp names {', '.join(unknown)}, which no --test NAME=DIR gives")
    e = cfg.evaluate
    tiles_loc, out = open_location(tiles, cfg.storage), open_location(output, cfg.storage)
    manifest = require_manifest(tiles_loc)
    classes = manifest["classes"]
    train = load_tile_table(tiles_loc, "train", columns=["tile_id", "image", "label", "labeled", "dup_group"])
    splits = {}
    for split in ("val", "test"):
        table = load_tile_table(tiles_loc, split)
        if table.num_rows == 0:
            raise HistodiffError(f"evaluate: {tiles} has no {split} tiles")
        splits[split] = (decode_images(table.column("image")), table.column("label").to_numpy().astype(np.int64))
    (val_x, val_y), (test_x, test_y) = splits["val"], splits["test"]
    train_y, labeled = (
        train.column("label").to_numpy().astype(np.int64),
        train.column("labeled").to_numpy(zero_copy_only=False),
    )
    fractions = sorted(e.label_fractions) or [manifest["label_fraction"]]
    subsets = label_subsets(manifest, fractions, labeled, train_y, train.column("dup_group").to_pylist(), tiles)
    empty = [f for f, mask in subsets.items() if mask.sum() < 2]
    if empty:
        raise HistodiffError(
            f"evaluate: {tiles} has fewer than 2 labeled train tiles at label fraction(s) {empty}; "
            f"raise or drop them in evaluate.label_fractions"
        )
    train_x = decode_images(train.column("image"))
    train_ids = np.asarray(train.column("tile_id").to_pylist(), dtype=object)
    test_sets, external = {"test": (test_x, test_y)}, {}
    if tests:
        own_ids = set(
            pa.concat_tables(
                [load_tile_table(tiles_loc, split, columns=["tile_id"]) for split in ("train", "val", "test")]
            )
            .column("tile_id")
            .to_pylist()
        )
    for name, uri in (tests or {}).items():
        x, y, external[name] = load_test_set(cfg, name, uri, classes, (test_mpp or {}).get(name), own_ids)
        test_sets[name] = (x, y)

    # (fraction, arm) → (how it trains, real tiles, labels, extra data, the synthetic set's identity)
    arms = {}
    for f, mask in subsets.items():
        x, y = train_x[mask], train_y[mask]
        for arm in e.arms:
            use = {"real": "real", "real+aug": "aug"}.get(arm, arm)
            if arm == "pseudo-label" and mask.all():
                log.info(f"[evaluate] label fraction {f}: no unlabeled train tiles, so no pseudo-label arm")
                continue
            arms[(f, arm)] = (use, x, y, train_x[~mask] if arm == "pseudo-label" else None, None)
    synthetic_sets = {}
    for name, uri in (synthetic or {}).items():
        f = synthetic_fraction(cfg, name, uri, tiles_loc.uri, manifest["label_fraction"], train_ids, subsets)
        x, y = train_x[subsets[f]], train_y[subsets[f]]
        syn_x, syn_y = load_synthetic(cfg, uri, np.bincount(y, minlength=len(classes)), e.synthetic_ratio)
        synthetic_sets[name] = (syn_x, syn_y)
        identity = (
            uri,
            _digest(read_bytes(open_location(uri, cfg.storage).join("index.parquet"))),
        )  # a re-selection changes it
        if "mix" in e.synthetic_uses:
            arms[(f, f"real+aug+syn:{name}")] = (
                "aug",
                np.concatenate([x, syn_x]),
                np.concatenate([y, syn_y]),
                None,
                identity,
            )
        if "first" in e.synthetic_uses and (len(syn_y) < 2 or cfg.downstream.epochs < 2):
            log.info(
                f"[evaluate] {name}: no syn-first arm (it needs 2 kept synthetic tiles and downstream.epochs >= 2 to "
                "split "
                f"the budget; has {len(syn_y)} and {cfg.downstream.epochs})"
            )
        elif "first" in e.synthetic_uses:
            arms[(f, f"syn-first:{name}")] = ("first", x, y, (syn_x, syn_y), identity)

    if not arms:
        raise HistodiffError(
            "evaluate: no arms to train; list some in evaluate.arms (e.g. [real, real+aug]) or give --synthetic "
            "with evaluate.synthetic_uses"
        )
    # Each finished (arm, seed) is stored under a key of everything it depends on, so a rerun after
    # a kill trains only the missing ones.
    todo, runs = {}, []
    tiles_digest = _digest(json.dumps(manifest, sort_keys=True).encode())
    for (f, arm), (use, *_, identity) in arms.items():
        for seed in range(e.seeds):
            key = _digest(
                json.dumps(
                    {
                        "tiles": tiles_digest,
                        "fraction": f,
                        "arm": arm,
                        "synthetic": identity,
                        "seed": seed,
                        "ratio": e.synthetic_ratio,
                        "downstream": cfg.to_dict()["downstream"],
                        "pseudo": e.pseudo_label_threshold if use == "pseudo-label" else None,
                        "external": {n: t["digest"] for n, t in external.items()},
                    },
                    sort_keys=True,
                ).encode()
            )
            stored = out.join("runs", f"{key}.json")
            if exists(stored):
                runs.append(json.loads(read_bytes(stored)))
            else:
                todo[(f, arm, seed)] = stored
    if runs:
        log.info(f"[evaluate] {len(runs)} of {len(runs) + len(todo)} runs finished before: reused")
    if todo:
        init_ray(cfg)
        task = ray.remote(num_cpus=e.cpus_per_run, num_gpus=e.gpus_per_run)(_train_and_test)
        val_ref, tests_ref = ray.put((val_x, val_y)), ray.put(test_sets)
        refs, real_refs = {}, {}
        for (f, arm), (use, x, y, extra, identity) in arms.items():
            # The arms that train on the fraction's real tiles share one copy in the object store.
            if not (identity is None or use == "first"):
                data = ray.put((x, y))
            elif f in real_refs:
                data = real_refs[f]
            else:
                data = real_refs[f] = ray.put((x, y))
            extra_ref = ray.put(extra)
            budget = int(subsets[f].sum())
            for seed in range(e.seeds):
                if (f, arm, seed) in todo:
                    ref = task.options(name=f"evaluate {arm} @ {f:g} seed {seed}").remote(
                        cfg.to_dict(), arm, use, seed, data, extra_ref, val_ref, tests_ref, budget, classes
                    )
                    refs[ref] = (todo[(f, arm, seed)], {"label_fraction": f, "labeled_tiles": budget})
        runs += _gather(refs)
    runs.sort(key=lambda r: (r["label_fraction"], r["arm"], r["seed"]))

    table = {}
    for f, arm in arms:
        mine = [r for r in runs if r["arm"] == arm and math.isclose(r["label_fraction"], f)]
        confusion = np.sum([r["test"]["confusion"] for r in mine], axis=0).tolist()
        row = {
            "arm": arm,
            "label_fraction": f,
            "labeled_tiles": mine[0]["labeled_tiles"],
            "train_tiles": mine[0]["train_tiles"],
            "steps": mine[0]["steps"],
            **{m: _unit_ci([r["test"][m] for r in mine]) for m in ("accuracy", "balanced_accuracy", "macro_f1")},
            "external": {
                name: {
                    m: _unit_ci([r["external"][name][m] for r in mine])
                    for m in ("accuracy", "balanced_accuracy", "macro_f1")
                }
                for name in external
            },
            "val_macro_f1": _unit_ci([r["val_macro_f1"] for r in mine]),
            "per_class_recall": {
                c: float(
                    np.mean(
                        [r["test"]["per_class_recall"][c] for r in mine if r["test"]["per_class_recall"][c] is not None]
                        or [np.nan]
                    )
                )
                for c in mine[0]["test"]["per_class_recall"]
            },
            "confusion": confusion,
        }
        if "teacher_steps" in mine[0]:
            row["teacher_steps"] = mine[0]["teacher_steps"]
            row["pseudo_labeled"] = float(np.mean([sum(r["pseudo_labeled"].values()) for r in mine]))
        table[arm if len(subsets) == 1 else f"{arm}@{f:g}"] = row
    result = {
        "tiles": tiles_loc.uri,
        "classes": classes,
        "seeds": e.seeds,
        "synthetic": synthetic or {},
        "synthetic_ratio": e.synthetic_ratio,
        "label_fractions": fractions,
        "downstream": cfg.to_dict()["downstream"],
        "arms": table,
        "runs": runs,
        "external_tests": external,
        "test_tiles": int(len(test_y)),
        "val_tiles": int(len(val_y)),
        "real_train_tiles": int(subsets[max(subsets)].sum()),
    }
    if judge and synthetic_sets:
        result["generation"] = generation_metrics(cfg, judge, synthetic_sets, val_x, val_y, classes)
    write_atomic(out.join("evaluation.json"), json.dumps(result, indent=1, sort_keys=True, default=_jsonable).encode())
    write_atomic(out.join("table.md"), results_table(result).encode())
    return result


def _unit_ci(values: list[float]) -> dict:
    """mean_ci for a score in [0, 1]: the t-interval, clipped to [0, 1] (with few seeds it can
    reach past the bounds)."""

    ci = mean_ci(values)
    if ci["ci_low"] is not None:
        ci["ci_low"], ci["ci_high"] = max(0.0, ci["ci_low"]), min(1.0, ci["ci_high"])
    return ci


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _gather(refs: dict) -> list[dict]:
    """Results of the task refs as they finish, each stored at once at its location (``refs`` maps
    ref → (location, fields to add to the result))."""

    results, pending = [], list(refs)
    with tqdm(total=len(refs), desc="evaluate", unit="run") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            location, fields = refs[done[0]]
            result = {**ray.get(done[0]), **fields}
            write_atomic(location, json.dumps(result, sort_keys=True, default=_jsonable).encode())
            results.append(result)
            bar.update(1)
    return results


def generation_metrics(
    cfg: Config, judge: str, synthetic_sets: dict, val_x: np.ndarray, val_y: np.ndarray, classes: list[str]
) -> dict:
    """FID, KID and precision/recall of each synthetic set against the real val tiles, per class and
    overall, on the judge's penultimate features."""

    model, config, _ = load_judge(judge, cfg.storage)
    _, real = predict(model, val_x)
    out = {
        "features": f"penultimate layer of the judge at {judge} ({config['architecture']}, trained here on the real "
        "labeled tiles)"
    }
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
            per[cname] = {
                "fid": float(fid(r, f)),
                "kid": float(kid_mean),
                "kid_sd": float(kid_sd),
                "precision": float(precision),
                "recall": float(recall),
                "n_real": int(len(r)),
                "n_synthetic": int(len(f)),
            }
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
    external test set; one row per (label fraction, arm)."""
    external = list(result.get("external_tests", {}))
    lines = [
        f"Test split: {result['test_tiles']} tiles; {result['seeds']} seeds per arm; synthetic ratio "
        f"{result['synthetic_ratio']}. "
        "Steps: the optimizer steps of the scored model (every arm at one label fraction gets the same); "
        "a pseudo-label student's teacher trained the steps in brackets before it."
    ]
    lines += [
        f"External test set {name}: {t['tiles']} tiles from {t['uri']}."
        for name, t in result.get("external_tests", {}).items()
    ]
    lines += [
        "",
        "| labels | arm | train tiles | steps | accuracy | balanced accuracy | macro-F1 | val macro-F1 |"
        + "".join(f" {name} accuracy |" for name in external),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(external),
    ]
    for row in result["arms"].values():
        steps = f"{row['steps']}" + (f" (+{row['teacher_steps']})" if "teacher_steps" in row else "")
        tiles = f"{row['train_tiles']}" + (f" + {row['pseudo_labeled']:.0f} pseudo" if "pseudo_labeled" in row else "")
        lines.append(
            f"| {row['label_fraction']:g} ({row['labeled_tiles']}) | {row['arm']} | {tiles} | {steps} | "
            f"{_fmt(row['accuracy'])} | {_fmt(row['balanced_accuracy'])} | {_fmt(row['macro_f1'])} | "
            f"{_fmt(row['val_macro_f1'])} |"
            + "".join(f" {_fmt(row['external'][name]['accuracy'])} |" for name in external)
        )
    return "\n".join(lines) + "\n"
