import numpy as np
import pytest
import torch

from histodiff_ray.config import SelectionConfig
from histodiff_ray.selection import (
    box_thumbnails,
    class_centroids,
    decide,
    nearest_centroid_scores,
    nearest_real,
    nearest_real_distance,
    nearest_thumbnail,
    select,
)

K = 3
CENTROIDS = np.eye(K, dtype=np.float32)


def _probs(target, conf, dtype=np.float32):
    """Softmax-like rows: conf on the target class, the rest spread over the others."""
    n = len(target)
    p = np.zeros((n, K), dtype=np.float64)
    for i, (t, c) in enumerate(zip(target, conf)):
        p[i] = (1 - c) / (K - 1)
        p[i, t] = c
    return p.astype(dtype)


def _features(classes, norm=1.0):
    """A feature pointing mostly at each given class's centroid (plus a bit of every other)."""
    f = np.full((len(classes), K), 0.1, dtype=np.float32)
    f[np.arange(len(classes)), classes] = 1.0
    return f * norm


def test_each_rule_drops_exactly_the_tiles_it_should():
    target = np.array([0, 0, 1, 1, 2, 2])
    probs = _probs(target, [0.95, 0.5, 0.9, 0.97, 0.99, 0.92])
    features = _features([0, 0, 1, 1, 2, 0])  # tile 5 looks like class 0
    real_distance = np.array([30.0, 30.0, 2.0, 30.0, 1.9, 30.0])
    cfg = SelectionConfig(confidence_threshold=0.9, max_per_class=10, min_real_distance=2.0)
    sel = select(target, probs, features, CENTROIDS, real_distance, cfg)
    assert sel.kept.tolist() == [True, False, True, True, False, False]
    assert sel.reason.tolist() == ["", "low_confidence", "", "", "near_copy", "centroid_mismatch"]
    np.testing.assert_allclose(sel.confidence, [0.95, 0.5, 0.9, 0.97, 0.99, 0.92], rtol=1e-6)
    assert sel.nearest_centroid.tolist() == [0, 0, 1, 1, 2, 0]
    # cosine similarity of (1, .1, .1) with its own axis, and of tile 5's (1, .1, .1) with axis 2
    on, off = 1 / np.sqrt(1.02), 0.1 / np.sqrt(1.02)
    np.testing.assert_allclose(sel.centroid_similarity, [on, on, on, on, on, off], rtol=1e-6)
    np.testing.assert_array_equal(sel.real_distance, real_distance)
    assert sel.counts() == {"kept": 3, "near_copy": 1, "low_confidence": 1, "centroid_mismatch": 1, "over_cap": 0}
    assert sel.kept_per_class(K).tolist() == [1, 2, 0]
    # the same rules from stored scores (what a re-selection with other thresholds reads)
    nearest, similarity = nearest_centroid_scores(features, CENTROIDS, target)
    np.testing.assert_array_equal(nearest, sel.nearest_centroid)
    np.testing.assert_array_equal(similarity, sel.centroid_similarity)
    kept, reason = decide(target, sel.confidence, nearest, real_distance, cfg)
    np.testing.assert_array_equal(kept, sel.kept)
    np.testing.assert_array_equal(reason, sel.reason)
    kept, reason = decide(
        target,
        sel.confidence,
        nearest,
        real_distance,
        SelectionConfig(confidence_threshold=0.4, max_per_class=1, min_real_distance=0.0),
    )
    assert reason.tolist() == ["", "over_cap", "over_cap", "", "", "centroid_mismatch"]


def test_confidence_threshold_is_inclusive_in_the_probabilities_precision():
    target = np.array([0, 0, 0])
    # float32(0.9) < 0.9 as a float64; it must still pass a threshold of 0.9.
    probs = _probs(target, [0.9, np.nextafter(np.float32(0.9), np.float32(0)), 1.0], dtype=np.float32)
    sel = select(
        target,
        probs,
        _features([0, 0, 0]),
        CENTROIDS,
        None,
        SelectionConfig(confidence_threshold=0.9, min_real_distance=0.0),
    )
    assert sel.reason.tolist() == ["", "low_confidence", ""]
    # torch inputs work the same way
    sel_t = select(
        torch.as_tensor(target),
        torch.as_tensor(probs),
        torch.as_tensor(_features([0, 0, 0])),
        torch.as_tensor(CENTROIDS),
        None,
        SelectionConfig(confidence_threshold=0.9, min_real_distance=0.0),
    )
    assert sel_t.reason.tolist() == ["", "low_confidence", ""]


