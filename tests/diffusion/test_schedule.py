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


def test_v_target_is_diffusers_velocity_and_converts_back_to_the_noise():
    cfg = DiffusionConfig(prediction_type="v_prediction")
    schedule = NoiseSchedule.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    reference = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type="v_prediction",
    )
    v = schedule.target(z0, noise, t, "v_prediction")
    torch.testing.assert_close(v, reference.get_velocity(z0, noise, t), rtol=1e-5, atol=1e-5)
    z_t = schedule.q_sample(z0, t, noise)
    torch.testing.assert_close(schedule.eps(v, z_t, t, "v_prediction"), noise, rtol=1e-5, atol=1e-5)
    # An ε-model's output is its ε; the target of an ε loss is the noise itself.
    assert schedule.eps(noise, z_t, t, "epsilon") is noise and schedule.target(z0, noise, t, "epsilon") is noise


def test_min_snr_weights_of_a_v_loss_divide_by_snr_plus_one():
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    t = torch.arange(1000)
    a = schedule.alphas_cumprod
    snr = a / (1 - a)
    w = schedule.min_snr_weight(t, 5.0, "v_prediction")
    torch.testing.assert_close(
        w.double(), torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1), rtol=1e-6, atol=0
    )
    # A v-model's error, seen as ε through the conversion, is √ᾱ times smaller: so an MSE weighted this way
    # equals the ε-loss's min-SNR weighting of the same prediction, step by step.
    g = torch.Generator().manual_seed(1)
    z0, noise, v_hat = (torch.randn(1000, 4, 4, 4, generator=g) for _ in range(3))
    z_t = schedule.q_sample(z0, t, noise)
    v_loss = w * ((v_hat - schedule.target(z0, noise, t, "v_prediction")) ** 2).mean(dim=(1, 2, 3))
    eps_hat = schedule.eps(v_hat, z_t, t, "v_prediction")
    eps_loss = schedule.min_snr_weight(t, 5.0) * ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(v_loss, eps_loss, rtol=1e-4, atol=1e-6)
