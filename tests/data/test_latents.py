"""Latent batches: labels are −1 where a label may not be used, unless a pseudo-label fills them in."""

import numpy as np

from histodiff_ray.data.latents import decode_latents


def _batch():
    latents = [np.full((4, 2, 2), i, np.float16).tobytes() for i in range(4)]
    return {"latent": latents, "label": np.array([0, 1, 2, 1]), "labeled": np.array([True, False, False, True]),
            "tile_id": np.array(["a", "b", "c", "d"], dtype=object)}


def test_labels_of_unlabeled_tiles_are_hidden():
    out = decode_latents(_batch(), [4, 2, 2])
    assert out["label"].tolist() == [0, -1, -1, 1]
    assert out["latent"].shape == (4, 4, 2, 2) and out["latent"].dtype == np.float32 and out["latent"][2].max() == 2


def test_pseudo_labels_fill_only_unlabeled_tiles():
    # "d" is labeled: its own label stands even if a pseudo-label disagrees; "c" has no confident guess.
    out = decode_latents(_batch(), [4, 2, 2], pseudo_labels={"b": 3, "d": 0})
    assert out["label"].tolist() == [0, 3, -1, 1]
