"""Latent batches: labels are −1 where a label may not be used, unless a pseudo-label or the judge's
probabilities fill them in; a latent set records its autoencoder's latent shape and its encoding's
timing; reading latents imports neither torch nor diffusers."""

import subprocess
import sys
import time

import numpy as np

from histodiff_ray.config import load_config
from histodiff_ray.data.latents import _gather, decode_latents, encode_latents


def _batch():
    latents = [np.full((4, 2, 2), i, np.float16).tobytes() for i in range(4)]
    return {
        "latent": latents,
        "label": np.array([0, 1, 2, 1]),
        "labeled": np.array([True, False, False, True]),
        "tile_id": np.array(["a", "b", "c", "d"], dtype=object),
    }


def test_the_module_that_reads_latents_imports_neither_torch_nor_diffusers():
    # Every process that streams latents (Ray Data's tasks, anew for each Train run and command)
    # imports this module to unpickle decode_latents: with torch and diffusers that was ~8 CPU-seconds
    # of each one's start where ~1.5 do; only the encoding actors need them.
    code = "import sys, histodiff_ray.data.latents; print([m for m in ('torch', 'diffusers') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_labels_of_unlabeled_tiles_are_hidden():
    out = decode_latents(_batch(), [4, 2, 2])
    assert out["label"].tolist() == [0, -1, -1, 1]
    assert out["latent"].shape == (4, 4, 2, 2) and out["latent"].dtype == np.float32 and out["latent"][2].max() == 2


def test_pseudo_labels_fill_only_unlabeled_tiles():
    # "d" is labeled: its own label stands even if a pseudo-label disagrees; "c" has no confident guess.
    out = decode_latents(_batch(), [4, 2, 2], pseudo_labels={"b": 3, "d": 0})
    assert out["label"].tolist() == [0, 3, -1, 1]


def test_soft_labels_give_labeled_tiles_one_hot_targets_and_unlabeled_ones_the_judges():
    out = decode_latents(_batch(), [4, 2, 2], soft_labels={"b": [0.1, 0.2, 0.6, 0.1], "d": [1.0, 0.0, 0.0, 0.0]})
    assert out["label"].tolist() == [0, 2, -1, 1]  # "b" takes its most likely class; "c" has no probabilities
    assert out["target"].tolist() == [
        [1, 0, 0, 0],
        [np.float32(0.1), np.float32(0.2), np.float32(0.6), np.float32(0.1)],
        [0, 0, 0, 0],
        [0, 1, 0, 0],
    ]


def test_the_latent_shape_is_the_autoencoders_not_the_configs(tiny_latents):
    # Encoding with a config that describes another autoencoder (here 3 latent channels, the tiny
    # autoencoder has the cpu profile's 8) used to record the config's shape, and every stage after it
    # then read the latents with the wrong number of channels.
    overrides, bucket = tiny_latents
    cfg = load_config("cpu", overrides + ["autoencoder.latent_channels=3"])
    called = time.perf_counter()
    manifest = encode_latents(
        cfg, f"s3://{bucket}/tiles", f"s3://{bucket}/runs/ae/model/vae", f"s3://{bucket}/latents-shape"
    )
    wall = time.perf_counter() - called
    assert manifest["latent_shape"] == [load_config("cpu").autoencoder.latent_channels, 16, 16]
    # The manifest also records the call's timing; 48 tiles are one batch: no rate after the first.
    timing = manifest["encoding"]
    assert 0 < timing["first_latents_s"] < timing["seconds"] <= wall
    assert "steady_tiles_per_s" not in timing


def test_the_steady_rate_counts_the_tiles_after_the_first_batch(ray_local):
    # bench/stages.py compares this rate with a plain loop: the start-up before the first batch
    # must not be in it, and every later tile must.
    ds = ray_local.data.range(600, override_num_blocks=6).map_batches(_slow, batch_size=None)
    called = time.perf_counter()
    tables, timing = _gather(ds, 600, progress=False)
    wall = time.perf_counter() - called
    assert sum(t.num_rows for t in tables) == 600
    assert timing["first_latents_s"] >= 0.2  # the first block's sleep
    streaming = (600 - tables[0].num_rows) / timing["steady_tiles_per_s"]
    # Two CPUs run the six blocks in three rounds of 0.2 s: the last two rounds come after the first block.
    assert 0.35 <= streaming <= wall - timing["first_latents_s"] + 0.01


def _slow(batch):
    time.sleep(0.2)
    return batch
