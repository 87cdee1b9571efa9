"""The noise-aware latent classifier p(y | z_t, t) used for classifier guidance.

After guided-diffusion's ``EncoderUNetModel`` (Dhariwal & Nichol 2021): the encoder half of the
latent UNet of models/unet.py, built from the same diffusers blocks with the same parameter names
(a sinusoidal timestep embedding and MLP, ResBlocks with scale-shift time conditioning, ResBlock
downsampling between levels, self-attention at the downsample rates in ``attention_resolutions``,
the middle block), then GroupNorm + SiLU, pooling to one vector per sample and a linear head. Sharing
the UNet's layout lets ``init_from_unet`` start the classifier from a trained denoiser, whose
features already see through the noise at every t (``classifier.init_from_unet``).

``pool="attention"`` is guided-diffusion's / CLIP's AttentionPool2d: the mean token is prepended to
the spatial tokens, a learnable positional embedding is added, and the mean token attends to all of
them. ``pool="mean"`` averages over space. As in models/unet.py, ``num_heads`` is the head count at
the base width: the head size ``width // num_heads`` is fixed and wider levels get more heads.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from histodiff_ray.config import ClassifierConfig, UNetConfig
from histodiff_ray.models.unet import build_unet

# The UNet's parameters that the classifier shares (its up path and output layers it has not).
UNET_ENCODER = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")


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
        resnet_time_scale_shift: str = "scale_shift",
        resblock_updown: bool = True,
    ):
        super().__init__()
        if pool not in ("attention", "mean"):
            raise ValueError(f"pool must be 'attention' or 'mean', got {pool!r}")
        if sample_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"sample_size {sample_size} does not allow {len(channel_mult) - 1} downsamplings")
        unet = build_unet(
            UNetConfig(
                base_channels=width,
                channel_mult=list(channel_mult),
                attention_resolutions=list(attention_resolutions),
                num_heads=num_heads,
                layers_per_block=depth,
                resnet_time_scale_shift=resnet_time_scale_shift,
                resblock_updown=resblock_updown,
                dropout=dropout,
            ),
            sample_size,
            in_channels,
        )
        self.time_proj, self.time_embedding, self.conv_in = unet.time_proj, unet.time_embedding, unet.conv_in
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        ch = width * channel_mult[-1]
        self.norm_out = nn.GroupNorm(math.gcd(32, width), ch, eps=1e-5)
        final_size = sample_size // 2 ** (len(channel_mult) - 1)
        head_dim = max(1, width // num_heads)
        self.attn_pool = AttentionPool2d(final_size, ch, max(1, ch // head_dim)) if pool == "attention" else None
        self.head = nn.Linear(ch, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def init_from_unet(self, unet_weights: dict[str, torch.Tensor]) -> None:
        """Copy a trained UNet's timestep embedding, input convolution, down blocks and middle block
        (state dict of models/unet.py's UNet with this classifier's width, depth, levels and
        attention); the norm, pooling and head start fresh."""
        own = self.state_dict()
        wanted = [k for k in own if k.startswith(UNET_ENCODER)]
        missing = [k for k in wanted if k not in unet_weights]
        mismatched = [k for k in wanted if k in unet_weights and unet_weights[k].shape != own[k].shape]
        if missing or mismatched:
            raise ValueError(
                f"the UNet's weights do not fit this classifier (missing {missing[:3]}, other shapes "
                f"{mismatched[:3]}): "
                "build it with the UNet's architecture"
            )
        self.load_state_dict({k: unet_weights[k] for k in wanted}, strict=False)

    def features(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Pooled feature vectors, N × feature_dim."""
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(z.dtype))
        h = self.conv_in(z)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        h = self.mid_block(h, emb)
        h = nn.functional.silu(self.norm_out(h))
        return self.attn_pool(h) if self.attn_pool is not None else h.mean(dim=(2, 3))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits, N × num_classes."""
        return self.head(self.features(z, t))


def build_classifier(
    cfg: ClassifierConfig, latent_channels: int, latent_size: int, num_classes: int, unet: UNetConfig | None = None
) -> NoiseAwareClassifier:
    """The classifier of ``cfg``; with ``unet`` (for ``classifier.init_from_unet``) its encoder takes
    that UNet's architecture instead of the classifier's own width, depth, levels and attention."""
    if unet is not None:
        arch = dict(
            width=unet.base_channels,
            depth=unet.layers_per_block,
            channel_mult=tuple(unet.channel_mult),
            attention_resolutions=tuple(unet.attention_resolutions),
            num_heads=unet.num_heads,
            dropout=unet.dropout,
            resnet_time_scale_shift=unet.resnet_time_scale_shift,
            resblock_updown=unet.resblock_updown,
        )
    else:
        arch = dict(
            width=cfg.width,
            depth=cfg.depth,
            channel_mult=tuple(cfg.channel_mult),
            attention_resolutions=tuple(cfg.attention_resolutions),
            num_heads=cfg.num_heads,
        )
    return NoiseAwareClassifier(
        in_channels=latent_channels, sample_size=latent_size, num_classes=num_classes, pool=cfg.pool, **arch
    )


def load_classifier(folder: str) -> NoiseAwareClassifier:
    """A saved classifier folder; one whose weights do not all fit (e.g. saved with an older layout
    of this module) is an error rather than a guide with random layers."""
    model, info = NoiseAwareClassifier.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"the classifier at {folder} does not fit this version's layout (missing "
            f"{sorted(info['missing_keys'])[:3]}, "
            f"other shapes {info['mismatched_keys'][:3]}); train it again with `histodiff train-classifier`"
        )
    return model
