"""The noise-aware latent classifier p(y | z_t, t) used for classifier guidance.

After guided-diffusion's ``EncoderUNetModel`` (Dhariwal & Nichol 2021): a sinusoidal timestep
embedding and MLP, the encoder half of a UNet (ResBlocks with GroupNorm, SiLU and scale-shift time
conditioning; ResBlock downsampling between levels; self-attention at the downsample rates listed in
``attention_resolutions``, 2**level as in models/unet.py), a middle block (ResBlock, attention,
ResBlock), GroupNorm + SiLU, then pooling to one vector per sample and a linear head.

``pool="attention"`` is guided-diffusion's / CLIP's AttentionPool2d: the mean token is prepended to
the spatial tokens, a learnable positional embedding is added, and the mean token attends to all of
them. ``pool="mean"`` averages over space. As in models/unet.py, ``num_heads`` is the head count at
the base width: the head size ``width // num_heads`` is fixed and wider levels get more heads.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from histodiff_ray.config import ClassifierConfig


class AttentionPool2d(nn.Module):
    """Pool (N, C, H, W) to (N, C): the mean token attends to itself and the H·W spatial tokens."""

    def __init__(self, spatial_size: int, channels: int, heads: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(spatial_size**2 + 1, channels) / channels**0.5)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # N, HW, C
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos.to(x.dtype)
        out, _ = self.attn(tokens[:, :1], tokens, tokens, need_weights=False)
        return out[:, 0]


class NoiseAwareClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = 16,
        num_classes: int = 2,
        width: int = 64,
        depth: int = 1,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        attention_resolutions: tuple[int, ...] = (4,),
        num_heads: int = 4,
        pool: str = "attention",
        dropout: float = 0.0,
    ):
        super().__init__()
        if pool not in ("attention", "mean"):
            raise ValueError(f"pool must be 'attention' or 'mean', got {pool!r}")
        if sample_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"sample_size {sample_size} does not allow {len(channel_mult) - 1} downsamplings")
        head_dim = max(1, width // num_heads)
        groups = math.gcd(32, width)  # GroupNorm(32) as in guided-diffusion, fewer for narrow widths
        temb = 4 * width
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)  # guided-diffusion's [cos, sin]
        self.time_embed = TimestepEmbedding(width, temb)

        def res(cin: int, cout: int, down: bool = False) -> ResnetBlock2D:
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=groups, eps=1e-5,
                                 dropout=dropout, time_embedding_norm="scale_shift", down=down)

        def attn(ch: int) -> Attention:
            return Attention(ch, heads=ch // head_dim, dim_head=head_dim, norm_num_groups=groups, eps=1e-5,
                             residual_connection=True, bias=True, upcast_softmax=True, _from_deprecated_attn_block=True)

        ch = width * channel_mult[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        for level, mult in enumerate(channel_mult):
            for _ in range(depth):
                blocks.append(res(ch, width * mult))
                ch = width * mult
                if 2**level in attention_resolutions:
                    blocks.append(attn(ch))
            if level < len(channel_mult) - 1:
                blocks.append(res(ch, ch, down=True))
        self.down = nn.ModuleList(blocks)
        self.mid = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])
        self.norm_out = nn.GroupNorm(groups, ch, eps=1e-5)
        final_size = sample_size // 2 ** (len(channel_mult) - 1)
        self.attn_pool = AttentionPool2d(final_size, ch, max(1, ch // head_dim)) if pool == "attention" else None
        self.head = nn.Linear(ch, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Pooled feature vectors, N × feature_dim."""
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        emb = self.time_embed(self.time_proj(t).to(z.dtype))
        h = self.conv_in(z)
        for block in [*self.down, *self.mid]:
            h = block(h, emb) if isinstance(block, ResnetBlock2D) else block(h)
        h = nn.functional.silu(self.norm_out(h))
        return self.attn_pool(h) if self.attn_pool is not None else h.mean(dim=(2, 3))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits, N × num_classes."""
        return self.head(self.features(z, t))


def build_classifier(cfg: ClassifierConfig, latent_channels: int, latent_size: int, num_classes: int) -> NoiseAwareClassifier:
    return NoiseAwareClassifier(
        in_channels=latent_channels,
        sample_size=latent_size,
        num_classes=num_classes,
        width=cfg.width,
        depth=cfg.depth,
        channel_mult=tuple(cfg.channel_mult),
        attention_resolutions=tuple(cfg.attention_resolutions),
        num_heads=cfg.num_heads,
        pool=cfg.pool,
    )
