"""Augmentations that hold for H&E tissue, in pure torch.

* Random elements of the dihedral group D4 (flips and 90° rotations), one per sample. Tissue has no
  orientation, so every tile — and every latent of a tile — is as likely in each of its eight
  orientations: eight times the data for free (pixels for the autoencoder and the tile classifiers,
  latents for the diffusion model and the guide).
* HED stain jitter (Tellez et al. 2019, "Quantifying the effects of data augmentation and stain
  color normalization in convolutional neural networks for computational pathology"): colour
  deconvolution into haematoxylin, eosin and DAB densities (Ruifrok & Johnston 2001), each scaled
  and shifted by its own random factor, and back. Labs and scanners vary the amount of each stain
  separately, which a brightness / saturation jitter of all three channels together cannot imitate.
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


# Ruifrok & Johnston (2001) stain vectors in optical density (rows: haematoxylin, eosin, DAB), unit length.
HED_STAINS = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_STAINS = HED_STAINS / HED_STAINS.norm(dim=1, keepdim=True)
HED_UNMIX = torch.linalg.inv(HED_STAINS)  # optical density → stain densities, computed once rather than per batch


def rgb_to_stains(x: torch.Tensor) -> torch.Tensor:
    """Tiles N×3×H×W in [-1, 1] → stain densities N×3×H×W (haematoxylin, eosin, DAB)."""
    optical_density = -torch.log(((x + 1) * 127.5).clamp(min=1.0) / 255.0)  # a black pixel would be infinitely dense
    return torch.einsum("nchw,cs->nshw", optical_density, HED_UNMIX.to(x.dtype))


def stains_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """The inverse of rgb_to_stains, clamped to [-1, 1]."""
    optical_density = torch.einsum("nshw,sc->nchw", stains, HED_STAINS.to(stains.dtype))
    return (torch.exp(-optical_density) * 2.0 - 1.0).clamp(-1, 1)


def random_stain_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """HED jitter after Tellez et al.: each tile's H, E and DAB densities become ``α·s + β`` with
    α ~ U(1 − σ, 1 + σ) and β ~ U(−σ, σ) drawn per tile and per stain. The densities here are true
    optical densities, so σ is not on the scale of their "HED-light" σ = 0.05 (σ = 0.05 here moves a
    typical H&E pixel by a few grey levels)."""
    alpha = 1 + sigma * (2 * torch.rand(len(x), 3, 1, 1, generator=generator) - 1)
    beta = sigma * (2 * torch.rand(len(x), 3, 1, 1, generator=generator) - 1)
    return stains_to_rgb(alpha.to(x.dtype) * rgb_to_stains(x) + beta.to(x.dtype))
