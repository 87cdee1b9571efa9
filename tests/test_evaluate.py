"""`histodiff evaluate` on the tiny tile set and synthetic set: arms × seeds as Ray tasks on one
step budget, metrics with confidence intervals on the test split and an external test set,
generation metrics on the judge's features."""

import io
import json

import pytest

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
    # One optimizer-step budget for every arm, set by the real labeled tiles: the synthetic arm's extra
    # tiles buy no extra steps.
    assert len({r["steps"] for r in runs}) == 1 and {row["steps"] for row in result["arms"].values()} == {runs[0]["steps"]}
    assert runs[0]["steps"] == cfg.downstream.epochs * -(-real_n // cfg.downstream.batch_size)
    assert all(r["steps_run"] <= r["steps"] for r in runs)
    # The external test set: one tile per readable image, the truncated one quarantined, the tile
    # also in the tile set counted, every model scored on it.
    heldout = result["external_tests"]["heldout"]
    assert heldout["tiles"] == 11 and heldout["per_class"] == {"AC": 6, "H": 5} and heldout["in_tile_set"] == 1
    assert [q["path"].rsplit("/", 1)[-1] for q in heldout["quarantined"]] == ["truncated.jpg"]
    for r in runs:
        assert sum(map(sum, r["external"]["heldout"]["confusion"])) == 11
    for row in result["arms"].values():
        assert row["external"]["heldout"]["accuracy"]["n"] == 2
    # Model selection reads val only: the kept epoch is the one with the best val macro-F1.
    for r in runs:
        assert r["val_macro_f1"] == max(h["val_macro_f1"] for h in r["history"])
        assert all("test" not in key for h in r["history"] for key in h)
    gen = result["generation"]["tiny"]["all"]
    assert gen["n_synthetic"] > 0 and gen["fid"] >= 0 and 0 <= gen["precision"] <= 1 and 0 <= gen["recall"] <= 1
    assert "judge" in result["generation"]["features"]
    loc = open_location(out, cfg.storage)
    assert json.loads(read_bytes(loc.join("evaluation.json")))["arms"].keys() == result["arms"].keys()
    table = read_bytes(loc.join("table.md")).decode()
    assert "| real+aug+syn:tiny |" in table and "heldout accuracy |" in table and "External test set heldout: 11 tiles" in table


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


def test_a_rerun_reuses_finished_runs_and_trains_only_the_missing_ones(tiny_models, tiny_evaluation, external_test_set, capsys):
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
                     judge=tiny_models["args"]["judge"], tests={"heldout": str(external_test_set)})
    assert "[evaluate] 5 of 6 runs finished before: reused" in capsys.readouterr().out
    assert sorted(list_files(runs)) == sorted(stored)
    key = (lost["arm"], lost["seed"])
    assert [(r["arm"], r["seed"]) for r in again["runs"]] == [(r["arm"], r["seed"]) for r in first["runs"]]
    for old, new in zip(first["runs"], again["runs"]):
        if (old["arm"], old["seed"]) != key:
            assert json.loads(json.dumps(old, default=_jsonable)) == new


@pytest.mark.parametrize("layout, message", [
    ({"AC": 2, "T": 2, "X": 1}, "its classes do not match the training classes: extra T, X; missing H"),
    ({}, "no images in class folders; lay it out as <CLASS>/<image> with CLASS one of ['AC', 'H']"),
    ({"AC": 1, "H": 0}, "missing H"),
])
def test_an_external_test_set_with_other_classes_or_no_images_fails_in_one_line(tiny_models, tmp_path, shared_data, layout, message):
    from histodiff_ray.errors import HistodiffError
    from histodiff_ray.evaluate import evaluate

    cfg = load_config("cpu", tiny_models["overrides"])
    src = shared_data / "crc5" / "train" / "AC" / "train_image_AC_0.jpg"
    for cls, n in layout.items():
        (tmp_path / "ext" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "ext" / cls / f"{i}.jpg").write_bytes(src.read_bytes())
    (tmp_path / "ext").mkdir(exist_ok=True)
    with pytest.raises(HistodiffError) as err:
        evaluate(cfg, tiny_models["args"]["tiles"], str(tmp_path / "out"), tests={"ext": str(tmp_path / "ext")})
    assert message in str(err.value) and f"--test ext={tmp_path / 'ext'}" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_an_unreadable_external_test_set_names_itself(tiny_models, tmp_path):
    from histodiff_ray.errors import HistodiffError
    from histodiff_ray.evaluate import evaluate

    cfg = load_config("cpu", tiny_models["overrides"])
    (tmp_path / "ext" / "AC").mkdir(parents=True)
    (tmp_path / "ext" / "AC" / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "ext" / "H").mkdir()
    (tmp_path / "ext" / "H" / "b.png").write_bytes(b"not a png either")
    with pytest.raises(HistodiffError, match=r"--test ext=.*: none of its 2 images could be read"):
        evaluate(cfg, tiny_models["args"]["tiles"], str(tmp_path / "out"), tests={"ext": str(tmp_path / "ext")})
    with pytest.raises(HistodiffError, match=r"--test gone=.*does not exist"):
        evaluate(cfg, tiny_models["args"]["tiles"], str(tmp_path / "out"), tests={"gone": str(tmp_path / "nowhere")})