def test_centroid_agreement_is_cosine_not_euclidean():
    # Class 0's centroid is short (a spread-out class), class 1's is long. The feature points a bit
    # more towards class 0 but is long: Euclidean distance would call it class 1, cosine says 0.
    centroids = np.array([[0.5, 0.0], [0.0, 1.0]])
    features = np.array([[1.0, 0.95], [0.95, 1.0]])
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    target = np.array([0, 0])
    euclid = np.linalg.norm(features[:, None] - centroids[None], axis=-1).argmin(1)
    assert euclid.tolist() == [1, 1]  # the case the choice matters for
    sel = select(
        target, probs, features, centroids, None, SelectionConfig(confidence_threshold=0.5, min_real_distance=0.0)
    )
    assert sel.nearest_centroid.tolist() == [0, 1]
    assert sel.reason.tolist() == ["", "centroid_mismatch"]
    # invariant to each feature's norm
    sel2 = select(
        target,
        probs,
        features * np.array([[1e-3], [1e3]]),
        centroids,
        None,
        SelectionConfig(confidence_threshold=0.5, min_real_distance=0.0),
    )
    assert sel2.nearest_centroid.tolist() == [0, 1]
    np.testing.assert_allclose(sel2.centroid_similarity, sel.centroid_similarity)
    np.testing.assert_allclose(sel.centroid_similarity, [1.0 / np.sqrt(1.0 + 0.95**2), 0.95 / np.sqrt(1.0 + 0.95**2)])


def test_first_failing_rule_is_recorded_in_order_but_every_verdict_is_returned():
    target = np.array([0, 0, 0, 0])
    probs = _probs(target, [0.1, 0.1, 0.99, 0.1])
    features = _features([1, 1, 1, 0])
    real_distance = np.array([0.0, 50.0, 50.0, 50.0])
    cfg = SelectionConfig(confidence_threshold=0.9, max_per_class=10, min_real_distance=1.0)
    sel = select(target, probs, features, CENTROIDS, real_distance, cfg)
    # tile 0 fails all three, tile 1 confidence and centroid, tile 2 centroid only, tile 3 confidence only
    assert sel.reason.tolist() == ["near_copy", "low_confidence", "centroid_mismatch", "low_confidence"]
    assert sel.near_copy.tolist() == [True, False, False, False]
    assert sel.low_confidence.tolist() == [True, True, False, True]
    assert sel.centroid_mismatch.tolist() == [True, True, True, False]
    assert not sel.kept.any() and not sel.over_cap.any()


def test_cap_keeps_the_most_confident_per_class_with_index_tie_break():
    target = np.array([0, 0, 0, 0, 0, 1, 1, 0])
    conf = [0.95, 0.99, 0.95, 0.97, 0.91, 0.93, 0.96, 0.999]
    features = _features(target)
    real_distance = np.full(8, 50.0)
    real_distance[7] = 0.5  # the most confident class-0 tile is a near-copy: it must not use a slot
    cfg = SelectionConfig(confidence_threshold=0.9, max_per_class=3, min_real_distance=1.0)
    sel = select(target, _probs(target, conf), features, CENTROIDS, real_distance, cfg)
    # class 0 passing: 1 (.99), 3 (.97), then the tie 0/2 at .95 -> 0; 2 and 4 are over the cap
    assert sel.kept.tolist() == [True, True, False, True, False, True, True, False]
    assert sel.reason.tolist() == ["", "", "over_cap", "", "over_cap", "", "", "near_copy"]
    assert sel.over_cap.tolist() == [False, False, True, False, True, False, False, False]

    # Deterministic and independent of input order: permute, select, map back.
    rng = np.random.default_rng(0)
    for _ in range(5):
        perm = rng.permutation(8)
        p_sel = select(
            target[perm],
            _probs(target[perm], np.array(conf)[perm]),
            features[perm],
            CENTROIDS,
            real_distance[perm],
            cfg,
        )
        kept_original = set(perm[p_sel.kept].tolist())
        # the tie 0/2 is broken by the *current* index: whichever of them comes first in the permutation
        first_of_tie = 0 if np.flatnonzero(perm == 0)[0] < np.flatnonzero(perm == 2)[0] else 2
        assert kept_original == {1, 3, first_of_tie, 5, 6}
        again = select(
            target[perm],
            _probs(target[perm], np.array(conf)[perm]),
            features[perm],
            CENTROIDS,
            real_distance[perm],
            cfg,
        )
        np.testing.assert_array_equal(again.kept, p_sel.kept)


