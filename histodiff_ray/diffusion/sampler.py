"""Samplers in plain torch with optional classifier guidance: DDIM (Song et al. 2021) and
DPM-Solver++(2M) (Lu et al. 2022), which reaches the same samples in fewer steps, as an ODE solver
or in its stochastic (SDE) form, which like DDIM at η = 1 draws fresh noise at every step.

Timesteps are "trailing" (T−1, …, spaced T/steps apart), valid for any step count from 1 to T; the
last step goes to ᾱ = 1. The DPM solvers can instead step along Karras et al. (2022)'s noise
levels (ρ = 7), which spend more of the steps at low noise, where the fine detail is drawn.
Guidance follows Dhariwal & Nichol (2021), Algorithm 2: with ``cond_fn(z, t) = ∇_z log p(y | z_t, t)``,
ε̂ = ε − √(1 − ᾱ_t) · s · cond_fn; both samplers take the guided ε̂ (classifier-free guidance is the
ε-model itself, see guidance.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from histodiff_ray.diffusion.schedule import NoiseSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> predicted ε


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``round(T · (steps − i) / steps) − 1`` for i = 0 … steps − 1, in integer arithmetic.

    A float ``arange(T, 0, −T/steps)`` (diffusers' "trailing" spacing) gains a spurious last
    element for 62 step counts (61, 103, 121, …): a step to ᾱ = 1 half-way and one UNet call at
    t = −1. Consecutive values here differ by at least T/steps ≥ 1, so the list is strictly
    decreasing, has exactly ``steps`` entries and ends at round(T/steps) − 1 ≥ 0.
    """
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, {T}], got {steps}")
    return [(2 * T * (steps - i) + steps) // (2 * steps) - 1 for i in range(steps)]


@torch.no_grad()
def ddim_sample(
    model: ModelFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    eta: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    cond_fn: ModelFn | None = None,
    guidance_scale: float = 0.0,
    noise: torch.Tensor | None = None,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Sample ``shape`` latents. ``noise`` (optional) is the starting z_T; per-step noise is drawn
    from ``generator`` on the CPU so results do not depend on the device. ``generator`` may be a
    list, one per sample: each sample's noise then depends only on its own seed, not on the batch
    it was drawn in."""
    z = noise.to(device) if noise is not None else _randn(shape, generator).to(device)
    ac = schedule.alphas_cumprod
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t = float(ac[t])
        a_prev = float(ac[t_prev]) if t_prev >= 0 else 1.0
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = _guided_eps(model, z, t_batch, (1 - a_t) ** 0.5, cond_fn, guidance_scale)
        z0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
        z = a_prev**0.5 * z0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            z = z + sigma * _randn(shape, generator).to(device)
    return z


@torch.no_grad()
def dpm_solver_sample(
    model: ModelFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 20,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str = "cpu",
    cond_fn: ModelFn | None = None,
    guidance_scale: float = 0.0,
    noise: torch.Tensor | None = None,
    progress: Callable | None = None,
    stochastic: bool = False,
    karras_sigmas: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M): the second-order multistep solver of the diffusion ODE in data prediction,
    deterministic, on ``ddim_sample``'s timesteps. The first step is first order (no earlier
    estimate yet) and so is the last, to ᾱ = 1, which returns the model's clean estimate: diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    final_sigmas_type="zero")``, which tests/diffusion/test_sampler.py matches step for step.
    Arguments as ``ddim_sample``; only the starting noise is random.

    ``stochastic``: SDE-DPM-Solver++(2M) (diffusers' ``algorithm_type="sde-dpmsolver++"``, midpoint),
    the solver of the reverse SDE: each step keeps e^(−h) of the ODE step's carry-over of z and
    replaces the rest with fresh noise from ``generator``, as DDIM at η = 1 does, so that guidance
    acts on a path that can still change course.

    ``karras_sigmas``: step along Karras et al. (2022)'s noise levels instead (diffusers'
    ``use_karras_sigmas=True``): the UNet and the guide see the nearest whole timestep, the solver
    uses the exact level."""
    z = noise.to(device) if noise is not None else _randn(shape, generator).to(device)
    ac = schedule.alphas_cumprod
    levels = karras_levels(schedule, steps) if karras_sigmas else trailing_levels(schedule, steps)
    previous = None  # (the previous step's clean estimate, its log-SNR step h)
    for i, (t, alpha, sigma) in enumerate(progress(levels) if progress else levels):
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = _guided_eps(model, z, t_batch, (1 - float(ac[t])) ** 0.5, cond_fn, guidance_scale)
        z0 = (z - sigma * eps) / alpha
        if i + 1 == len(levels):
            z = z0
            continue
        _, alpha_next, sigma_next = levels[i + 1]
        h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)  # the step in log-SNR / 2
        estimate = z0
        if previous is not None:  # second order: extrapolate the clean estimate linearly in λ
            z0_prev, h_prev = previous
            estimate = z0 + (h / (2 * h_prev)) * (z0 - z0_prev)
        if stochastic:
            kept = math.exp(-2 * h)  # the share of the variance carried over from z
            z = (sigma_next / sigma) * math.exp(-h) * z + alpha_next * (1 - kept) * estimate
            z = z + sigma_next * (1 - kept) ** 0.5 * _randn(shape, generator).to(device)
        else:
            z = (sigma_next / sigma) * z - alpha_next * math.expm1(-h) * estimate
        previous = (z0, h)
    return z


def trailing_levels(schedule: NoiseSchedule, steps: int) -> list[tuple[int, float, float]]:
    """(t, α_t, σ_t) at ``ddim_timesteps``, with α_t² = ᾱ_t and α_t² + σ_t² = 1."""
    ac = schedule.alphas_cumprod
    return [(t, float(ac[t]) ** 0.5, (1 - float(ac[t])) ** 0.5) for t in ddim_timesteps(schedule.num_timesteps, steps)]


def karras_levels(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> list[tuple[int, float, float]]:
    """(t, α, σ) at ``steps`` noise levels σ/α spaced as Karras et al. (2022), eq. 5, from the
    schedule's largest to its smallest; t is the timestep nearest in log σ/α (as diffusers rounds it)."""
    ac = schedule.alphas_cumprod.double().cpu().numpy()
    ratios = np.sqrt((1 - ac) / ac)  # σ/α of every timestep, increasing with t
    top, bottom = ratios[-1] ** (1 / rho), ratios[0] ** (1 / rho)
    levels = (top + np.linspace(0, 1, steps) * (bottom - top)) ** rho
    timesteps = np.interp(np.log(levels), np.log(ratios), np.arange(len(ratios))).round()
    alphas = 1 / np.sqrt(levels**2 + 1)
    return [(int(t), float(a), float(r * a)) for t, a, r in zip(timesteps, alphas, levels)]


def _guided_eps(
    model: ModelFn, z: torch.Tensor, t: torch.Tensor, sigma: float, cond_fn: ModelFn | None, guidance_scale: float
) -> torch.Tensor:
    """ε̂ = ε − σ_t · s · ∇_z log p(y | z_t), σ_t = √(1 − ᾱ_t) (plain ε without a ``cond_fn``)."""
    eps = model(z, t).float()
    if cond_fn is None or guidance_scale == 0.0:
        return eps
    with torch.enable_grad():
        grad = cond_fn(z, t)
    return eps - sigma * guidance_scale * grad


def _randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generator])
    return torch.randn(shape, generator=generator)
