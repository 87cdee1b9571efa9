"""Which synthetic tiles to keep (step 3 of HistoDiffusion): only those that match their target class
with high confidence, that are not copies of a real training tile, and at most ``max_per_class``
of them per class.

Pure numpy/torch, no Ray. The inputs come from a "judge" classifier trained on the real labeled
tiles: its softmax ``probs`` and penultimate ``features`` on the N synthetic tiles, and the class
``centroids`` of its features over the real labeled train tiles (:func:`class_centroids`).
``real_distance`` is each synthetic tile's distance to its nearest real training tile
(:func:`nearest_real_distance`).

Rules (``cfg`` is a :class:`~histodiff_ray.config.SelectionConfig`); a dropped tile records the
first rule it fails, in this order:

1. ``near_copy``: ``real_distance[i] < cfg.min_real_distance`` (the memorization audit; a
   threshold of 0 disables it, and then ``real_distance`` may be None). It comes first because a
   memorized copy must never be kept, whatever the judge thinks of it.
2. ``low_confidence``: ``probs[i, target[i]] < cfg.confidence_threshold`` (compared in the dtype
   of ``probs``, so a float32 probability of 0.9 passes a threshold of 0.9).
3. ``centroid_mismatch``: the nearest class centroid to ``features[i]`` is not ``target[i]``.
   Nearness is cosine similarity between the L2-normalised feature and the L2-normalised centroid:
   penultimate features of a ReLU/pooled network vary mostly in norm with the tile's contrast, and
   the direction is what carries the class (the same reason :func:`class_centroids` averages
   normalised features). Exact ties go to the lower class index; a non-finite feature row matches
   no centroid (``nearest_centroid`` = -1).
4. ``over_cap``: among the tiles that pass 1-3, each class keeps its ``cfg.max_per_class`` most
   confident tiles; equal confidences are broken by the lower tile index, so the result does not
   depend on sort stability or input order of equal scores.

Every per-rule flag and score is returned as well (:class:`Selection`), not only the first reason,
so a report can show e.g. how many near-copies the judge would also have rejected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from histodiff_ray.config import SelectionConfig
from histodiff_ray.data.images import SIGNATURE_SIZE

REASONS = ("near_copy", "low_confidence", "centroid_mismatch", "over_cap")


@dataclass
class Selection:
    """Per synthetic tile (all arrays have length N)."""

    kept: np.ndarray  # bool
    reason: np.ndarray  # str: "" when kept, else the first failing rule (see REASONS)
    confidence: np.ndarray  # float: probs[i, target[i]]
    nearest_centroid: np.ndarray  # int: argmax of cosine similarity to the centroids (-1: non-finite features)
    centroid_similarity: np.ndarray  # float: cosine similarity to the target class's centroid
    real_distance: np.ndarray  # float: as given (NaN when the audit was disabled and none given)
    target: np.ndarray  # int
    # Every rule's verdict on its own, whatever the first failing rule was:
    near_copy: np.ndarray  # bool
    low_confidence: np.ndarray  # bool
    centroid_mismatch: np.ndarray  # bool
    over_cap: np.ndarray  # bool (only ever True for tiles that passed the other three rules)

    def counts(self) -> dict[str, int]:
        """How many tiles were kept and how many were dropped for each (first) reason."""
        out = {"kept": int(self.kept.sum())}
        for r in REASONS:
            out[r] = int((self.reason == r).sum())
        return out

    def kept_per_class(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.target[self.kept], minlength=num_classes)


def _numpy(x, name: str, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    return arr


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def class_centroids(features, labels, num_classes: int) -> np.ndarray:
    """K × D: the mean of the L2-normalised features of each class's tiles (float32).

    Raises ValueError naming the class index when a class has no tile, or when a label is out of
    range.
    """
    feats = _numpy(features, "features", np.float64)
    labs = _numpy(labels, "labels").astype(np.int64).reshape(-1)
    if feats.ndim != 2 or feats.shape[0] != labs.shape[0]:
        raise ValueError(
            f"class_centroids: features must be N×D with N = len(labels); got {feats.shape} and {labs.shape}"
        )
    bad = labs[(labs < 0) | (labs >= num_classes)]
    if bad.size:
        raise ValueError(f"class_centroids: label {int(bad[0])} is outside 0..{num_classes - 1}")
    counts = np.bincount(labs, minlength=num_classes)
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise ValueError(
            f"class_centroids: class {int(missing[0])} has no tiles (classes without tiles: "
            f"{[int(m) for m in missing]}); every class needs real labeled tiles for its centroid"
        )
    sums = np.zeros((num_classes, feats.shape[1]))
    np.add.at(sums, labs, _l2_normalise(feats))
    return (sums / counts[:, None]).astype(np.float32)


def nearest_centroid_scores(features, centroids, target) -> tuple[np.ndarray, np.ndarray]:
    """(nearest_centroid, centroid_similarity) per tile: the class whose centroid has the highest
    cosine similarity with the feature (ties: the lower class index; a non-finite feature row: -1),
    and the cosine similarity with the target class's centroid."""
    f = _numpy(features, "features", np.float64)
    c = _numpy(centroids, "centroids", np.float64)
    tgt = _numpy(target, "target").astype(np.int64).reshape(-1)
    if f.ndim != 2 or c.ndim != 2 or f.shape[1] != c.shape[1] or f.shape[0] != tgt.shape[0]:
        raise ValueError(f"features (N×D), centroids (K×D) and target (N) disagree: {f.shape}, {c.shape}, {tgt.shape}")
    if tgt.size and (tgt.min() < 0 or tgt.max() >= c.shape[0]):
        bad = int(tgt.min() if tgt.min() < 0 else tgt.max())
        raise ValueError(f"target holds class {bad} outside 0..{c.shape[0] - 1}")
    sim = _l2_normalise(f) @ _l2_normalise(c).T  # N×K cosine similarities
    finite = np.isfinite(sim).all(axis=1)
    nearest = np.where(finite, np.argmax(np.where(finite[:, None], sim, 0.0), axis=1), -1).astype(np.int64)
    return nearest, sim[np.arange(len(tgt)), tgt]


