"""Random dihedral augmentation: each sample gets one of the 8 flips/rotations, nothing else changes."""

import torch

from histodiff_ray.augment import dihedral, random_dihedral


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
