"""Numeric regression tests: our DDIM against diffusers' DDIMScheduler (step counts 1…1000) and our
DPM-Solver++(2M) against its DPMSolverMultistepScheduler, with and without classifier guidance."""

import pytest
import torch
from diffusers import DDIMScheduler

from histodiff_ray.config import load_config
from histodiff_ray.diffusion.sampler import ddim_sample, ddim_timesteps, dpm_solver_sample, karras_levels
from histodiff_ray.diffusion.schedule import NoiseSchedule

CFG = load_config("cpu").diffusion
SCHEDULE = NoiseSchedule.from_config(CFG)


def toy_model(z, t):
    """A fixed, smooth ε-predictor that depends on z and t (any function works for the comparison)."""
    return torch.tanh(0.5 * z + 0.001 * t.view(-1, 1, 1, 1).float())


def reference_ddim(steps, eta, z_T, step_noises, prediction_type="epsilon"):
    sched = DDIMScheduler(
        num_train_timesteps=CFG.num_train_timesteps,
        beta_start=CFG.beta_start,
        beta_end=CFG.beta_end,
        beta_schedule=CFG.beta_schedule,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        prediction_type=prediction_type,
    )
    sched.set_timesteps(steps)
    z = z_T.clone()
    for i, t in enumerate(sched.timesteps):
        eps = toy_model(z, torch.full((z.shape[0],), int(t)))
        z = sched.step(eps, t, z, eta=eta, variance_noise=step_noises[i]).prev_sample
    return z


# diffusers steps from t to t − T//steps, which is the next evaluated timestep only when steps
# divides T; the comparison uses such counts, and the next test covers the others.
@pytest.mark.parametrize("steps", [1, 8, 50, 1000])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_matches_diffusers_ddim(steps, eta):
    shape = (2, 4, 8, 8)
    z_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    step_noises = [torch.randn(shape, generator=g) for _ in range(steps)]
    # Our sampler draws per-step noise from its generator in the same order.
    ours = ddim_sample(
        toy_model, SCHEDULE, shape, steps=steps, eta=eta, noise=z_T, generator=torch.Generator().manual_seed(2)
    )
    ref = reference_ddim(steps, eta, z_T, step_noises)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


def v_model_as_eps(z, t):
    """toy_model read as a v-predictor, handed to our samplers as ε (LatentDiffusion.eps does the same)."""
    return SCHEDULE.eps(toy_model(z, t), z, t, "v_prediction")


@pytest.mark.parametrize("steps", [1, 8, 50])
def test_a_v_model_samples_as_diffusers_samples_it(steps):
    shape = (2, 4, 8, 8)
    z_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    step_noises = [torch.randn(shape, generator=g) for _ in range(steps)]
    ours = ddim_sample(
        v_model_as_eps, SCHEDULE, shape, steps=steps, eta=1.0, noise=z_T, generator=torch.Generator().manual_seed(2)
    )
    ref = reference_ddim(steps, 1.0, z_T, step_noises, prediction_type="v_prediction")
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)
    ours = dpm_solver_sample(v_model_as_eps, SCHEDULE, shape, steps=steps, noise=z_T)
    ref = reference_dpm_solver(steps, z_T, toy_model, prediction_type="v_prediction")
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)
    # Read as ε instead, the same network draws something else.
    assert not torch.allclose(ours, dpm_solver_sample(toy_model, SCHEDULE, shape, steps=steps, noise=z_T), atol=1e-3)


@pytest.mark.parametrize("steps", [3, 7, 333])
def test_any_step_count_walks_exactly_its_timesteps_down_to_a_clean_sample(steps):
    seen = []
    # With ε from a fixed z0 the deterministic sampler must land on z0 whatever the step count.
    z0 = torch.full((1, 4, 8, 8), 0.3)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z_T = SCHEDULE.q_sample(z0, torch.tensor([999]), noise)

    def oracle(z, t):
        seen.append(int(t[0]))
        a = SCHEDULE.alpha_bar(t, z)
        return (z - a.sqrt() * z0) / (1 - a).sqrt()

    out = ddim_sample(oracle, SCHEDULE, z0.shape, steps=steps, eta=0.0, noise=z_T)
    assert seen == ddim_timesteps(1000, steps)
    torch.testing.assert_close(out, z0, rtol=1e-4, atol=1e-4)


def test_timesteps_are_valid_for_every_step_count():
    for steps in range(1, 1001):
        ts = ddim_timesteps(1000, steps)
        assert len(ts) == steps and ts[0] == 999 and ts[-1] >= 0, steps
        assert all(a > b for a, b in zip(ts, ts[1:])), steps
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(1000, bad)


def exact_gaussian_eps(z, t):
    """The exact ε-predictor for N(0, I) data: z_t ~ N(0, I), so E[ε | z_t] = √(1 − ᾱ_t) z_t."""
    return (1 - SCHEDULE.alpha_bar(t, z)).sqrt() * z


