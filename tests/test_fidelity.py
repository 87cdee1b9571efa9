"""`histodiff fidelity`: the classifier two-sample test on real H&E tiles, the oracle's per-class
agreement, and the command on the tiny tile set and synthetic set (oracle trained once, then
reused; outputs on the S3 server; the report's fidelity section)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from histodiff_ray.config import load_config
from histodiff_ray.fidelity import c2st, oracle_agreement
from histodiff_ray.storage import download_dir, open_location, read_bytes
from tests.conftest import SYNTHETIC_PER_CLASS


@pytest.fixture(scope="module")
def crc5_tiles(shared_data) -> list[Image.Image]:
    """320 real crc5 tiles of every class, shuffled, at the cpu profile's 64 px."""
    files = sorted((shared_data / "crc5" / "train").glob("*/*.jpg"))
    picks = np.random.default_rng(0).choice(len(files), 320, replace=False)
    return [Image.open(files[i]).convert("RGB").resize((64, 64), Image.BILINEAR) for i in picks]


def _array(images) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images])


def test_c2st_cannot_tell_two_halves_of_one_set_apart(crc5_tiles):
    tiles = _array(crc5_tiles)
    result = c2st(tiles[:160], tiles[160:], seed=0)
    assert result["n_per_side"] == 160 and result["n_test"] == 160
    assert 0.4 <= result["accuracy"] <= 0.6 and result["p_value"] > 0.01


@pytest.mark.parametrize("change", ["colour-inverted", "blurred"])
def test_c2st_tells_real_tiles_from_altered_ones(crc5_tiles, change):
    real = _array(crc5_tiles[:160])
    if change == "colour-inverted":
        fake = 255 - _array(crc5_tiles[160:])
    else:
        fake = _array([i.filter(ImageFilter.GaussianBlur(1.0)) for i in crc5_tiles[160:]])
    result = c2st(real, fake, seed=0)
    assert result["accuracy"] >= 0.95 and result["p_value"] < 1e-6


def test_c2st_balances_sides_within_groups_and_skips_small_samples():
    rng = np.random.default_rng(0)
    real, fake = rng.integers(0, 256, (40, 16, 16, 3), np.uint8), rng.integers(0, 256, (50, 16, 16, 3), np.uint8)
    # Whole sets: the larger side is cut to the smaller one's count.
    assert c2st(real, fake, steps=5, min_tiles=2)["n_per_side"] == 40
    # Per group: group 0 has 30 real / 10 fake, group 1 10 real / 40 fake → 10 + 10 per side.
    result = c2st(
        real,
        fake,
        real_groups=np.repeat([0, 1], [30, 10]),
        fake_groups=np.repeat([0, 1], [10, 40]),
        steps=5,
        min_tiles=2,
    )
    assert result["n_per_side"] == 20 and result["n_test"] == 20
    assert (
        c2st(
            real,
            fake,
            real_groups=np.repeat([0, 1], [30, 10]),
            fake_groups=np.repeat([0, 1], [10, 40]),
            steps=5,
            min_tiles=21,
        )
        is None
    )
    assert c2st(real[:0], fake, min_tiles=2) is None


def test_oracle_agreement_is_the_share_of_each_class_tiles_the_oracle_gives_that_class():
    target = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 2, 1, 0, 2])
    per_class, overall = oracle_agreement(pred, target, num_classes=4)
    assert per_class == [0.5, 0.5, 1.0, None]  # class 3 has no tiles
    assert overall == pytest.approx(4 / 7)
    assert oracle_agreement(np.zeros(0, int), np.zeros(0, int), 2) == ([None, None], None)


def _tiles_with_few_labeled(tiles_uri: str, cfg, folder) -> str:
    """A local copy of a tile set in which only two train tiles keep their `labeled` mark, as a small
    data.label_fraction would leave it: the oracle must still learn from every train tile."""
    from histodiff_ray.data.shards import write_shard
    from histodiff_ray.data.tiles import load_manifest, save_manifest

    local = download_dir(open_location(tiles_uri, cfg.storage), str(folder))
    root = open_location(local, cfg.storage)
    manifest = load_manifest(root)
    seen = 0
    for record in manifest["shards"]:  # rewritten as ingest writes shards, so that readers find them sound
        table = pq.read_table(root.join(record["path"]).path)
        labeled = []
        for split in table.column("split").to_pylist():
            labeled.append(split == "train" and seen < 2)
            seen += split == "train"
        record.update(
            write_shard(
                root, record["path"], table.set_column(table.schema.get_field_index("labeled"), "labeled", [labeled])
            )
        )
    save_manifest(root, manifest)
    return local


