"""Duplicate groups: tiles that are the same tissue up to a rotation or flip.

Offline-augmented datasets (crc5 among them) ship rotated/flipped copies of the same tile. After
JPEG re-encoding they are no longer pixel-identical, so they are matched on 16×16 signatures: two
tiles are in one group when some rotation/flip of one lies within ``max_rms`` grey levels (RMS,
after removing each signature's mean brightness) of the other. On crc5 the nearest-copy distances
have an empty band between ~2 and ~8 levels, so the default of 4 sits in the gap. Groups decide
splits together, so copies never straddle train/test.
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_RMS = 4.0


def _dihedral_flat(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The 8 rotations/flips of a flattened H×W×C signature: 8×D."""
    sig = flat.reshape(shape)
    out = []
    for k in range(4):
        r = np.rot90(sig, k, axes=(0, 1))
        out += [r, r[:, ::-1]]
    return np.stack([o.reshape(-1) for o in out])


_BLOCK = 1024
_RANK_BUCKETS = 16


def _rank_profiles(flat: np.ndarray, channels: int) -> np.ndarray:
    """Per channel, the sorted pixel values averaged in 16 rank buckets, scaled by sqrt(bucket).

    Sorting forgets pixel positions, so every rotation/flip has the same profile; and for any
    pixel correspondence, ||profile(a) - profile(b)|| <= ||a - b|| (sorting pairs values optimally,
    averaging contracts). Profiles further apart than the threshold cannot belong to a match.
    """
    n = flat.shape[0]
    per_channel = np.sort(flat.reshape(n, -1, channels), axis=1)  # N×P×C
    pixels = per_channel.shape[1]
    bucket = pixels // _RANK_BUCKETS
    means = per_channel[:, : bucket * _RANK_BUCKETS].reshape(n, _RANK_BUCKETS, bucket, channels).mean(axis=2)
    return (means * np.sqrt(bucket)).reshape(n, -1).astype(np.float32)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def assign_groups(
    signatures: np.ndarray,
    tile_ids: list[str],
    known_groups: list[str | None],
    max_rms: float = DEFAULT_MAX_RMS,
) -> list[str]:
    """Group id per tile.

    ``signatures``: N×h×w×3 uint8. ``known_groups[i]`` is the stored group of a tile ingested
    earlier (it keeps it) or None for a new tile. A new tile within ``max_rms`` of any tile joins
    that tile's group; a group made only of new tiles is named after its smallest tile id.
    """
    n = len(tile_ids)
    if n == 0:
        return []
    # Centred signatures: a copy saved with a small brightness shift still matches.
    flat = signatures.reshape(n, -1).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    dim = flat.shape[1]
    sq_norms = np.einsum("nd,nd->n", flat, flat)
    threshold = max_rms * max_rms * dim
    profiles = _rank_profiles(flat, signatures.shape[-1])
    prof_sq = np.einsum("nd,nd->n", profiles, profiles)
    is_new = np.array([g is None for g in known_groups])
    new_idx = np.flatnonzero(is_new)
    uf = _UnionFind(n)
    for start in range(0, len(new_idx), _BLOCK):
        rows = new_idx[start : start + _BLOCK]
        # Necessary condition, cheap for all pairs at once (see _rank_profiles).
        d2 = prof_sq[rows, None] + prof_sq[None, :] - 2.0 * profiles[rows] @ profiles.T
        d2[np.arange(len(rows)), rows] = np.inf
        for r, i in enumerate(rows):
            cand = np.flatnonzero(d2[r] <= threshold * (1 + 1e-4) + 1e-3)
            if len(cand) == 0:
                continue
            views = _dihedral_flat(flat[i], signatures.shape[1:])  # 8×D; all share one squared norm
            dist2 = sq_norms[cand] + sq_norms[i] - 2.0 * (flat[cand] @ views.T).max(axis=1)
            for j in cand[dist2 <= threshold]:
                uf.union(int(i), int(j))

    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(uf.find(i), []).append(i)
    groups = [""] * n
    for idx in members.values():
        old = sorted({known_groups[i] for i in idx if known_groups[i] is not None})
        name = old[0] if old else min(tile_ids[i] for i in idx)
        for i in idx:
            groups[i] = known_groups[i] if known_groups[i] is not None else name
    return groups