# The float-arange spacing gained a spurious step (to ᾱ = 1, then a UNet call at t = -1) at these
# counts; samples then collapsed (std 0.013 at 61 steps instead of ~0.96). Each count and its
# neighbours must give the same deterministic DDIM gain, to within a step's discretisation change.
@pytest.mark.parametrize("steps", [61, 103, 122, 244, 499])
def test_the_sample_does_not_jump_at_any_step_count(steps):
    gains = [
        float(ddim_sample(exact_gaussian_eps, SCHEDULE, (1, 1, 1, 1), steps=s, eta=0.0, noise=torch.ones(1, 1, 1, 1)))
        for s in (steps - 1, steps, steps + 1)
    ]
    assert all(0.8 < g < 1.05 for g in gains), gains
    assert max(gains) - min(gains) < 0.01, gains


def test_same_seed_same_samples_and_q_sample_matches_the_closed_form():
    a = ddim_sample(toy_model, SCHEDULE, (1, 4, 8, 8), steps=10, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(toy_model, SCHEDULE, (1, 4, 8, 8), steps=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    z0, noise, t = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2), torch.tensor([0, 500, 999])
    expected = SCHEDULE.alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1) * z0
    torch.testing.assert_close(SCHEDULE.q_sample(z0, t, noise), expected)
    # The paper's linear schedule, 0.0015 → 0.0155, leaves little signal at T.
    assert 0 < float(SCHEDULE.alphas_cumprod[-1]) < 1e-3


def test_per_sample_generators_make_each_sample_independent_of_its_batch():
    """With one generator per sample, a sample drawn alone equals the same seed drawn in a batch."""

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = ddim_sample(toy_model, SCHEDULE, (3, 4, 8, 8), steps=5, eta=1.0, generator=gens([7, 8, 9]))
    alone = ddim_sample(toy_model, SCHEDULE, (1, 4, 8, 8), steps=5, eta=1.0, generator=gens([8]))
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        ddim_sample(toy_model, SCHEDULE, (3, 4, 8, 8), steps=2, generator=gens([1, 2]))


def reference_dpm_solver(
    steps, z_T, guided_eps, algorithm_type="dpmsolver++", generator=None, karras=False, prediction_type="epsilon"
):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=CFG.num_train_timesteps,
        beta_start=CFG.beta_start,
        beta_end=CFG.beta_end,
        beta_schedule=CFG.beta_schedule,
        algorithm_type=algorithm_type,
        solver_order=2,
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        use_karras_sigmas=karras,
        prediction_type=prediction_type,
    )
    sched.set_timesteps(steps)
    z = z_T.clone()
    for t in sched.timesteps:
        # The SDE form's per-step noise, drawn as our sampler draws it (its last draw, at σ = 0, unused).
        noise = torch.randn(z.shape, generator=generator) if generator is not None else None
        z = sched.step(guided_eps(z, torch.full((z.shape[0],), int(t))), t, z, variance_noise=noise).prev_sample
    return z


def cond_fn(z, t):  # a smooth stand-in for ∇ log p(y | z_t), small enough to keep float32 rounding small
    return 0.1 * torch.cos(z) * (1 + t.view(-1, 1, 1, 1).float() / 1000)


def guided_by(guidance_scale):
    """ε̂ = ε − √(1 − ᾱ_t) · s · ∇ at the model's whole timestep t, as the samplers form it."""

    def guided(z, t):
        return toy_model(z, t) - (1 - SCHEDULE.alpha_bar(t, z)).sqrt() * guidance_scale * cond_fn(z, t)

    return guided


