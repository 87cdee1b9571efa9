import io

import numpy as np
from PIL import Image

from histodiff_ray.data.dedupe import assign_groups
from histodiff_ray.data.images import dihedral_signature


def _jpeg_roundtrip(rgb: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return np.asarray(Image.open(buf).convert("RGB"))


def _real_tiles(shared_data, n):
    paths = sorted((shared_data / "crc5" / "train" / "T").glob("*.jpg"))[:n]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_rotated_flipped_reencoded_copies_form_groups_and_distinct_tiles_do_not(shared_data):
    tiles = _real_tiles(shared_data, 6)
    copies = [
        _jpeg_roundtrip(np.rot90(tiles[0], 1)),
        _jpeg_roundtrip(tiles[1][:, ::-1]),
        _jpeg_roundtrip(np.clip(np.rot90(tiles[2], 2).astype(int) + 3, 0, 255).astype(np.uint8)),  # + brightness
    ]
    all_tiles = tiles + copies
    sigs = np.stack([dihedral_signature(t) for t in all_tiles])
    ids = [f"id{i:02d}" for i in range(len(all_tiles))]
    groups = assign_groups(sigs, ids, [None] * len(ids))
    assert groups[6] == groups[0] == "id00"
    assert groups[7] == groups[1] == "id01"
    assert groups[8] == groups[2] == "id02"
    assert len({groups[i] for i in range(6)}) == 6  # different tissue stays apart


def test_new_copies_join_stored_groups_and_stored_groups_never_change(shared_data):
    tiles = _real_tiles(shared_data, 3)
    stored = [dihedral_signature(t) for t in tiles]
    new = [dihedral_signature(_jpeg_roundtrip(np.rot90(tiles[1], 3)))]
    known = ["gA", "gB", "gC"]
    groups = assign_groups(np.stack(stored + new), ["a", "b", "c", "z"], known + [None])
    assert groups == ["gA", "gB", "gC", "gB"]
