"""The forward process: β schedule, ᾱ_t, q(z_t | z_0), and what the UNet predicts of it: ε, or
v = √ᾱ_t ε − √(1 − ᾱ_t) z_0 (Salimans & Ho 2022), whose scale stays ~1 at every t."""

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

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """What the UNet learns to predict for z_t = q_sample(z0, t, noise): ε, or v (diffusers'
        ``DDPMScheduler.get_velocity``)."""
        if prediction_type == "epsilon":
            return noise
        a = self.alpha_bar(t, z0)
        return a.sqrt() * noise - (1 - a).sqrt() * z0

    def eps(self, prediction: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """ε from the UNet's output at z_t: the output itself, or √ᾱ_t v + √(1 − ᾱ_t) z_t. The samplers
        and guidance work in ε, so a v-model is one conversion away from all of them."""
        if prediction_type == "epsilon":
            return prediction
        a = self.alpha_bar(t, z_t)
        return a.sqrt() * prediction + (1 - a).sqrt() * z_t

    def min_snr_weight(self, t: torch.Tensor, gamma: float, prediction_type: str = "epsilon") -> torch.Tensor:
        """Min-SNR-γ weights (Hang et al. 2023), SNR_t = ᾱ_t / (1 − ᾱ_t): min(SNR_t, γ) / SNR_t for an
        ε loss, min(SNR_t, γ) / (SNR_t + 1) for a v loss (the same weight on the clean estimate's error).
        Low-noise steps, whose target is nearly determined by z_t and whose loss dominates the gradient,
        are down-weighted."""
        a = self.alphas_cumprod.to(t.device)[t]
        snr = a / (1 - a)
        return (snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)).float()
