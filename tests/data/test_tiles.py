"""Streaming tile shards from S3 with Ray Data, into Ray Train workers."""

import numpy as np
import pytest

from histodiff_ray.config import load_config
from histodiff_ray.data.ingest import ingest
from histodiff_ray.data.tiles import TileSetError, read_tiles
from histodiff_ray.storage import open_location
from tests.data.test_ingest import make_labeled_input


@pytest.fixture(scope="module")
def tile_set(ray_local, s3, s3_overrides, tmp_path_factory, shared_data):
    bucket = "stream-tiles"
    s3.create_bucket(bucket)
    src = make_labeled_input(
        tmp_path_factory.mktemp("stream") / "input", shared_data, classes=("AC", "H", "V"), per_class=20
    )
    cfg = load_config("cpu", s3_overrides + ["data.label_fraction=0.25", "data.tiles_per_shard=16"])
    manifest = ingest(cfg, [str(src)], f"s3://{bucket}/tiles", labeled=True, progress=False)
    return cfg, open_location(f"s3://{bucket}/tiles", cfg.storage), manifest


def _collect(ds):
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_streams_every_tile_of_a_split_decoded_and_normalised(tile_set):
    cfg, root, manifest = tile_set
    out = _collect(read_tiles(root, "train", keep_ids=True))
    n_train = sum(manifest["counts"]["train"].values())
    assert out["image"].shape == (n_train, 3, 64, 64) and out["image"].dtype == np.float32
    assert -1.0 <= out["image"].min() < -0.5 and 0.5 < out["image"].max() <= 1.0
    assert len(set(out["tile_id"])) == n_train
    assert set(out["label"]) <= set(range(len(manifest["classes"])))
    all_splits = _collect(read_tiles(root, None))
    assert len(all_splits["label"]) == manifest["kept"]


def test_labeled_only_streams_the_marked_fraction(tile_set):
    _, root, manifest = tile_set
    out = _collect(read_tiles(root, "train", labeled_only=True))
    assert len(out["label"]) == sum(manifest["labeled_train"].values()) < sum(manifest["counts"]["train"].values())


def test_augmentation_only_rotates_and_flips(tile_set):
    _, root, _ = tile_set
    plain = _collect(read_tiles(root, "val", keep_ids=True))
    augmented = _collect(read_tiles(root, "val", keep_ids=True, augment=True))
    by_id = dict(zip(plain["tile_id"], plain["image"]))
    changed = 0
    for tid, img in zip(augmented["tile_id"], augmented["image"]):
        ref = by_id[tid]
        views = [np.rot90(v, k, axes=(1, 2)) for v in (ref, ref[:, :, ::-1]) for k in range(4)]
        assert any(np.array_equal(img, v) for v in views)
        changed += not np.array_equal(img, ref)
    assert changed > 0


def test_unknown_split_and_missing_tile_set_are_clear_errors(tile_set, tmp_path):
    _, root, _ = tile_set
    with pytest.raises(TileSetError, match="split 'dev'"):
        read_tiles(root, "dev")
    with pytest.raises(TileSetError, match="histodiff ingest"):
        read_tiles(open_location(str(tmp_path / "nothing"), load_config("cpu").storage), "train")


def test_ray_train_workers_each_get_a_share_of_the_stream(tile_set, tmp_path):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, root, manifest = tile_set
    counts_dir = tmp_path / "counts"
    counts_dir.mkdir()

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=8):
            assert batch["image"].shape[1:] == (3, 64, 64)
            seen += len(batch["label"])
        rank = ray.train.get_context().get_world_rank()
        (config["out"] / f"rank{rank}").write_text(str(seen))
        ray.train.report({"seen": seen})

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": counts_dir},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="stream-shards", storage_path=str(tmp_path / "runs")),
        datasets={"train": read_tiles(root, "train", augment=True, batch_size=16)},
    )
    trainer.fit()
    seen = {p.name: int(p.read_text()) for p in counts_dir.iterdir()}
    assert set(seen) == {"rank0", "rank1"} and all(v > 0 for v in seen.values())
    assert sum(seen.values()) == sum(manifest["counts"]["train"].values())


def test_several_tile_sets_stream_shuffled_together(tile_set, shared_data, tmp_path):
    cfg, root, _ = tile_set
    other = open_location("s3://stream-tiles/other", cfg.storage)
    src = make_labeled_input(tmp_path / "input", shared_data, classes=("S", "T"), per_class=10)
    ingest(cfg, [str(src)], other.uri, labeled=True, progress=False)
    first = _collect(read_tiles(root, "train", keep_ids=True))["tile_id"].tolist()
    second = set(_collect(read_tiles(other, "train", keep_ids=True))["tile_id"].tolist())
    in_order = _collect(read_tiles([root, other], "train", keep_ids=True))["tile_id"].tolist()
    assert sorted(in_order[: len(first)]) == sorted(first)  # without shuffling: one set after the other
    mixed = _collect(read_tiles([root, other], "train", keep_ids=True, shuffle=True))["tile_id"].tolist()
    assert sorted(mixed) == sorted(in_order)
    assert min(i for i, t in enumerate(mixed) if t in second) < len(first) - len(second)  # the second set is spread in