def _rules(
    target: np.ndarray, confidence: np.ndarray, nearest_centroid: np.ndarray, real_distance, cfg: SelectionConfig
) -> dict[str, np.ndarray]:
    n = target.shape[0]
    if confidence.shape != (n,) or nearest_centroid.shape != (n,):
        raise ValueError(
            f"confidence and nearest_centroid must have N = {n} values; got "
            f"{confidence.shape} and {nearest_centroid.shape}"
        )
    if real_distance is None:
        if cfg.min_real_distance > 0:
            raise ValueError("selection.min_real_distance > 0 needs real_distance (nearest_real_distance)")
        dist = np.full(n, np.nan)
    else:
        dist = _numpy(real_distance, "real_distance", np.float64).reshape(-1)
        if dist.shape[0] != n:
            raise ValueError(f"real_distance must have N = {n} values; got {dist.shape[0]}")
        if cfg.min_real_distance > 0 and np.isnan(dist).any():
            raise ValueError("real_distance has NaN values while the memorization audit is on")
    if not np.issubdtype(confidence.dtype, np.floating):
        confidence = confidence.astype(np.float64)
    near_copy = dist < cfg.min_real_distance if cfg.min_real_distance > 0 else np.zeros(n, dtype=bool)
    # Compare in the probabilities' own precision: float32(0.9) < 0.9 in float64.
    low_confidence = ~(confidence >= np.asarray(cfg.confidence_threshold, dtype=confidence.dtype))
    centroid_mismatch = nearest_centroid != target

    passed = ~(near_copy | low_confidence | centroid_mismatch)
    over_cap = np.zeros(n, dtype=bool)
    for cls in np.unique(target[passed]):
        members = np.flatnonzero(passed & (target == cls))
        # Highest confidence first; lexsort's last key is primary, the index breaks ties.
        order = members[np.lexsort((members, -confidence[members].astype(np.float64)))]
        over_cap[order[cfg.max_per_class :]] = True

    reason = np.full(n, "", dtype=object)
    for flags, name in reversed(list(zip((near_copy, low_confidence, centroid_mismatch, over_cap), REASONS))):
        reason[flags] = name  # reversed: the earliest failing rule is written last and wins
    return {
        "kept": passed & ~over_cap,
        "reason": reason.astype(str) if n else np.zeros(0, dtype="<U1"),
        "real_distance": dist,
        "near_copy": near_copy,
        "low_confidence": low_confidence,
        "centroid_mismatch": centroid_mismatch,
        "over_cap": over_cap,
    }


def _target(target) -> np.ndarray:
    tgt = _numpy(target, "target").reshape(-1)
    if tgt.size and not np.issubdtype(tgt.dtype, np.integer) and not np.all(np.equal(np.mod(tgt, 1), 0)):
        raise ValueError("target must hold integer class indices")
    return tgt.astype(np.int64)


def decide(target, confidence, nearest_centroid, real_distance, cfg: SelectionConfig) -> tuple[np.ndarray, np.ndarray]:
    """The rules applied to stored scores (``confidence`` = p(target), ``nearest_centroid`` from
    :func:`nearest_centroid_scores`): (kept bool N, reason str N). Same result as :func:`select`."""
    tgt = _target(target)
    out = _rules(
        tgt,
        _numpy(confidence, "confidence").reshape(-1),
        _numpy(nearest_centroid, "nearest_centroid").astype(np.int64).reshape(-1),
        real_distance,
        cfg,
    )
    return out["kept"], out["reason"]