def test_cap_of_one_on_many_ties_keeps_the_lowest_index():
    target = np.zeros(6, dtype=int)
    sel = select(
        target,
        _probs(target, [0.95] * 6),
        _features(target),
        CENTROIDS,
        None,
        SelectionConfig(confidence_threshold=0.9, max_per_class=1, min_real_distance=0.0),
    )
    assert sel.kept.tolist() == [True, False, False, False, False, False]
    assert sel.reason.tolist() == ["", "over_cap", "over_cap", "over_cap", "over_cap", "over_cap"]


def test_zero_min_real_distance_disables_the_audit():
    target = np.array([0, 1, 2])
    probs = _probs(target, [0.99, 0.99, 0.99])
    zero = np.zeros(3)
    off = select(target, probs, _features(target), CENTROIDS, zero, SelectionConfig(min_real_distance=0.0))
    assert off.kept.all() and not off.near_copy.any()
    assert select(target, probs, _features(target), CENTROIDS, None, SelectionConfig(min_real_distance=0.0)).kept.all()
    on = select(
        target, probs, _features(target), CENTROIDS, np.array([0.0, 3.0, 2.999]), SelectionConfig(min_real_distance=3.0)
    )
    assert on.reason.tolist() == ["near_copy", "", "near_copy"]
    with pytest.raises(ValueError, match="needs real_distance"):
        select(target, probs, _features(target), CENTROIDS, None, SelectionConfig(min_real_distance=1.0))
    with pytest.raises(ValueError, match="NaN"):
        select(
            target,
            probs,
            _features(target),
            CENTROIDS,
            np.array([1.0, np.nan, 5.0]),
            SelectionConfig(min_real_distance=1.0),
        )


def test_bad_shapes_and_targets_are_refused():
    target = np.array([0, 1])
    probs = _probs(target, [0.99, 0.99])
    with pytest.raises(ValueError, match="outside"):
        select(np.array([0, 3]), probs, _features(target), CENTROIDS, None, SelectionConfig(min_real_distance=0.0))
    with pytest.raises(ValueError, match="centroids"):
        select(target, probs, _features(target), CENTROIDS[:2], None, SelectionConfig(min_real_distance=0.0))
    empty = select(
        np.zeros(0, int), np.zeros((0, K)), np.zeros((0, K)), CENTROIDS, None, SelectionConfig(min_real_distance=0.0)
    )
    assert empty.kept.shape == (0,) and empty.reason.shape == (0,)


