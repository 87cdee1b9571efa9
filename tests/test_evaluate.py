"""`histodiff evaluate` on the tiny tile set and synthetic set: arms × seeds as Ray tasks on one
step budget, metrics with confidence intervals on the test split and an external test set,
generation metrics on the judge's features."""

import io
import json

import pytest

from histodiff_ray.config import load_config
from histodiff_ray.storage import open_location, read_bytes
from tests.conftest import EVALUATE


def test_evaluate_reports_every_arm_with_intervals_and_generation_metrics(tiny_models, tiny_evaluation):
    cfg = load_config("cpu", tiny_models["overrides"])
    out, result = tiny_evaluation
    # At 0.5 every label is kept out of half the train tiles, so self-training has unlabeled tiles to
    # label; at 1 there are none (no pseudo-label arm), and the synthetic set, generated with all the
    # tile set's labels, belongs there.
    assert set(result["arms"]) == {
        "real@0.5",
        "real+aug@0.5",
        "pseudo-label@0.5",
        "real@1",
        "real+aug@1",
        "real+aug+syn:tiny@1",
        "syn-first:tiny@1",
    }
    rows = result["arms"]
    half, full = rows["real@0.5"]["labeled_tiles"], rows["real@1"]["labeled_tiles"]
    assert full == result["real_train_tiles"] and 2 <= half < full
    assert rows["real+aug+syn:tiny@1"]["train_tiles"] > full and rows["syn-first:tiny@1"]["train_tiles"] == full
    assert rows["pseudo-label@0.5"]["train_tiles"] == half and rows["pseudo-label@0.5"]["teacher_steps"] > 0
    for row in rows.values():
        for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
            ci = row[metric]
            assert ci["n"] == 2 and 0 <= ci["mean"] <= 1 and ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
        assert list(row["per_class_recall"]) == result["classes"]
        # The confusion matrix is summed over seeds: every test tile once per seed.
        assert sum(map(sum, row["confusion"])) == 2 * result["test_tiles"]
    runs = result["runs"]
    assert len(runs) == 14 and all(r["best_epoch"] >= 1 and r["history"] for r in runs)
    # One optimizer-step budget for every arm at a label fraction, set by its real labeled tiles: extra
    # tiles (synthetic or pseudo-labeled) buy no extra steps.
    for fraction, labeled in ((0.5, half), (1.0, full)):
        mine = [r for r in runs if r["label_fraction"] == fraction]
        assert {r["steps"] for r in mine} == {cfg.downstream.epochs * -(-labeled // cfg.downstream.batch_size)}
        assert all(r["steps_run"] <= r["steps"] for r in mine)
    # Synthetic-first: half the budget on synthetic tiles, then the real ones; its epoch is chosen
    # among the real phase's.
    for r in (r for r in runs if r["arm"] == "syn-first:tiny"):
        phases = [h["phase"] for h in r["history"]]
        assert phases == sorted(phases, reverse=True) and set(phases) == {"synthetic", "real"}
        assert r["val_macro_f1"] == max(h["val_macro_f1"] for h in r["history"] if h["phase"] == "real")
    for r in (r for r in runs if r["arm"] == "pseudo-label"):
        assert (
            r["unlabeled_tiles"] == result["real_train_tiles"] - half
            and 0 <= sum(r["pseudo_labeled"].values()) <= r["unlabeled_tiles"]
        )
    # The external test set: one tile per readable image, the truncated one quarantined, the tile
    # also in the tile set counted, every model scored on it.
    heldout = result["external_tests"]["heldout"]
    assert heldout["tiles"] == 11 and heldout["per_class"] == {"AC": 6, "H": 5} and heldout["in_tile_set"] == 1
    assert [q["path"].rsplit("/", 1)[-1] for q in heldout["quarantined"]] == ["truncated.jpg"]
    for r in runs:
        assert sum(map(sum, r["external"]["heldout"]["confusion"])) == 11
    for row in rows.values():
        assert row["external"]["heldout"]["accuracy"]["n"] == 2
    # Model selection reads val only: the kept epoch is the one with the best val macro-F1.
    for r in runs:
        if r["arm"] != "syn-first:tiny":
            assert r["val_macro_f1"] == max(h["val_macro_f1"] for h in r["history"])
        assert all("test" not in key for h in r["history"] for key in h)
    gen = result["generation"]["tiny"]["all"]
    assert gen["n_synthetic"] > 0 and gen["fid"] >= 0 and 0 <= gen["precision"] <= 1 and 0 <= gen["recall"] <= 1
    assert "judge" in result["generation"]["features"]
    loc = open_location(out, cfg.storage)
    assert json.loads(read_bytes(loc.join("evaluation.json")))["arms"].keys() == rows.keys()
    table = read_bytes(loc.join("table.md")).decode()
    assert (
        f"| 1 ({full}) | real+aug+syn:tiny |" in table
        and "heldout accuracy |" in table
        and "External test set heldout: 11 tiles" in table
    )
    pseudo = rows["pseudo-label@0.5"]
    assert (
        f"| 0.5 ({half}) | pseudo-label | {half} + {pseudo['pseudo_labeled']:.0f} pseudo | {pseudo['steps']} "
        f"(+{pseudo['teacher_steps']}) |" in table
    )


def test_label_fractions_are_nested_inside_the_tile_sets_own_labels():
    import numpy as np

    from histodiff_ray.errors import HistodiffError
    from histodiff_ray.evaluate import label_subsets

    rng = np.random.default_rng(0)
    groups = [f"g{i}" for i in range(400)] + ["g0", "g1"]  # two groups of two tiles (rotated copies)
    labels = np.array([i % 3 for i in range(400)] + [0, 1])
    labeled = rng.random(402) < 0.6
    labeled[400:] = labeled[:2]  # a group's tiles share their mark
    manifest = {"label_fraction": 0.6, "split_seed": 0}
    fractions = [0.01, 0.05, 0.1, 0.6]
    subsets = label_subsets(manifest, fractions, labeled, labels, groups, "tiles/x")
    assert (subsets[0.6] == labeled).all()  # the tile set's own fraction: its own labels
    for small, large in zip(fractions, fractions[1:]):
        assert (subsets[small] <= subsets[large]).all()
    for f in fractions[:-1]:
        for c in range(3):
            chosen = {g for g, keep, y in zip(groups, subsets[f], labels) if keep and y == c}
            assert len(chosen) == int(np.ceil(sum(1 for i in range(400) if i % 3 == c) * f))
    with pytest.raises(
        HistodiffError, match=r"evaluate.label_fractions \[1.0\]: tiles/x was ingested with data.label_fraction=0.6"
    ):
        label_subsets(manifest, [0.1, 1.0], labeled, labels, groups, "tiles/x")


def test_load_synthetic_takes_kept_tiles_per_class_in_proportion(tiny_models, tiny_synthetic):
    import numpy as np
    import pyarrow.parquet as pq

    from histodiff_ray.config import SelectionConfig
    from histodiff_ray.evaluate import load_synthetic

    cfg = load_config("cpu", tiny_models["overrides"])
    x, y = load_synthetic(cfg, tiny_synthetic, np.array([4, 2]), ratio=0.5)
    index = pq.read_table(io.BytesIO(read_bytes(open_location(f"{tiny_synthetic}/index.parquet", cfg.storage))))
    kept = [label for label, k in zip(index.column("label").to_pylist(), index.column("kept").to_pylist()) if k]
    assert list(y) == sorted(y) and (y == 0).sum() == min(2, kept.count(0)) and (y == 1).sum() == min(1, kept.count(1))
    assert x.shape[1:] == (64, 64, 3) and x.dtype == np.uint8
    # Re-applying selection in memory: no confidence bar and no cap keeps every centroid-agreeing tile.
    x_all, y_all = load_synthetic(
        cfg,
        tiny_synthetic,
        np.array([100, 100]),
        1.0,
        selection=SelectionConfig(confidence_threshold=0.0, max_per_class=1000),
    )
    assert len(y_all) >= len(kept)


def test_a_rerun_reuses_finished_runs_and_trains_only_the_missing_ones(
    tiny_models, tiny_evaluation, external_test_set, capsys
):
    from histodiff_ray.evaluate import _jsonable, evaluate
    from histodiff_ray.storage import list_files

    cfg = load_config("cpu", tiny_models["overrides"] + EVALUATE)
    out, first = tiny_evaluation
    runs = open_location(out, cfg.storage).join("runs")
    stored = list_files(runs)
    assert len(stored) == 14
    lost = json.loads(read_bytes(runs.join(stored[0])))
    runs.filesystem.delete_file(runs.join(stored[0]).path)  # as if the job had been killed before that run finished

    capsys.readouterr()
    again = evaluate(
        cfg,
        tiny_models["args"]["tiles"],
        out,
        synthetic={"tiny": first["synthetic"]["tiny"]},
        judge=tiny_models["args"]["judge"],
        tests={"heldout": str(external_test_set)},
    )
    assert "[evaluate] 13 of 14 runs finished before: reused" in capsys.readouterr().out
    assert sorted(list_files(runs)) == sorted(stored)
    key = (lost["label_fraction"], lost["arm"], lost["seed"])
    assert [(r["label_fraction"], r["arm"], r["seed"]) for r in again["runs"]] == [
        (r["label_fraction"], r["arm"], r["seed"]) for r in first["runs"]
    ]
    for old, new in zip(first["runs"], again["runs"]):
        if (old["label_fraction"], old["arm"], old["seed"]) != key:
            assert json.loads(json.dumps(old, default=_jsonable)) == new


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"AC": 2, "T": 2, "X": 1}, "its classes do not match the training classes: extra T, X; missing H"),
        ({}, "no images in class folders; lay it out as <CLASS>/<image> with CLASS one of ['AC', 'H']"),
        ({"AC": 1, "H": 0}, "missing H"),
    ],
)
def test_an_external_test_set_with_other_classes_or_no_images_fails_in_one_line(
    tiny_models, tmp_path, shared_data, layout, message
):
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
    assert (
        message in str(err.value) and f"--test ext={tmp_path / 'ext'}" in str(err.value) and "\n" not in str(err.value)
    )
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


def test_a_synthetic_set_is_evaluated_only_at_the_label_fraction_its_generator_used(
    tiny_models, tiny_synthetic, tmp_path
):
    from histodiff_ray.errors import HistodiffError
    from histodiff_ray.evaluate import evaluate

    # The tiny synthetic set was generated with all of the tiny tile set's labels (fraction 1).
    cfg = load_config("cpu", tiny_models["overrides"] + ["evaluate.label_fractions=0.5"])
    with pytest.raises(
        HistodiffError,
        match=r"--synthetic tiny=.* was generated from .*, labeled at data.label_fraction=1.0: "
        r"add 1.0 to evaluate.label_fractions \(now \[0.5\]\)",
    ):
        evaluate(cfg, tiny_models["args"]["tiles"], str(tmp_path / "out"), synthetic={"tiny": tiny_synthetic})
    assert not (tmp_path / "out").exists()