def test_fidelity_command_measures_each_set_with_one_oracle_reused_across_runs(
    tiny_models, tiny_synthetic, tmp_path, capsys
):
    import io

    from histodiff_ray.cli import main
    from histodiff_ray.data.tiles import load_tile_table
    from histodiff_ray.report import build_report

    cfg = load_config("cpu", tiny_models["overrides"])
    tiles = _tiles_with_few_labeled(tiny_models["args"]["tiles"], cfg, tmp_path / "tiles")
    root = tiny_models["root"]
    args = [
        "fidelity",
        "--tiles",
        tiles,
        "--synthetic",
        f"cg={tiny_synthetic}",
        "--synthetic",
        tiny_synthetic,
        "--oracle",
        f"{root}/oracle",
        "--autoencoder",
        tiny_models["autoencoder"],
        "--judge",
        tiny_models["args"]["judge"],
        "--c2st-min-tiles",
        "2",
        *tiny_models["overrides"],
        "downstream.epochs=1",
    ]
    assert main(args[:1] + ["--output", f"{root}/fidelity"] + args[1:]) == 0
    printed = capsys.readouterr().out
    result = json.loads(read_bytes(open_location(f"{root}/fidelity/fidelity.json", cfg.storage)))

    # The oracle learnt from every train tile, labeled mark or not, and says what it is for.
    tiles_loc = open_location(tiles, cfg.storage)
    oracle = result["oracle"]
    assert oracle["train_tiles"] == load_tile_table(tiles_loc, "train").num_rows > 2
    assert oracle["reused"] is False and 0 <= oracle["val_acc"] <= 1 and oracle["best_epoch"] == 1
    assert "never" in oracle["note"] and "test split" in oracle["note"] and oracle["note"] in printed

    # One block per set, named as `evaluate --synthetic` names them; counts as the set's index says.
    assert list(result["sets"]) == ["cg", "synthetic-small"]
    index = pq.read_table(io.BytesIO(read_bytes(open_location(f"{tiny_synthetic}/index.parquet", cfg.storage))))
    labels, kept = index.column("label").to_numpy(), index.column("kept").to_numpy(zero_copy_only=False)
    val_n = load_tile_table(tiles_loc, "val").num_rows
    for name, s in result["sets"].items():
        rows = s["per_class"]
        assert list(rows) == ["AC", "H", "all"] and s["uri"] == tiny_synthetic
        for c, cls in enumerate(["AC", "H"]):
            assert rows[cls]["generated"] == SYNTHETIC_PER_CLASS and rows[cls]["kept"] == int(kept[labels == c].sum())
        assert rows["all"]["generated"] == 2 * SYNTHETIC_PER_CLASS and rows["all"]["kept"] == int(kept.sum())
        assert rows["all"]["real_val"] == val_n
        for row in rows.values():
            for key in ("oracle_agreement", "precision", "recall"):
                assert row[key] is None or 0 <= row[key] <= 1
            assert row["fid"] is None or row["fid"] >= 0
            assert row["c2st"] is None or 0 <= row["c2st"]["accuracy"] <= 1
        assert f"### {name}: {tiny_synthetic}" in printed
    assert rows["all"]["fid"] is not None and rows["all"]["c2st"] is not None
    table = read_bytes(open_location(f"{root}/fidelity/fidelity.md", cfg.storage)).decode()
    assert "| class | generated | kept | oracle agreement | precision | recall | FID | KID | C2ST |" in table

    # The ceiling: real train tiles of each class that the method holds unlabeled, through the autoencoder, as
    # many as the sets generated, then selected by the judge as generate selects.
    ceiling = result["ceiling"]
    assert ceiling["autoencoder"] == f"{tiny_models['autoencoder']}/model/vae"
    assert ceiling["judge"] == tiny_models["args"]["judge"]
    train = load_tile_table(tiles_loc, "train", columns=["label", "labeled"])
    unlabeled = train.column("label").to_numpy()[~train.column("labeled").to_numpy(zero_copy_only=False)]
    rows = ceiling["per_class"]
    for c, cls in enumerate(["AC", "H"]):
        assert rows[cls]["generated"] == min(SYNTHETIC_PER_CLASS, int((unlabeled == c).sum())) > 0
        assert 0 <= rows[cls]["kept"] <= rows[cls]["generated"]
    assert rows["all"]["kept"] == rows["AC"]["kept"] + rows["H"]["kept"]
    heading = f"### ceiling: real train tiles through the autoencoder {ceiling['autoencoder']}, selected by the judge"
    assert heading in table and heading in printed

    def measure_small_set(oracle: str, output: str, *extra: str) -> int:
        return main(
            ["fidelity", "--tiles", tiles, "--synthetic", tiny_synthetic, "--oracle", oracle, "--output", output]
            + [*extra, *tiny_models["overrides"]]
        )

    # A wrong --autoencoder is named before any work is done.
    no_run = f"{root}/no-such-run"
    assert measure_small_set(f"{root}/oracle", f"{root}/fidelity-no-ae", "--autoencoder", no_run) == 2
    assert f"no autoencoder at {no_run}/model/vae" in capsys.readouterr().err
    assert measure_small_set(f"{root}/oracle", f"{root}/fidelity-no-ae", "--judge", tiny_models["args"]["judge"]) == 2
    assert "give --autoencoder with it" in capsys.readouterr().err

    # A second run (of one set) finds the oracle in its folder and measures with it, unchanged.
    weights = read_bytes(open_location(f"{root}/oracle/model.safetensors", cfg.storage))
    assert (
        main(
            [
                "fidelity",
                "--tiles",
                tiles,
                "--synthetic",
                f"cg={tiny_synthetic}",
                "--oracle",
                f"{root}/oracle",
                "--output",
                f"{root}/fidelity-again",
                "--c2st-min-tiles",
                "2",
                *tiny_models["overrides"],
            ]
        )
        == 0
    )
    assert "reusing the oracle" in capsys.readouterr().out
    again = json.loads(read_bytes(open_location(f"{root}/fidelity-again/fidelity.json", cfg.storage)))
    assert again["oracle"]["reused"] is True and again["sets"] == {"cg": result["sets"]["cg"]}
    assert read_bytes(open_location(f"{root}/oracle/model.safetensors", cfg.storage)) == weights

    # A folder holding another kind of tile classifier (the judge) is not taken for an oracle.
    assert measure_small_set(tiny_models["args"]["judge"], f"{root}/fidelity-judge") == 2
    assert "not a fidelity oracle" in capsys.readouterr().err

    # The report shows the tables and the sentence about the oracle.
    build_report(cfg, tiles=tiles, output=str(tmp_path / "report"), fidelity=f"{root}/fidelity")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Fidelity of the kept synthetic tiles" in page and "measuring instrument" in page and "<h3>cg: " in page
    assert "<h3>ceiling: real train tiles through the autoencoder" in page


