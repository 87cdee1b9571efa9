"""The KL autoencoder (diffusers ``AutoencoderKL``) built from config: f = 2^(len(channels) - 1)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from histodiff_ray.config import AutoencoderConfig


def build_autoencoder(cfg: AutoencoderConfig, tile_size: int) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=tile_size,
    )


def load_autoencoder(folder: str) -> AutoencoderKL:
    """A diffusers-format autoencoder folder (safetensors weights; nothing is unpickled)."""
    return AutoencoderKL.from_pretrained(folder, use_safetensors=True)


def autoencoder_loss(x: torch.Tensor, recon: torch.Tensor, kl_per_tile: torch.Tensor, kl_weight: float) -> tuple:
    """LDM's autoencoder objective (``LPIPSWithDiscriminator`` without its LPIPS and GAN terms),
    divided by the pixel values per tile so that it reads as a mean L1.

    LDM sums |x − x̂| over a tile's pixels and the KL over its latent dimensions, both per tile, and
    weighs the KL by ``kl_weight``. Averaging the L1 over pixels but not the KL would make the KL
    C·H·W times stronger (12,288× at 64 px): the latents then carry little. Returns
    (loss, mean L1, KL per tile).
    """
    rec = (x - recon).abs().mean()
    kl = kl_per_tile.mean()
    return rec + kl_weight * kl / x[0].numel(), rec, kl


def decoder_loss(x: torch.Tensor, recon: torch.Tensor) -> tuple:
    """The decoder-only phase's objective (encoder frozen): mean L1 + mean squared error. PSNR is an
    MSE measure, and L1 alone leaves the mean colour a little off. Returns (loss, mean L1, MSE)."""
    l1 = (x - recon).abs().mean()
    mse = ((x - recon) ** 2).mean()
    return l1 + mse, l1, mse