def select(target, probs, features, centroids, real_distance, cfg: SelectionConfig) -> Selection:
    """Apply the rules of the module docstring; see :class:`Selection` for what comes back."""
    tgt = _target(target)
    p = _numpy(probs, "probs")
    n = tgt.shape[0]
    if p.ndim != 2 or p.shape[0] != n:
        raise ValueError(f"select: probs must be N×K with N = len(target) = {n}; got {p.shape}")
    k = p.shape[1]
    c = _numpy(centroids, "centroids")
    if c.ndim != 2 or c.shape[0] != k:
        raise ValueError(f"select: centroids must be K×D with K = {k} (the classes of probs); got {c.shape}")
    if n and (tgt.min() < 0 or tgt.max() >= k):
        raise ValueError(
            f"select: target holds class {int(tgt.min() if tgt.min() < 0 else tgt.max())} outside 0..{k - 1}"
        )
    confidence = p[np.arange(n), tgt]
    nearest, similarity = nearest_centroid_scores(features, c, tgt)
    out = _rules(tgt, confidence, nearest, real_distance, cfg)
    return Selection(confidence=confidence, nearest_centroid=nearest, centroid_similarity=similarity, target=tgt, **out)


# ---------------------------------------------------------------------------------------------
# Memorization audit: how far is each synthetic tile from its nearest real training tile?
#
# The thumbnails are the same 16×16 box-filtered views as ingest's ``dihedral_signature`` (and the
# 8 rotations/flips are dedupe's ``_dihedral_flat``, batched), but kept as exact float block means:
# ``dihedral_signature`` goes through PIL, which rounds to uint8 between its horizontal and
# vertical passes, so a rotated copy of a tile reads ~0.4 grey levels away instead of 0.