def test_class_centroids_average_normalised_features_and_name_a_missing_class():
    features = np.array([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    cents = class_centroids(features, np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(cents, [[0.5, 0.5], [np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)
    cents_t = class_centroids(torch.as_tensor(features), torch.as_tensor([0, 0, 1]), 2)
    np.testing.assert_allclose(cents_t, cents)
    with pytest.raises(ValueError, match=r"class 1 has no tiles"):
        class_centroids(features, np.array([0, 2, 2]), 3)
    with pytest.raises(ValueError, match=r"classes without tiles: \[1, 3\]"):
        class_centroids(features, np.array([0, 2, 2]), 4)
    with pytest.raises(ValueError, match="label 5"):
        class_centroids(features, np.array([0, 1, 5]), 2)


# --- memorization audit ------------------------------------------------------------------------


def _tiles(n, seed, size=64):
    """Structured colour tiles: a random 8×8 colour field, upsampled, plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(20, 236, (n, 8, 8, 3)).astype(np.float64)
    up = np.repeat(np.repeat(coarse, size // 8, axis=1), size // 8, axis=2)
    return np.clip(up + rng.normal(0, 6, up.shape), 10, 240).astype(np.uint8)


def _brute_force(synthetic, real):
    s = box_thumbnails(synthetic).astype(np.float64)
    r = box_thumbnails(real).astype(np.float64).reshape(len(real), -1)
    best = np.full(len(s), np.inf)
    for k in range(4):
        for flip in (False, True):
            v = np.rot90(s, k, axes=(1, 2))
            v = v[:, :, ::-1] if flip else v
            d = np.sqrt(((v.reshape(len(s), 1, -1) - r[None]) ** 2).mean(-1)).min(1)
            best = np.minimum(best, d)
    return best


def test_nearest_real_distance_is_zero_for_copies_and_rotations_and_large_otherwise():
    real = _tiles(12, seed=1)
    brighter = np.clip(real[9].astype(int) + 10, 0, 255).astype(np.uint8)
    assert (real[9].astype(int) + 10).max() <= 255  # no clipping: exactly +10 grey levels
    synthetic = np.stack(
        [
            real[2],  # exact copy
            np.rot90(real[5], 1),  # rotated
            real[3][::-1],  # flipped
            np.ascontiguousarray(np.rot90(real[7], 1)[:, ::-1]),  # rotated and flipped (a transpose)
            brighter,
            _tiles(1, seed=99)[0],  # unrelated
        ]
    )
    dist, idx = nearest_real(synthetic, real)
    assert dist[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert idx[:5].tolist() == [2, 5, 3, 7, 9]
    assert dist[4] == pytest.approx(10.0, abs=1e-9)  # RMS in 0-255 units
    assert dist[5] > 40.0
    np.testing.assert_allclose(dist, _brute_force(synthetic, real), atol=1e-9)
    np.testing.assert_array_equal(nearest_real_distance(synthetic, real), dist)
    # precomputed real thumbnails (computed once, shipped to every generator) give the same answer
    np.testing.assert_array_equal(nearest_real_distance(synthetic, box_thumbnails(real)), dist)


def test_chunking_gives_the_same_answer_as_one_chunk():
    real = _tiles(37, seed=2)
    synthetic = np.concatenate([_tiles(23, seed=3), np.rot90(real[:4], 2, axes=(1, 2))])
    one_d, one_i = nearest_real(synthetic, real, chunk=10_000)
    assert one_d[-4:].tolist() == [0.0] * 4 and one_i[-4:].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(one_d, _brute_force(synthetic, real), atol=1e-9)
    for chunk in (1, 3, 8, 16):
        d, i = nearest_real(synthetic, real, chunk=chunk)
        np.testing.assert_array_equal(d, one_d)
        np.testing.assert_array_equal(i, one_i)


def test_audit_edge_cases():
    real = _tiles(3, seed=4)
    d, i = nearest_real(real[:2], real[:0])
    assert np.isinf(d).all() and (i == -1).all()
    assert nearest_real_distance(real[:0], real).shape == (0,)
    with pytest.raises(ValueError, match="uint8"):
        box_thumbnails(real.astype(np.float32))
    with pytest.raises(ValueError, match="one shape"):  # float arrays are taken as thumbnails
        nearest_real_distance(real.astype(np.float32), real)
    with pytest.raises(ValueError, match="smaller"):
        nearest_real_distance(real[:, :8, :8], real)
    with pytest.raises(ValueError, match="chunk"):
        nearest_thumbnail(box_thumbnails(real), box_thumbnails(real), chunk=0)


def test_audit_scales_to_thousands_of_tiles():
    rng = np.random.default_rng(5)
    real = rng.integers(0, 256, (3000, 16, 16, 3), dtype=np.uint8)
    syn = np.concatenate([rng.integers(0, 256, (300, 16, 16, 3), dtype=np.uint8), real[[10, 2999]][:, ::-1]])
    d, i = nearest_thumbnail(syn, real, chunk=256)
    assert d[-2:].tolist() == [0.0, 0.0] and i[-2:].tolist() == [10, 2999]
    assert (d[:-2] > 50).all()  # independent uniform noise: RMS ≈ 255/sqrt(6) ≈ 104, minimised a little


def test_thumbnails_match_ingest_signatures_and_handle_uneven_tile_sizes():
    from histodiff_ray.data.images import dihedral_signature

    for size in (64, 32, 72, 40):  # 72 and 40 are not multiples of 16: fractional box weights
        tiles = _tiles(4, seed=6, size=size)
        thumbs = box_thumbnails(tiles)
        assert thumbs.shape == (4, 16, 16, 3) and thumbs.dtype == np.float32
        if size % 16 == 0:
            # a plain block mean, and ingest's signature up to PIL's uint8 rounding
            b = size // 16
            ref = tiles.reshape(4, 16, b, 16, b, 3).mean(axis=(2, 4))
            np.testing.assert_allclose(thumbs, ref, atol=1e-4)
            pil = np.stack([dihedral_signature(t) for t in tiles]).astype(np.float32)
            assert np.abs(thumbs - pil).max() <= 1.0
        else:
            # area weights: every pixel counts equally, so the overall mean is preserved
            np.testing.assert_allclose(thumbs.mean(axis=(1, 2)), tiles.mean(axis=(1, 2)), atol=1e-3)
        # rotated/flipped copies stay (numerically) at distance 0 for uneven sizes too
        d = nearest_real_distance(np.ascontiguousarray(np.rot90(tiles, 1, axes=(1, 2))[:, ::-1]), tiles)
        assert d.max() < 1e-3


def test_batched_views_are_dedupes_views():
    from histodiff_ray.data.dedupe import _dihedral_flat
    from histodiff_ray.selection import _dihedral_views

    thumbs = box_thumbnails(_tiles(3, seed=7))
    batched = _dihedral_views(thumbs)
    for t, v in zip(thumbs, batched):
        np.testing.assert_array_equal(v.reshape(8, -1), _dihedral_flat(t.reshape(-1), t.shape))
