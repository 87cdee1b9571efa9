"""Classifier guidance: the cond_fn's gradient, bit-exact no-op at scale 0, and on a toy two-blob
latent problem (exact ε-model, small trained noise-aware classifier) guidance must raise
log p(y | z_t, t) along the trajectory and land the samples on class y's blob."""

import pytest
import torch

from histodiff_ray.config import load_config
from histodiff_ray.diffusion.guidance import classifier_cond_fn, classifier_free_eps
from histodiff_ray.diffusion.sampler import ddim_sample
from histodiff_ray.diffusion.schedule import NoiseSchedule
from histodiff_ray.models.classifier import NoiseAwareClassifier

SCHEDULE = NoiseSchedule.from_config(load_config("cpu").diffusion)
SHAPE = (4, 8, 8)  # latent C, H, W
SIGMA = 0.5  # per-dimension std of each blob
# Two blobs at ±0.5·u for a fixed ±1 pattern u: the classes differ in a spatial pattern, not in a
# global mean, so the classifier has to learn it.
U = torch.randint(0, 2, SHAPE, generator=torch.Generator().manual_seed(0)).float() * 2 - 1
MEANS = torch.stack([0.5 * U, -0.5 * U])  # 2, C, H, W


def blob_log_posterior(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact log p(y | z_t) for the equal-weight two-blob mixture, N × 2."""
    a = SCHEDULE.alpha_bar(t, z)  # N, 1, 1, 1
    var = a * SIGMA**2 + 1 - a
    d2 = ((z[:, None] - a[:, None].sqrt() * MEANS[None]) ** 2 / var[:, None]).flatten(2).sum(-1)
    return torch.log_softmax(-0.5 * d2, dim=1)


def mixture_eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact ε-prediction E[ε | z_t] for the data distribution (no network to train)."""
    a = SCHEDULE.alpha_bar(t, z)
    var = a * SIGMA**2 + 1 - a
    w = blob_log_posterior(z, t).exp()  # N, 2
    eps_k = (1 - a[:, None]).sqrt() * (z[:, None] - a[:, None].sqrt() * MEANS[None]) / var[:, None]
    return (w[:, :, None, None, None] * eps_k).sum(1)


def sample_blobs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 2, (n,), generator=g)
    return MEANS[y] + SIGMA * torch.randn(n, *SHAPE, generator=g), y


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every tensor here is tiny: a second intra-op thread only adds contention on a shared host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_classifier(one_thread):
    return train_toy_classifier()