# As for DDIM: step counts that divide T, where diffusers' float spacing gives the same timesteps.
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50])
@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_dpm_solver_matches_diffusers_with_and_without_classifier_guidance(steps, guidance_scale):
    shape = (2, 4, 8, 8)
    z_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    guided = guided_by(guidance_scale)
    ours = dpm_solver_sample(
        toy_model, SCHEDULE, shape, steps=steps, noise=z_T, cond_fn=cond_fn, guidance_scale=guidance_scale
    )
    torch.testing.assert_close(ours, reference_dpm_solver(steps, z_T, guided).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_sde_dpm_solver_matches_diffusers_with_the_same_noise(steps, guidance_scale):
    shape = (2, 4, 8, 8)
    z_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    guided = guided_by(guidance_scale)
    ours = dpm_solver_sample(
        toy_model,
        SCHEDULE,
        shape,
        steps=steps,
        noise=z_T,
        cond_fn=cond_fn,
        guidance_scale=guidance_scale,
        stochastic=True,
        generator=torch.Generator().manual_seed(7),
    )
    reference = reference_dpm_solver(steps, z_T, guided, "sde-dpmsolver++", torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-4)
    if steps > 1:  # the noise matters: another seed, another sample
        again = {"steps": steps, "noise": z_T, "stochastic": True, "generator": torch.Generator().manual_seed(8)}
        other = dpm_solver_sample(toy_model, SCHEDULE, shape, **again)
        assert not torch.allclose(ours, other)


@pytest.mark.parametrize("steps", [2, 5, 20, 50])
@pytest.mark.parametrize("stochastic", [False, True])
def test_dpm_solvers_on_karras_noise_levels_match_diffusers(steps, stochastic):
    shape = (2, 4, 8, 8)
    z_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    guidance = {"cond_fn": cond_fn, "guidance_scale": 3.0}

    def sample(karras_sigmas):  # the SDE form draws the same noise each time
        noise = torch.Generator().manual_seed(7) if stochastic else None
        kinds = {"stochastic": stochastic, "karras_sigmas": karras_sigmas}
        return dpm_solver_sample(
            toy_model, SCHEDULE, shape, steps=steps, noise=z_T, generator=noise, **guidance, **kinds
        )

    algorithm = "sde-dpmsolver++" if stochastic else "dpmsolver++"
    noise = torch.Generator().manual_seed(7) if stochastic else None
    reference = reference_dpm_solver(steps, z_T, guided_by(3.0), algorithm, noise, karras=True)
    ours = sample(karras_sigmas=True)
    torch.testing.assert_close(ours, reference.float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, sample(karras_sigmas=False))  # other levels, another path from the same start


def test_karras_levels_spend_the_steps_at_low_noise():
    levels = karras_levels(SCHEDULE, 20)
    timesteps = [t for t, _, _ in levels]
    assert timesteps[0] == CFG.num_train_timesteps - 1 and timesteps[-1] == 0
    assert timesteps == sorted(timesteps, reverse=True)
    assert sum(t < 100 for t in timesteps) > sum(t < 100 for t in ddim_timesteps(CFG.num_train_timesteps, 20))
    assert all(abs(a * a + s * s - 1) < 1e-9 for _, a, s in levels)


def test_sde_dpm_solver_samples_the_data_distribution_of_an_exact_model():
    # Gaussian data N(0, 0.5²·I): the exact ε-model is known in closed form, and the reverse SDE from
    # z_T ~ N(0, I) must end with the data's std. Every sampler's last step returns the clean estimate
    # (the posterior mean), which shrinks the std at few steps; at every step count the SDE solver ends
    # closer to 0.5 than DDIM at η = 1 (measured: 10 steps 0.358 vs 0.328, 20: 0.429 vs 0.384, 50: 0.475
    # vs 0.434), and at 200 it is the data's (0.498).
    std = 0.5

    def exact(z, t):
        a = SCHEDULE.alpha_bar(t, z)
        return z * (1 - a).sqrt() / (a * std**2 + 1 - a)

    shape = (4096, 1, 2, 2)

    def sampled_std(stochastic_dpm: bool, steps: int) -> float:
        g = torch.Generator().manual_seed(0)
        if stochastic_dpm:
            return float(dpm_solver_sample(exact, SCHEDULE, shape, steps=steps, stochastic=True, generator=g).std())
        return float(ddim_sample(exact, SCHEDULE, shape, steps=steps, eta=1.0, generator=g).std())

    for steps in (10, 20, 50):
        assert abs(sampled_std(True, steps) - std) < abs(sampled_std(False, steps) - std), steps
    assert abs(sampled_std(True, 200) - std) < 0.01


def test_dpm_solver_at_20_steps_is_as_close_to_the_ode_solution_as_ddim_at_50():
    # With ε from a fixed z0 both deterministic samplers are exact at any step count. With the exact
    # ε of N(0, I) data the ODE path curves: the sample of a unit z_T converges to 0.997 (1,000
    # DDIM steps); DDIM reaches 0.960 at 50 steps, DPM-Solver++ 0.963 at 20 (and 0.908 at 10).
    z0 = torch.full((1, 4, 8, 8), 0.3)
    z_T = SCHEDULE.q_sample(
        z0, torch.tensor([999]), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    )

    def oracle(z, t):
        a = SCHEDULE.alpha_bar(t, z)
        return (z - a.sqrt() * z0) / (1 - a).sqrt()

    torch.testing.assert_close(
        dpm_solver_sample(oracle, SCHEDULE, z0.shape, steps=7, noise=z_T), z0, rtol=1e-4, atol=1e-4
    )
    one = torch.ones(1, 1, 1, 1)
    fine = float(ddim_sample(exact_gaussian_eps, SCHEDULE, (1, 1, 1, 1), steps=1000, eta=0.0, noise=one))
    ddim50 = float(ddim_sample(exact_gaussian_eps, SCHEDULE, (1, 1, 1, 1), steps=50, eta=0.0, noise=one))
    dpm20 = float(dpm_solver_sample(exact_gaussian_eps, SCHEDULE, (1, 1, 1, 1), steps=20, noise=one))
    assert abs(dpm20 - fine) <= abs(ddim50 - fine), (fine, ddim50, dpm20)
