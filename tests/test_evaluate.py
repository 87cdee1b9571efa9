"""`histodiff evaluate` on the tiny tile set and synthetic set: arms × seeds as Ray tasks, metrics
with confidence intervals, generation metrics on the judge's features."""

import io
import json

from histodiff_ray.config import load_config
from histodiff_ray.storage import open_location, read_bytes


def test_evaluate_reports_every_arm_with_intervals_and_generation_metrics(tiny_models, tiny_evaluation):
    cfg = load_config("cpu", tiny_models["overrides"])
    out, result = tiny_evaluation
    assert set(result["arms"]) == {"real", "real+aug", "real+aug+syn:tiny"}
    real_n = result["real_train_tiles"]
    assert result["arms"]["real"]["train_tiles"] == real_n and result["arms"]["real+aug+syn:tiny"]["train_tiles"] > real_n
    for arm, row in result["arms"].items():
        for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
            ci = row[metric]
            assert ci["n"] == 2 and 0 <= ci["mean"] <= 1 and ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
        assert list(row["per_class_recall"]) == result["classes"]
        # The confusion matrix is summed over seeds: every test tile once per seed.
        assert sum(map(sum, row["confusion"])) == 2 * result["test_tiles"]
    runs = result["runs"]
    assert len(runs) == 6 and all(r["best_epoch"] >= 1 and r["history"] for r in runs)
    # Model selection reads val only: the kept epoch is the one with the best val macro-F1.
    for r in runs:
        assert r["val_macro_f1"] == max(h["val_macro_f1"] for h in r["history"])
        assert all("test" not in key for h in r["history"] for key in h)
    gen = result["generation"]["tiny"]["all"]
    assert gen["n_synthetic"] > 0 and gen["fid"] >= 0 and 0 <= gen["precision"] <= 1 and 0 <= gen["recall"] <= 1
    assert "judge" in result["generation"]["features"]
    loc = open_location(out, cfg.storage)
    assert json.loads(read_bytes(loc.join("evaluation.json")))["arms"].keys() == result["arms"].keys()
    assert "| real+aug+syn:tiny |" in read_bytes(loc.join("table.md")).decode()


def test_load_synthetic_takes_kept_tiles_per_class_in_proportion(tiny_models, tiny_synthetic):
    import numpy as np
    import pyarrow.parquet as pq

    from histodiff_ray.config import SelectionConfig
    from histodiff_ray.evaluate import load_synthetic

    cfg = load_config("cpu", tiny_models["overrides"])
    x, y = load_synthetic(cfg, tiny_synthetic, np.array([4, 2]), ratio=0.5)
    index = pq.read_table(io.BytesIO(read_bytes(open_location(f"{tiny_synthetic}/index.parquet", cfg.storage))))
    kept = [l for l, k in zip(index.column("label").to_pylist(), index.column("kept").to_pylist()) if k]
    assert list(y) == sorted(y) and (y == 0).sum() == min(2, kept.count(0)) and (y == 1).sum() == min(1, kept.count(1))
    assert x.shape[1:] == (64, 64, 3) and x.dtype == np.uint8
    # Re-applying selection in memory: no confidence bar and no cap keeps every centroid-agreeing tile.
    x_all, y_all = load_synthetic(cfg, tiny_synthetic, np.array([100, 100]), 1.0,
                                  selection=SelectionConfig(confidence_threshold=0.0, max_per_class=1000))
    assert len(y_all) >= len(kept)


def test_a_rerun_reuses_finished_runs_and_trains_only_the_missing_ones(tiny_models, tiny_evaluation, capsys):
    from histodiff_ray.evaluate import _jsonable, evaluate
    from histodiff_ray.storage import list_files

    cfg = load_config("cpu", tiny_models["overrides"] + ["evaluate.seeds=2", "evaluate.cpus_per_run=0.5"])
    out, first = tiny_evaluation
    runs = open_location(out, cfg.storage).join("runs")
    stored = list_files(runs)
    assert len(stored) == 6
    lost = json.loads(read_bytes(runs.join(stored[0])))
    runs.filesystem.delete_file(runs.join(stored[0]).path)  # as if the job had been killed before that run finished

    capsys.readouterr()
    again = evaluate(cfg, tiny_models["args"]["tiles"], out, synthetic={"tiny": first["synthetic"]["tiny"]},
                     judge=tiny_models["args"]["judge"])
    assert "[evaluate] 5 of 6 runs finished before: reused" in capsys.readouterr().out
    assert sorted(list_files(runs)) == sorted(stored)
    key = (lost["arm"], lost["seed"])
    assert [(r["arm"], r["seed"]) for r in again["runs"]] == [(r["arm"], r["seed"]) for r in first["runs"]]
    for old, new in zip(first["runs"], again["runs"]):
        if (old["arm"], old["seed"]) != key:
            assert json.loads(json.dumps(old, default=_jsonable)) == new