def _box_weights(size: int, out: int) -> np.ndarray:
    """out × size area weights of a box filter from ``size`` to ``out`` pixels (rows sum to 1)."""
    edges = np.arange(out + 1) * (size / out)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(size)[None, :]
    overlap = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def box_thumbnails(tiles: np.ndarray, size: int = SIGNATURE_SIZE) -> np.ndarray:
    """N×size×size×3 float32 box-filtered thumbnails (0-255 units) of uint8 N×H×W×3 tiles.

    When ``size`` divides H and W every thumbnail pixel is the plain mean of its block, so
    thumbnails of a rotated/flipped tile are exactly the rotated/flipped thumbnails (and within a
    grey level of ``dihedral_signature``). Otherwise each thumbnail pixel is the area-weighted mean
    of the pixels its box overlaps (mirror-symmetric weights; PIL's BOX instead takes whole pixels
    by their centres), and the equality holds to float rounding.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be a uint8 N×H×W×3 array; got {tiles.dtype} {tiles.shape}")
    n, h, w, c = tiles.shape
    if h < size or w < size:
        raise ValueError(f"tiles of {w}×{h} px are smaller than the {size}×{size} thumbnail")
    if h % size == 0 and w % size == 0:
        # Block sums of integers are exact in float32 (< 2**24), so a block's mean does not depend
        # on the order its pixels are summed in: a rotated tile gives the rotated thumbnail exactly.
        out = np.empty((n, size, size, c), dtype=np.float32)
        with torch.no_grad():
            for i0 in range(0, n, 512):
                x = torch.from_numpy(np.ascontiguousarray(tiles[i0 : i0 + 512])).permute(0, 3, 1, 2).float()
                pooled = torch.nn.functional.avg_pool2d(x, (h // size, w // size))
                out[i0 : i0 + 512] = pooled.permute(0, 2, 3, 1).numpy()
        return out
    wh, ww = _box_weights(h, size), _box_weights(w, size)
    return np.einsum("ih,nhwc,jw->nijc", wh, tiles.astype(np.float64), ww, optimize=True).astype(np.float32)


def _dihedral_views(batch: np.ndarray) -> np.ndarray:
    """B×8×s×s×C: the 8 rotations/flips of each B×s×s×C thumbnail, in the order of dedupe's
    ``_dihedral_flat`` (rot90 by k = 0..3, each followed by its left-right mirror), for a whole
    batch at once."""
    out = []
    for k in range(4):
        r = np.rot90(batch, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return np.stack(out, axis=1)


def nearest_thumbnail(
    synthetic_thumbs: np.ndarray, real_thumbs: np.ndarray, chunk: int = 1024, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index) of the nearest real thumbnail to each synthetic one, minimised over the 8
    rotations/flips of the synthetic thumbnail. Distance: RMS difference in 0-255 grey levels,
    with no brightness centring (unlike dedupe: for the audit a darker copy is a different tile).
    Ingest's stored uint8 signatures may be passed here as well.

    The search is float32 matrix products over blocks of ``chunk`` synthetic (× 8 views) × ``chunk``
    real thumbnails, O(8·N·M·768) flops: ~2 s for 2,000 × 10,000 on 2 CPU cores; pass
    ``device="cuda"`` on a GPU. The winning pair's distance is then recomputed in float64, so an
    exact copy reads 0.0 and the result does not depend on ``chunk``. No real tile: (inf, -1).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    syn = np.asarray(synthetic_thumbs)
    real = np.asarray(real_thumbs)
    if syn.ndim != 4 or real.ndim != 4 or syn.shape[1:] != real.shape[1:] or syn.shape[1] != syn.shape[2]:
        raise ValueError(f"thumbnails must be N×s×s×C arrays of one shape; got {syn.shape} and {real.shape}")
    n, m = syn.shape[0], real.shape[0]
    best_d = np.full(n, np.inf)
    best_j = np.full(n, -1, dtype=np.int64)
    if n == 0 or m == 0:
        return best_d, best_j
    dim = int(np.prod(syn.shape[1:]))

    def views(rows: np.ndarray) -> np.ndarray:
        return _dihedral_views(rows).reshape(len(rows), 8, dim)

    # Centring on mid-grey (both sides, so distances are unchanged) keeps the norms small and the
    # float32 expansion |a|² + |b|² - 2ab accurate.
    r = (
        torch.tensor(real.reshape(m, dim), dtype=torch.float32, device=device) - 127.5
    )  # a copy: `real` may be read-only
    r_sq = (r * r).sum(-1)
    with torch.no_grad():
        for i0 in range(0, n, chunk):
            v = torch.as_tensor(views(syn[i0 : i0 + chunk]), dtype=torch.float32, device=device) - 127.5
            b = v.shape[0]
            v = v.reshape(b * 8, dim)
            v_sq = (v * v).sum(-1)
            best = torch.full((b,), float("inf"), device=device)
            arg = torch.zeros(b, dtype=torch.int64, device=device)
            for j0 in range(0, m, chunk):
                d2 = v_sq[:, None] + r_sq[None, j0 : j0 + chunk] - 2.0 * (v @ r[j0 : j0 + chunk].T)  # (b·8)×mj
                val, idx = d2.reshape(b, 8, -1).amin(dim=1).min(dim=1)  # min over views, then real tiles
                better = val < best  # strict: the earliest real tile wins a tie, whatever the chunking
                best = torch.where(better, val, best)
                arg = torch.where(better, idx + j0, arg)
            best_j[i0 : i0 + b] = arg.cpu().numpy()
    # The winning pair's distance in float64 (exactly 0 for a copy), min over the views.
    real_flat = real.reshape(m, dim).astype(np.float64)
    for i0 in range(0, n, chunk):
        diff = views(syn[i0 : i0 + chunk]).astype(np.float64) - real_flat[best_j[i0 : i0 + chunk]][:, None, :]
        best_d[i0 : i0 + chunk] = np.sqrt(np.einsum("nvd,nvd->nv", diff, diff).min(axis=1) / dim)
    return best_d, best_j


def _as_thumbnails(x: np.ndarray) -> np.ndarray:
    """uint8 tiles → their thumbnails; float arrays are taken as thumbnails already."""
    x = np.asarray(x)
    return box_thumbnails(x) if x.dtype == np.uint8 else x


def nearest_real(
    synthetic: np.ndarray, real: np.ndarray, chunk: int = 1024, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(distance, index of the nearest real tile); see :func:`nearest_real_distance`."""
    return nearest_thumbnail(_as_thumbnails(synthetic), _as_thumbnails(real), chunk=chunk, device=device)


def nearest_real_distance(
    synthetic: np.ndarray, real: np.ndarray, chunk: int = 1024, device: str | torch.device = "cpu"
) -> np.ndarray:
    """The memorization-audit distance of each synthetic tile: RMS difference (0-255 units)
    between 16×16 box-filtered thumbnails, minimised over the 8 rotations/flips of the synthetic
    tile and over all real tiles. 0 for an exact, rotated or flipped copy.

    ``synthetic`` (N×H×W×3) and ``real`` (M×H'×W'×3) are uint8 tiles; either may instead be float
    thumbnails from :func:`box_thumbnails` (compute the real set's once and reuse it)."""
    return nearest_real(synthetic, real, chunk=chunk, device=device)[0]
