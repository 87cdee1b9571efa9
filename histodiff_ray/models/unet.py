"""The latent-space denoiser (diffusers ``UNet2DModel``) built from config.

Block i works at 1/2^i of the latent resolution, so ``attention_resolutions`` (downsample rates,
as in guided-diffusion) select attention blocks directly. diffusers fixes the size of an attention
head rather than the number of heads: ``num_heads`` is the count at the base width, and wider blocks
get proportionally more heads.
"""

from __future__ import annotations

import math

from diffusers import UNet2DModel

from histodiff_ray.config import UNetConfig


def build_unet(
    cfg: UNetConfig,
    latent_size: int,
    latent_channels: int,
    num_train_timesteps: int = 1000,
    num_classes: int | None = None,
) -> UNet2DModel:
    """``num_classes`` adds a class embedding for classifier-free guidance: classes 0…K−1 and the
    null class K (``null_class``), added to the timestep embedding."""
    channels = [cfg.base_channels * m for m in cfg.channel_mult]
    attention = [2**i in cfg.attention_resolutions for i in range(len(channels))]
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(channels),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=max(1, cfg.base_channels // cfg.num_heads),
        resnet_time_scale_shift=cfg.resnet_time_scale_shift,
        downsample_type="resnet" if cfg.resblock_updown else "conv",
        upsample_type="resnet" if cfg.resblock_updown else "conv",
        dropout=cfg.dropout,
        norm_num_groups=math.gcd(32, cfg.base_channels),  # 32 groups; fewer for a narrow classifier encoder
        num_train_timesteps=num_train_timesteps,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def null_class(unet: UNet2DModel) -> int | None:
    """The class index that means "no class" for a class-conditional UNet; None for an unconditional one."""
    n = unet.config.num_class_embeds
    return None if n is None else n - 1
