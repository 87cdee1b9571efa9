"""The KL autoencoder (diffusers ``AutoencoderKL``) built from config: f = 2^(len(channels) - 1)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from histodiff_ray.config import AutoencoderConfig
from histodiff_ray.models import to_tensor


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


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, tiles: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 tiles N×H×W×3 through the autoencoder (posterior mean, decoded), as uint8 tiles."""
    out = []
    for start in range(0, len(tiles), batch_size):
        x = to_tensor(tiles[start : start + batch_size])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out.append(((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out) if out else tiles


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


class PatchDiscriminator(ModelMixin, ConfigMixin):
    """pix2pix's PatchGAN (LDM's ``NLayerDiscriminator``) for the adversarial decoder phase: a real /
    fake logit per overlapping patch, and the features of each stage for feature matching.
    ``n_layers`` stride-2 stages then one stride-1 stage, as in pix2pix: 2 suit 64 px tiles (each
    logit sees 34 px), LDM uses 3 at 256 px. Spectral norm instead of BatchNorm keeps it stable at
    small batches and under DDP (no batch statistics to sync)."""

    @register_to_config
    def __init__(self, channels: int = 64, n_layers: int = 2):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        widths = [3] + [channels * min(2**i, 8) for i in range(n_layers + 1)]
        self.blocks = torch.nn.ModuleList(
            sn(torch.nn.Conv2d(a, b, 4, 2 if i < n_layers else 1, 1))
            for i, (a, b) in enumerate(zip(widths, widths[1:]))
        )
        self.head = sn(torch.nn.Conv2d(widths[-1], 1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = []
        for block in self.blocks:
            x = F.leaky_relu(block(x), 0.2)
            features.append(x)
        return self.head(x), features


def adversarial_decoder_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    fake_logits: torch.Tensor,
    fake_features: list,
    real_features: list,
    disc_logits: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    gan_weight: float,
    feature_matching: float,
) -> tuple:
    """The adversarial decoder phase's objective, one loss for the decoder and the discriminator.

    Decoder: L1 + MSE (the decoder phase's) + ``feature_matching`` × the mean L1 between the
    discriminator's features of each tile and of its own reconstruction (pix2pixHD: a paired,
    learned perceptual term, since no pretrained LPIPS network can be downloaded here) + an
    adaptive weight × the hinge generator loss on ``fake_logits`` (LDM: ``gan_weight`` × the ratio
    of the two terms' gradient norms at the decoder's ``last_layer``). ``fake_logits`` and
    ``fake_features`` must come from a discriminator whose weights are detached, so this part moves
    the decoder only. Discriminator: the hinge loss on ``disc_logits``, its logits for the real tiles
    followed by those for the detached reconstructions. Returns (loss, reconstruction term, generator
    loss, discriminator loss, adaptive weight)."""
    rec = decoder_loss(x, recon)[0] + feature_matching * sum(
        (f - r).abs().mean() for f, r in zip(fake_features, real_features)
    ) / len(real_features)
    gen = -fake_logits.mean()
    weight = torch.zeros((), device=x.device)
    if gan_weight > 0:
        rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
        gen_grad = torch.autograd.grad(gen, last_layer, retain_graph=True)[0]
        weight = (rec_grad.norm() / (gen_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * gan_weight
    n = len(x)
    disc = 0.5 * (F.relu(1 - disc_logits[:n]).mean() + F.relu(1 + disc_logits[n:]).mean())
    return rec + weight * gen + disc, rec, gen, disc, weight