def train_toy_classifier(steps: int = 200) -> NoiseAwareClassifier:
    """AdamW steps at uniform random t on q_sample'd blobs: a few seconds on one core."""
    torch.manual_seed(0)
    model = NoiseAwareClassifier(
        in_channels=4,
        sample_size=8,
        num_classes=2,
        width=16,
        depth=1,
        channel_mult=(1, 2),
        attention_resolutions=(2,),
        num_heads=2,
        pool="attention",
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        z0, y = sample_blobs(64, g)
        t = torch.randint(0, SCHEDULE.num_timesteps, (64,), generator=g)
        z_t = SCHEDULE.q_sample(z0, t, torch.randn(z0.shape, generator=g))
        loss = torch.nn.functional.cross_entropy(model(z_t, t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    return NoiseAwareClassifier(
        in_channels=4,
        sample_size=8,
        num_classes=2,
        width=8,
        depth=1,
        channel_mult=(1,),
        attention_resolutions=(),
        num_heads=1,
        pool="attention",
    ).eval()


# --- the cond_fn itself ---------------------------------------------------------------------------


def test_cond_fn_matches_the_analytic_gradient_of_a_softmax_regression():
    torch.manual_seed(0)
    W = torch.randn(3, 4 * 8 * 8) * 0.1

    def linear(z, t):  # logits = W z (+ a t-dependent shift that does not change the gradient)
        return z.flatten(1) @ W.T + 0.001 * t[:, None].float()

    z, t, y = torch.randn(5, 4, 8, 8), torch.full((5,), 300), torch.tensor([0, 1, 2, 1, 0])
    grad = classifier_cond_fn(linear, y)(z, t)
    p = torch.softmax(z.flatten(1) @ W.T, dim=1)
    expected = (W[y] - p @ W).view_as(z)  # ∇ log softmax_y = W_y − Σ_k p_k W_k, per sample
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_cond_fn_is_per_sample_graph_free_and_leaves_the_classifier_alone():
    model = tiny_classifier()
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 250, 500, 999]), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():  # the sampler runs under no_grad; cond_fn must still differentiate
        grad = classifier_cond_fn(model, y)(z, t)
    assert grad.shape == z.shape and grad.dtype == z.dtype and not grad.requires_grad and grad.grad_fn is None
    assert not z.requires_grad and all(p.grad is None for p in model.parameters())
    for i in range(4):  # each sample gets the gradient of its own log-probability only
        alone = classifier_cond_fn(model, y[i : i + 1])(z[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(grad[i : i + 1], alone, rtol=1e-4, atol=1e-6)
    # Central finite difference along a random direction for sample 1.
    d, h = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), 1e-2

    def logp(x):
        with torch.no_grad():
            return torch.log_softmax(model(x, t[1:2]).double(), -1)[0, 1]

    fd = (logp(z[1:2] + h * d) - logp(z[1:2] - h * d)) / (2 * h)
    assert abs(float(fd) - float((grad[1:2] * d).sum())) < 1e-2 * max(1.0, abs(float(fd)))
    # One label for the whole batch broadcasts; the expected score is zero: sum_y p(y) grad log p(y) = grad 1 = 0.
    g1, g0 = classifier_cond_fn(model, torch.tensor(1))(z, t), classifier_cond_fn(model, torch.tensor(0))(z, t)
    with torch.no_grad():
        p = torch.softmax(model(z, t), -1)[:, :, None, None, None]
    torch.testing.assert_close(
        p[:, 0] * g0 + p[:, 1] * g1, torch.zeros_like(g0), rtol=0, atol=1e-4 * float(g1.abs().max())
    )


# --- (a) scale 0 is the unguided sampler ------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guidance_scale_zero_reproduces_the_unguided_sampler_bit_exactly(eta):
    cond_fn = classifier_cond_fn(tiny_classifier(), torch.tensor([0, 1, 0]))
    shape = (3, *SHAPE)
    plain = ddim_sample(mixture_eps, SCHEDULE, shape, steps=20, eta=eta, generator=torch.Generator().manual_seed(5))
    zero = ddim_sample(
        mixture_eps,
        SCHEDULE,
        shape,
        steps=20,
        eta=eta,
        generator=torch.Generator().manual_seed(5),
        cond_fn=cond_fn,
        guidance_scale=0.0,
    )
    assert torch.equal(plain, zero)
    # ...and the cond_fn is really wired in: a non-zero scale changes the samples.
    guided = ddim_sample(
        mixture_eps,
        SCHEDULE,
        shape,
        steps=20,
        eta=eta,
        generator=torch.Generator().manual_seed(5),
        cond_fn=cond_fn,
        guidance_scale=5.0,
    )
    assert (guided - plain).abs().max() > 1e-3


# --- (b) guidance works on a trained toy setup ---------------------------------------------------------


def test_the_toy_classifier_learned_the_blobs(trained_classifier):
    g = torch.Generator().manual_seed(2)
    z0, y = sample_blobs(256, g)
    for t_value, min_acc in [(0, 0.95), (300, 0.95), (500, 0.8)]:  # Bayes-optimal: 1.0, 1.0, 0.99
        t = torch.full((256,), t_value)
        z_t = SCHEDULE.q_sample(z0, t, torch.randn(z0.shape, generator=g))
        with torch.no_grad():
            acc = (trained_classifier(z_t, t).argmax(1) == y).float().mean()
        assert acc >= min_acc, (t_value, float(acc))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guidance_raises_log_p_y_along_the_trajectory_and_lands_on_class_y(trained_classifier, eta):
    n = 32
    y = torch.arange(n) % 2  # both classes in one batch: each sample must follow its own label
    runs = {}
    for scale in (0.0, 10.0):
        trajectory = []

        def eps_model(z, t, trajectory=trajectory):
            trajectory.append((z.clone(), t.clone()))
            return mixture_eps(z, t)

        z_final = ddim_sample(
            eps_model,
            SCHEDULE,
            (n, *SHAPE),
            steps=25,
            eta=eta,
            generator=torch.Generator().manual_seed(7),
            cond_fn=classifier_cond_fn(trained_classifier, y),
            guidance_scale=scale,
        )
        with torch.no_grad():
            log_p = torch.stack(
                [torch.log_softmax(trained_classifier(z, t), 1)[torch.arange(n), y] for z, t in trajectory]
            )
            log_p_end = torch.log_softmax(trained_classifier(z_final, torch.zeros(n, dtype=torch.long)), 1)[
                torch.arange(n), y
            ]
        d_own = (z_final - MEANS[y]).flatten(1).norm(dim=1)
        d_other = (z_final - MEANS[1 - y]).flatten(1).norm(dim=1)
        runs[scale] = dict(
            traj=log_p.mean(),
            end=log_p_end.mean(),
            d_own=d_own.mean(),
            hit=(d_own < d_other).float().mean(),
            exact=blob_log_posterior(z_final, torch.zeros(n, dtype=torch.long))[torch.arange(n), y].mean(),
        )
    plain, guided = runs[0.0], runs[10.0]
    assert guided["traj"] > plain["traj"] + 0.5, runs
    assert guided["end"] > plain["end"] + 1.0, runs
    assert guided["exact"] > plain["exact"] + 1.0, runs  # judged by the exact posterior, not the classifier
    assert guided["d_own"] < plain["d_own"] - 1.0, runs
    # Unguided, the exact ε-model lands on either blob; guided, on class y's (eta 0 measured 0.91, eta 1: 1.0).
    assert 0.2 < plain["hit"] < 0.8 and guided["hit"] >= 0.85 and guided["hit"] > plain["hit"] + 0.2, runs


# --- (c) any step count ----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 7, 50, 1000])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guided_sampling_runs_for_any_step_count(steps, eta):
    cond_fn = classifier_cond_fn(tiny_classifier(), torch.tensor([1]))
    out = ddim_sample(
        mixture_eps,
        SCHEDULE,
        (1, *SHAPE),
        steps=steps,
        eta=eta,
        generator=torch.Generator().manual_seed(0),
        cond_fn=cond_fn,
        guidance_scale=10.0,
    )
    assert out.shape == (1, *SHAPE) and out.dtype == torch.float32 and torch.isfinite(out).all()


def class_conditional_eps(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact ε for the two-blob problem given the class: blob y's ε, or the mixture's for the null class 2."""
    a = SCHEDULE.alpha_bar(t, z)
    var = a * SIGMA**2 + 1 - a
    own = (1 - a).sqrt() * (z - a.sqrt() * MEANS[y.clamp(max=1)]) / var
    return torch.where((y == 2).view(-1, 1, 1, 1), mixture_eps(z, t), own)


def test_classifier_free_eps_is_the_linear_extrapolation_of_its_two_branches():
    z = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 500, 900])
    labels = torch.tensor([0, 1, 0])
    uncond, cond = mixture_eps(z, t), class_conditional_eps(z, t, labels)
    for w in (0.0, 1.0, 3.0):
        got = classifier_free_eps(class_conditional_eps, labels, null_label=2, scale=w)(z, t)
        torch.testing.assert_close(got, uncond + w * (cond - uncond), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_classifier_free_guidance_lands_on_class_y_and_more_so_at_larger_scale(eta):
    n = 64
    labels = torch.arange(n) % 2
    noise = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(11))

    def hit_rate(w):
        eps = classifier_free_eps(class_conditional_eps, labels, null_label=2, scale=w)
        out = ddim_sample(
            eps,
            SCHEDULE,
            (n, *SHAPE),
            steps=25,
            eta=eta,
            noise=noise,
            generator=[torch.Generator().manual_seed(100 + i) for i in range(n)],
        )
        log_post = blob_log_posterior(out, torch.zeros(n, dtype=torch.long))
        return (log_post.argmax(1) == labels).float().mean().item()

    unguided, conditional, guided = hit_rate(0.0), hit_rate(1.0), hit_rate(3.0)
    assert 0.2 < unguided < 0.8, unguided  # the null class samples both blobs
    assert conditional >= 0.95 and guided >= conditional, (unguided, conditional, guided)
