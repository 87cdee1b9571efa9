"""The autoencoder's objective is LDM's: the KL weighed against a reconstruction summed over pixels."""

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from histodiff_ray.config import ConfigError, load_config
from histodiff_ray.models.autoencoder import autoencoder_loss, build_autoencoder


def ldm_loss(x, recon, posterior, kl_weight):
    """LDM's LPIPSWithDiscriminator at logvar 0, without LPIPS and GAN: per-tile sums, batch mean."""
    nll = (x - recon).abs().sum() / x.shape[0]
    kl = posterior.kl().sum() / x.shape[0]
    return nll + kl_weight * kl


@pytest.mark.parametrize("tile", [64, 256])
def test_kl_to_reconstruction_ratio_is_ldms(tile):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, tile, tile, generator=g) * 2 - 1
    recon = x + 0.1 * torch.randn(x.shape, generator=g)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, tile // 4, tile // 4, generator=g))
    ours, rec, kl = autoencoder_loss(x, recon, posterior.kl(), kl_weight=1e-6)
    # Our loss is LDM's divided by the pixel values of one tile (a mean L1, so LRs keep their scale).
    torch.testing.assert_close(ours * x[0].numel(), ldm_loss(x, recon, posterior, 1e-6), rtol=1e-5, atol=0)
    torch.testing.assert_close(rec, (x - recon).abs().mean())
    # At kl_weight 1e-6 the KL is a small regulariser: well under 1 % of the reconstruction term here.
    assert (ours - rec) < 0.01 * rec


def test_norm_groups_reach_every_block_and_must_divide_the_widths():
    cfg = load_config("cpu", ["autoencoder.norm_groups=8"])
    vae = build_autoencoder(cfg.autoencoder, cfg.data.tile_size)
    groups = {m.num_groups for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}
    with pytest.raises(ConfigError, match="autoencoder.norm_groups"):
        load_config("cpu", ["autoencoder.norm_groups=24"])
