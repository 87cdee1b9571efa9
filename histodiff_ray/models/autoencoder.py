"""The KL autoencoder (diffusers ``AutoencoderKL``) built from config: f = 2^(len(channels) - 1)."""

from __future__ import annotations

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
        norm_num_groups=32,
        sample_size=tile_size,
    )


def load_autoencoder(folder: str) -> AutoencoderKL:
    """A diffusers-format autoencoder folder (safetensors weights; nothing is unpickled)."""
    return AutoencoderKL.from_pretrained(folder, use_safetensors=True)
