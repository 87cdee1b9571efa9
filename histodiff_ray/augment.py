"""Random elements of the dihedral group D4 (flips and 90° rotations), one per sample.

Tissue has no orientation, so every tile — and every latent of a tile — is as likely in each of its
eight orientations: eight times the data for free (pixels for the autoencoder and the tile
classifiers, latents for the diffusion model and the guide).
"""

from __future__ import annotations

import torch


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element k in 0…7 of D4 on the last two dimensions: k % 4 quarter turns, then a flip if k ≥ 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each sample of the batch N × … × H × W in its own random orientation (square H = W)."""
    ks = torch.randint(0, 8, (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for k in range(8):  # one batched op per group element, not one per sample
        idx = (ks == k).nonzero().flatten()
        if len(idx):
            out[idx] = dihedral(x[idx], k)
    return out
