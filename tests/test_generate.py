"""Class-guided synthesis on the S3 server: the noise-aware classifier (Ray Train), the judge,
`generate` on an actor pool with selection and provenance, and the fault drill — the driver killed
half-way and rerun gives exactly the requested set, byte-identical to an uninterrupted run."""

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histodiff_ray.config import load_config
from histodiff_ray.storage import (
    download_dir,
    exists,
    list_files,
    open_location,
    read_bytes,
    upload_dir,
    write_atomic,
)
from tests.conftest import SYNTHETIC_PER_CLASS

BIN = Path(sys.executable).parent
PER_CLASS = SYNTHETIC_PER_CLASS


@pytest.fixture(scope="module")
def models(tiny_models):
    t = tiny_models
    return load_config("cpu", t["overrides"]), t["overrides"], t["root"], t["args"], t["classifier_info"], t["judge"]


def test_training_leaves_no_local_checkpoint_folder(tiny_models):
    # Each checkpoint is written to a local folder, then uploaded to the run's storage (S3 here).
    assert tiny_models["leftover_checkpoints"] == []


def test_classifier_reports_val_accuracy_per_noise_bucket_and_loads_from_its_folder(models):
    import tempfile

    import torch

    from histodiff_ray.models.classifier import load_classifier
    from histodiff_ray.storage import download_dir

    cfg, _, root, _, info, judge = models
    final = info["final_metrics"]
    for bucket in ("t0_250", "t250_500", "t500_750", "t750_1000"):
        assert 0 <= final[f"val_acc_{bucket}"] <= 1
    assert final["val_tiles"] > 0 and info["classes"] == ["AC", "H"] and info["step"] == 4
    with tempfile.TemporaryDirectory() as tmp:
        local = download_dir(open_location(f"{root}/classifier/model/classifier", cfg.storage), tmp)
        model = load_classifier(local)
        assert model(torch.zeros(3, cfg.autoencoder.latent_channels, 16, 16), torch.tensor([0, 500, 999])).shape == (
            3,
            2,
        )
    assert judge["classes"] == ["AC", "H"] and 0 <= judge["val_macro_f1"] <= 1


def _shards(out):
    return (
        sorted(n for n in list_files(out.join("shards")) if n.endswith(".parquet"))
        if exists(out.join("shards"))
        else []
    )


def _settled_shards(out, quiet_s: float = 3.0, timeout_s: float = 120.0):
    """The shards once nothing writes any more: the killed driver's actors live on the `ray start`
    cluster until Ray ends them, and one may still finish the shard it was writing."""
    deadline, seen, since = time.time() + timeout_s, _shards(out), time.time()
    while time.time() < deadline and time.time() - since < quiet_s:
        time.sleep(0.2)
        now = _shards(out)
        if now != seen:
            seen, since = now, time.time()
    return seen


def _cli(args, overrides, output, env):
    return [
        str(BIN / "histodiff"),
        "generate",
        "--ldm",
        args["ldm"],
        "--classifier",
        args["classifier"],
        "--judge",
        args["judge"],
        "--tiles",
        args["tiles"],
        "--output",
        output,
        "--per-class",
        str(PER_CLASS),
        *overrides,
    ]