def test_fidelity_curve_measures_every_registered_checkpoint_by_samples_seen(tiny_models):
    from histodiff_ray.cli import main
    from histodiff_ray.storage import exists, read_run_info

    cfg = load_config("cpu", tiny_models["overrides"])
    root, ldm = tiny_models["root"], tiny_models["args"]["ldm"]
    assert (
        main(
            [
                "fidelity-curve",
                "--run",
                ldm,
                "--tiles",
                tiny_models["args"]["tiles"],
                "--oracle",
                f"{root}/oracle-curve",
                "--output",
                f"{root}/curve",
                "--n",
                "8",
                "--steps",
                "2",
                *tiny_models["overrides"],
                "downstream.epochs=1",
            ]
        )
        == 0
    )
    rows = json.loads(read_bytes(open_location(f"{root}/curve/curve.json", cfg.storage)))
    snapshot = json.loads(read_bytes(open_location(f"{ldm}/checkpoint_manager_snapshot.json", cfg.storage)))
    assert len(rows) == len(snapshot["checkpoint_results"]) >= 1
    info = read_run_info(open_location(ldm, cfg.storage))
    per_step = cfg.data.batch_size * cfg.ray.num_workers
    assert rows[-1]["checkpoint_step"] == info["step"] and rows[-1]["samples_seen"] == info["step"] * per_step
    assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["fid"] >= 0 for r in rows)
    assert exists(open_location(f"{root}/curve/curve.png", cfg.storage))
