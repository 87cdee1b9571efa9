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


def test_the_adversarial_decoder_phase_moves_each_model_by_its_own_terms():
    # The decoder learns from L1 + MSE, feature matching and the generator loss; the discriminator
    # from its hinge loss alone; the encoder from nothing (the latents stay as they were).
    from histodiff_ray.models.autoencoder import PatchDiscriminator, adversarial_decoder_loss
    from histodiff_ray.train.autoencoder import AdversarialDecoderObjective

    cfg = load_config("cpu", ["autoencoder.block_out_channels=8,16", "autoencoder.norm_groups=4"])
    torch.manual_seed(0)
    vae, disc = (
        build_autoencoder(cfg.autoencoder, 16),
        PatchDiscriminator(channels=4).eval(),
    )  # eval: fixed spectral norms
    objective = AdversarialDecoderObjective(vae, disc)
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def run(pick):
        vae.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same posterior sample each time
        recon, *disc_out = objective(x)
        terms = adversarial_decoder_loss(
            x, recon, *disc_out, vae.decoder.conv_out.weight, gan_weight=0.1, feature_matching=1.0
        )
        pick(terms).backward()
        return terms, [p.grad for p in disc.parameters()], [p.grad for p in vae.decoder.parameters()]

    (loss, rec, gen, dis, weight), disc_grads, decoder_grads = run(lambda t: t[0])
    assert weight > 0 and all(g is not None and g.abs().sum() > 0 for g in decoder_grads)
    assert all(p.grad is None for p in vae.encoder.parameters())
    _, hinge_only, _ = run(lambda t: t[3])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(disc_grads, hinge_only))
    # Patch logits and three feature maps for a 16 px tile; the hinge loss is 1 for logits at 0.
    logits, features = disc(x)
    assert logits.shape[:2] == (2, 1) and len(features) == 3