def test_generate_killed_half_way_then_rerun_gives_exactly_the_uninterrupted_set(models, tiny_synthetic, ray_head):
    from histodiff_ray.generate import generate

    cfg, overrides, root, args, _, _ = models
    # The uninterrupted run: the session's synthetic set, made by `generate` in this process with the
    # same models and settings (the output folder is not part of what decides the tiles).
    summary = json.loads(read_bytes(open_location(f"{tiny_synthetic}/summary.json", cfg.storage)))
    assert summary["tiles"] == 2 * PER_CLASS
    clean = pq.read_table(io.BytesIO(read_bytes(open_location(f"{tiny_synthetic}/index.parquet", cfg.storage))))

    # The same job from a driver on a `ray start` cluster, SIGKILLed when about half its shards exist.
    _, gcs, env = ray_head
    env = {**env, "RAY_ADDRESS": gcs}
    out = open_location(f"{root}/drill", cfg.storage)
    total_shards = 2 * PER_CLASS // cfg.generate.shard_size
    proc = subprocess.Popen(
        _cli(args, overrides, out.uri, env), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline, done = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None:
        done = _shards(out)
        if len(done) >= total_shards // 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _settled_shards(out)
    assert 0 < len(done) < total_shards, f"the kill came too late or too early: {len(done)} of {total_shards} shards"
    before = {name: read_bytes(out.join("shards", name)) for name in done}

    rerun = subprocess.run(_cli(args, overrides, out.uri, env), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} shards already done" in rerun.stdout
    for name, data in before.items():  # shards written before the kill are untouched
        assert read_bytes(out.join("shards", name)) == data

    index = pq.read_table(io.BytesIO(read_bytes(out.join("index.parquet"))))
    ids = index.column("tile_id").to_pylist()
    assert len(ids) == 2 * PER_CLASS and len(set(ids)) == len(ids)
    assert sorted(ids) == sorted(clean.column("tile_id").to_pylist())
    # Deterministic: every tile equals the uninterrupted run's, pixel for pixel and seed for seed.
    drill_tiles, clean_tiles = _tiles(out, index), _tiles(open_location(tiny_synthetic, cfg.storage), clean)
    assert drill_tiles == clean_tiles

    # Selection and provenance: every tile says where it came from and whether it was kept, and why not.
    kept = index.column("kept").to_pylist()
    reasons = index.column("reason").to_pylist()
    assert all(
        (k and r == "") or (not k and r in ("near_copy", "low_confidence", "centroid_mismatch", "over_cap"))
        for k, r in zip(kept, reasons)
    )
    conf = np.array(index.column("confidence").to_pylist())
    assert all(c >= 0.5 for c, k in zip(conf, kept) if k)
    row = index.slice(0, 1).to_pylist()[0]
    assert row["ldm"] == args["ldm"] and len(row["ldm_sha256"]) == 64 and len(row["classifier_sha256"]) == 64
    assert row["guidance_scale"] == cfg.sampling.guidance_scale and row["ddim_steps"] == 20 and row["seed"] > 0
    pngs = [n for n in list_files(out.join("synthetic")) if n.endswith(".png")] if any(kept) else []
    assert sorted(pngs) == sorted(p.removeprefix("synthetic/") for p in index.column("png").to_pylist() if p)
    for name in pngs[:2]:
        assert Image.open(io.BytesIO(read_bytes(out.join("synthetic", name)))).size == (64, 64)
    summary = json.loads(read_bytes(out.join("summary.json")))
    assert summary["tiles"] == 2 * PER_CLASS and summary["kept"] == sum(kept)

    # A shard cut short later (a bad disk, an upload cut off): readers name it and the fix; a rerun remakes it.
    from histodiff_ray.data.shards import DamagedShardError
    from histodiff_ray.data.synthetic import load_shards

    name = sorted(before)[0]
    write_atomic(out.join("shards", name), before[name][:100])
    with pytest.raises(DamagedShardError) as err:
        load_shards(out)
    assert "\n" not in str(err.value) and name in str(err.value) and "re-run `histodiff generate`" in str(err.value)
    generate(cfg, **args, output=out.uri, per_class=PER_CLASS, progress=False)
    assert read_bytes(out.join("shards", name)) == before[name]


def test_loading_the_models_from_s3_leaves_no_copy_on_local_disk(models, tmp_path, monkeypatch):
    import dataclasses
    import tempfile

    import torch

    from histodiff_ray.generate import Synthesizer, make_plan

    cfg, _, _, args, _, _ = models
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    sources = {"ldm": args["ldm"], "classifier": args["classifier"], "judge": args["judge"]}
    actor = Synthesizer(
        make_plan(cfg, ["AC", "H"], 2, sources),
        str(tmp_path / "out"),
        dataclasses.asdict(cfg.storage),
        np.zeros((1, 16, 16), np.float32),
        torch.get_num_threads(),
    )
    assert actor.guide is not None and actor.judge is not None and actor.centroids.shape[0] == 2
    # The LDM, guide and judge weights were copied from S3 to read them; the copies are gone.
    assert list(scratch.iterdir()) == []


def test_generate_refuses_to_mix_settings_in_one_output(models, tiny_synthetic):
    from histodiff_ray.errors import HistodiffError
    from histodiff_ray.generate import generate

    cfg, overrides, root, args, _, _ = models
    other = load_config("cpu", overrides + ["sampling.guidance_scale=7"])
    with pytest.raises(HistodiffError, match="other settings .*sampling"):
        generate(other, **args, output=tiny_synthetic, per_class=PER_CLASS, progress=False)


def test_select_reruns_selection_alone_with_other_thresholds(models, tiny_synthetic, tmp_path):
    from histodiff_ray.data.synthetic import select_synthetic

    cfg, overrides, root, _, _, _ = models
    # Selection rewrites the set's index: on a copy of the session's set, which other tests read.
    uri = f"{root}/reselected"
    upload_dir(download_dir(open_location(tiny_synthetic, cfg.storage), str(tmp_path)), open_location(uri, cfg.storage))
    strict = load_config("cpu", overrides + ["selection.confidence_threshold=1.0", "selection.max_per_class=1"])
    summary = select_synthetic(strict, uri, strict.selection)
    assert summary["tiles"] == 2 * PER_CLASS and summary["kept"] <= 2
    assert all(c["kept"] <= 1 for c in summary["per_class"].values())
    loose = load_config("cpu", overrides + ["selection.confidence_threshold=0.0", "selection.max_per_class=3"])
    summary = select_synthetic(loose, uri, loose.selection)
    index = pq.read_table(io.BytesIO(read_bytes(open_location(f"{uri}/index.parquet", cfg.storage))))
    # With no confidence bar, only centroid disagreement and the cap drop tiles.
    assert set(index.column("reason").to_pylist()) <= {"", "centroid_mismatch", "over_cap"}
    assert all(c["kept"] <= 3 for c in summary["per_class"].values())


def _tiles(loc, table):
    """tile_id → (PNG bytes, seed), read from the shards that ``table`` (an index) names."""
    found = {}
    for shard in sorted(set(table.column("shard").to_pylist())):
        t = pq.read_table(
            io.BytesIO(read_bytes(loc.join("shards", f"{shard}.parquet"))), columns=["tile_id", "image", "seed"]
        )
        found.update(
            zip(t.column("tile_id").to_pylist(), zip(t.column("image").to_pylist(), t.column("seed").to_pylist()))
        )
    return found


def test_classifier_free_generation_takes_no_guide_and_needs_a_class_conditional_model(models):
    """guidance.kind=classifier_free guides with the UNet itself: `generate` refuses a --classifier and a
    UNet fine-tuned without classes. (The class-conditional fine-tune in bf16 and its generation run in
    tests/test_pipeline.py, on the paper profile.)"""
    from histodiff_ray.errors import HistodiffError
    from histodiff_ray.generate import generate

    _, overrides, root, args, _, _ = models
    cfg = load_config("cpu", overrides + ["guidance.kind=classifier_free"])
    with pytest.raises(HistodiffError, match="drop --classifier"):
        generate(cfg, **args, output=f"{root}/syn-cfg", per_class=2, progress=False)
    with pytest.raises(HistodiffError, match=f"{args['ldm']} is unconditional"):
        generate(cfg, **args | {"classifier": None}, output=f"{root}/syn-cfg", per_class=2, progress=False)


def test_pseudo_labels_come_from_the_judge_for_unlabeled_train_tiles_only(models, tmp_path, shared_data):
    from histodiff_ray.data.ingest import ingest
    from histodiff_ray.data.tiles import load_tile_table
    from histodiff_ray.judge import judge_probabilities, pseudo_labels
    from tests.data.test_ingest import make_labeled_input

    cfg, overrides, _, args, _, _ = models
    half = load_config("cpu", overrides + ["data.label_fraction=0.5", "guidance.pseudo_label_threshold=0.01"])
    src = make_labeled_input(tmp_path / "input", shared_data, classes=("AC", "H"), per_class=24)
    ingest(half, [str(src)], str(tmp_path / "tiles"), labeled=True, progress=False)
    train = load_tile_table(
        open_location(str(tmp_path / "tiles"), half.storage), "train", columns=["tile_id", "labeled"]
    )
    unlabeled = {
        t for t, marked in zip(train.column("tile_id").to_pylist(), train.column("labeled").to_pylist()) if not marked
    }
    assert unlabeled
    labels, summary = pseudo_labels(half, args["judge"], str(tmp_path / "tiles"))
    assert set(labels) == unlabeled and set(labels.values()) <= {0, 1}  # a threshold below 1/2 keeps every guess
    assert sum(summary["kept"].values()) == len(labels) == summary["unlabeled"]
    strict = load_config("cpu", overrides + ["data.label_fraction=0.5", "guidance.pseudo_label_threshold=1.0"])
    assert len(pseudo_labels(strict, args["judge"], str(tmp_path / "tiles"))[0]) < len(labels)
    probs, _ = judge_probabilities(half, args["judge"], str(tmp_path / "tiles"))  # what the guide distills
    assert set(probs) == unlabeled and all(len(p) == 2 and abs(sum(p) - 1) < 1e-4 for p in probs.values())
    assert all(int(np.argmax(probs[t])) == k for t, k in labels.items())


def test_the_driver_builds_the_real_thumbnails_shard_by_shard(models):
    # The memorization audit needs only 16x16 thumbnails of the real train tiles; the driver decodes
    # one shard at a time instead of holding every tile (19 GB at 256 px and 10^5 tiles).
    from histodiff_ray.data.tiles import decode_images, iter_tile_tables, load_tile_table
    from histodiff_ray.generate import train_thumbnails
    from histodiff_ray.selection import box_thumbnails

    cfg, _, _, args, _, _ = models
    tiles = open_location(args["tiles"], cfg.storage)
    per_shard = [t.num_rows for t in iter_tile_tables(tiles, "train", columns=["image"])]
    assert len(per_shard) == len(json.loads(read_bytes(tiles.join("manifest.json")))["shards"])
    every = load_tile_table(tiles, "train", columns=["image"])
    assert sum(per_shard) == every.num_rows > 0
    np.testing.assert_array_equal(train_thumbnails(tiles), box_thumbnails(decode_images(every.column("image"))))
