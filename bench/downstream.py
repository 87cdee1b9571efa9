"""Downstream benchmark: wall time of one downstream run (crc5, 5 % labels, one seed) on 2 threads.

Run from the repository root (crc5 is read from ../shared/data and ingested into a temporary folder,
never copied here)::

    .venv/bin/python bench/downstream.py --json /tmp/bench-downstream.json          # ~8 min
    .venv/bin/python bench/downstream.py --tiles ~/hd/tiles/crc5 --json /tmp/b.json  # an ingested crc5 at 5 %

Two variants of the cpu profile's downstream recipe train in this process, one after the other,
from the same seed on the same tiles, with ``torch.set_num_threads(2)``:

    baseline  val scored after every epoch (``downstream.val_every=1``, the recipe before)
    ours      the cpu profile (``downstream.val_every`` as configured)

Reported per variant: training wall and CPU seconds (the issue's budget: ≤ 3 minutes on 2 cores),
the optimizer steps, val accuracy of the chosen epoch, then the test split's accuracy with and
without test-time augmentation and the seconds each scoring took. The ratio baseline/ours of the
training wall time is the speed-up. Results and the reading of them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "crc5" / "train"


def load_splits(cfg, tiles: str):
    from histodiff_ray.data.tiles import decode_images, load_tile_table
    from histodiff_ray.storage import open_location

    loc = open_location(tiles, cfg.storage)
    out = []
    for split, labeled_only in (("train", True), ("val", False), ("test", False)):
        table = load_tile_table(loc, split, labeled_only=labeled_only)
        out.append((decode_images(table.column("image")), table.column("label").to_numpy().astype(np.int64)))
    return out


def run_variant(cfg, splits, seed: int) -> dict:
    from histodiff_ray.downstream import predict, train_tile_classifier

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = splits
    wall, cpu = time.perf_counter(), time.process_time()
    model, history = train_tile_classifier(train_x, train_y, val_x, val_y, cfg.downstream, 5, seed=seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    chosen = max(history, key=lambda r: r["val_macro_f1"])
    row = {
        "val_every": cfg.downstream.val_every,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "steps": history[-1]["step"],
        "val_scores": len(history),
        "chosen_epoch": chosen["epoch"],
        "val_acc": chosen["val_acc"],
    }
    for tta in (False, True):
        started = time.perf_counter()
        probs, _ = predict(model, test_x, tta=tta)
        name = "test_tta" if tta else "test"
        row[f"{name}_acc"], row[f"{name}_scoring_s"] = (
            float((probs.argmax(1) == test_y).mean()),
            round(time.perf_counter() - started, 1),
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tiles", default=None, help="an ingested crc5 tile set at data.label_fraction=0.05 (default: ingest one)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from histodiff_ray.config import load_config

    torch.set_num_threads(2)
    cfg = load_config("cpu", ["data.label_fraction=0.05"])
    with tempfile.TemporaryDirectory() as tmp:
        tiles = args.tiles
        if tiles is None:
            from histodiff_ray.data.ingest import ingest

            tiles = f"{tmp}/crc5"
            ingest(cfg, [str(DEFAULT_DATA)], tiles, labeled=True, progress=False)
        splits = load_splits(cfg, tiles)
    results = {
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "labeled_tiles": int(len(splits[0][1])),
        "val_tiles": int(len(splits[1][1])),
        "test_tiles": int(len(splits[2][1])),
    }
    baseline = load_config("cpu", ["downstream.val_every=1"])
    results["baseline"] = run_variant(baseline, splits, args.seed)
    results["ours"] = run_variant(cfg, splits, args.seed)
    results["speedup_train_wall"] = round(results["baseline"]["train_wall_s"] / results["ours"]["train_wall_s"], 2)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
