"""The β schedule is the paper's (LDM's "linear" = linspace(√β₀, √β₁)², diffusers' "scaled_linear")."""

import pytest
import torch
from diffusers import DDPMScheduler

from histodiff_ray.config import DiffusionConfig, load_config
from histodiff_ray.diffusion.schedule import NoiseSchedule


def ldm_alphas_cumprod(cfg: DiffusionConfig) -> torch.Tensor:
    """LDM's make_beta_schedule("linear", …), written out: betas = linspace(√β₀, √β₁, T)²."""
    betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("profile", ["cpu", "paper", None])
def test_every_profile_uses_the_papers_schedule(profile):
    cfg = load_config(profile).diffusion if profile else DiffusionConfig()
    ours = NoiseSchedule.from_config(cfg).alphas_cumprod
    torch.testing.assert_close(ours, ldm_alphas_cumprod(cfg), rtol=1e-12, atol=1e-12)
    # The signal left at t = 250 / 500 / 750 (a true linspace leaves 0.66 / 0.28 / 0.08).
    root = ours[[250, 500, 750]].sqrt()
    torch.testing.assert_close(root, torch.tensor([0.7318, 0.3874, 0.1319], dtype=torch.float64), atol=1e-4, rtol=0)
    # The scheduler folder a run exports says the same.
    exported = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
    )
    torch.testing.assert_close(exported.alphas_cumprod.double(), ours, rtol=1e-6, atol=1e-7)


def test_min_snr_weights_cap_the_signal_to_noise_ratio_at_gamma():
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    t = torch.arange(1000)
    a = schedule.alphas_cumprod
    snr = a / (1 - a)
    w = schedule.min_snr_weight(t, 5.0)
    torch.testing.assert_close(
        w.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr, rtol=1e-6, atol=0
    )
    assert (w[snr <= 5] == 1).all() and (w[snr > 5] < 1).all() and (w.diff() >= 0).all()
