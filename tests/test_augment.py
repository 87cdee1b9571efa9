"""Augmentation: random dihedral views (each sample one of the 8 flips/rotations, nothing else
changes) and HED stain jitter (colour deconvolution, each stain changed on its own)."""

import pytest
import torch

from histodiff_ray.augment import (
    HED_STAINS,
    dihedral,
    random_dihedral,
    random_stain_jitter,
    rgb_to_stains,
    stains_to_rgb,
)


def test_the_eight_elements_are_distinct_and_each_sample_is_one_of_them():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    views = [dihedral(x[0], k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    out = random_dihedral(x.repeat(16, 1, 1, 1), torch.Generator().manual_seed(0))
    seen = set()
    for i, sample in enumerate(out):
        matches = [k for k in range(8) if torch.equal(sample, dihedral(x[i % 2], k))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) >= 6  # per-sample draws, not one transform for the whole batch


def _tissue(n: int, seed: int) -> torch.Tensor:
    """H&E-like tiles in [-1, 1]: purple and pink pixels, none black or white (nothing clips)."""
    g = torch.Generator().manual_seed(seed)
    purple, pink = torch.tensor([110.0, 70.0, 160.0]), torch.tensor([225.0, 140.0, 185.0])
    share = torch.rand(n, 1, 8, 8, generator=g)
    rgb = share * purple[:, None, None] + (1 - share) * pink[:, None, None] + 10 * torch.randn(n, 3, 8, 8, generator=g)
    return rgb.clamp(30, 240) / 127.5 - 1


def test_stain_deconvolution_round_trips_and_zero_jitter_is_the_identity():
    x = _tissue(4, 0).double()
    torch.testing.assert_close(stains_to_rgb(rgb_to_stains(x)), x)
    torch.testing.assert_close(random_stain_jitter(x, 0.0, torch.Generator().manual_seed(0)), x)
    x32 = _tissue(4, 0)  # the float32 path that training takes
    torch.testing.assert_close(stains_to_rgb(rgb_to_stains(x32)), x32, atol=1e-4, rtol=0)


@pytest.mark.parametrize("stain", [0, 1, 2])
def test_a_pixel_of_one_pure_stain_deconvolves_to_that_stain_alone(stain):
    density = 0.6
    optical_density = density * HED_STAINS[stain]  # haematoxylin, eosin or DAB alone
    x = (torch.exp(-optical_density) * 2 - 1).reshape(1, 3, 1, 1)
    expected = torch.zeros(3, dtype=torch.float64)
    expected[stain] = density
    torch.testing.assert_close(rgb_to_stains(x).flatten(), expected)


def test_stain_jitter_changes_haematoxylin_and_eosin_separately_and_stays_in_range():
    x = _tissue(64, 1).double()
    out = random_stain_jitter(x, 0.05, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1 and not torch.equal(out, x)
    before, after = rgb_to_stains(x), rgb_to_stains(out)
    # Each tile's stains are an affine map of its own: fit the slope per tile and stain.
    b, a = before.flatten(2), after.flatten(2)
    bc, ac = b - b.mean(2, keepdim=True), a - a.mean(2, keepdim=True)
    slope = (bc * ac).sum(2) / (bc * bc).sum(2)  # tiles × (H, E, DAB)
    assert ((slope - 1).abs() <= 0.05 + 1e-6).all()  # α in [1 − σ, 1 + σ]
    h, e = slope[:, 0], slope[:, 1]
    assert (h - e).abs().max() > 0.02  # H and E drawn apart, not one colour shift for both
    assert torch.corrcoef(torch.stack([h, e]))[0, 1].abs() < 0.5
    # Pure haematoxylin scaled alone leaves the eosin density where it was.
    stains = rgb_to_stains(x)
    h_only = stains_to_rgb(stains * torch.tensor([1.2, 1.0, 1.0], dtype=x.dtype)[None, :, None, None])
    torch.testing.assert_close(rgb_to_stains(h_only)[:, 1], stains[:, 1])
    assert (rgb_to_stains(h_only)[:, 0] - stains[:, 0]).abs().max() > 0.01
