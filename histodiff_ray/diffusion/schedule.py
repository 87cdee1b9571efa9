"""The forward process: β schedule, ᾱ_t, and q(z_t | z_0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from histodiff_ray.config import DiffusionConfig


@dataclass
class NoiseSchedule:
    betas: torch.Tensor  # float64, T
    alphas_cumprod: torch.Tensor  # float64, T

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        T = cfg.num_train_timesteps
        if cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
        else:  # scaled_linear: LDM's (and the paper's) "linear"
            betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls(betas, torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t broadcast to ``like``'s shape and dtype."""
        a = self.alphas_cumprod.to(like.device)[t].to(like.dtype)
        return a.view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε."""
        a = self.alpha_bar(t, z0)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ weights for an ε-prediction loss (Hang et al. 2023): min(SNR_t, γ) / SNR_t, with
        SNR_t = ᾱ_t / (1 − ᾱ_t). Low-noise steps, whose ε is nearly unpredictable and whose loss
        dominates the gradient, are down-weighted; high-noise steps keep weight 1."""
        a = self.alphas_cumprod.to(t.device)[t]
        snr = a / (1 - a)
        return (snr.clamp(max=gamma) / snr).float()
