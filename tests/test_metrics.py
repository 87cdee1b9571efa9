import math

import numpy as np
import pytest
import torch

from histodiff_ray.metrics import (
    classification_report,
    fid,
    kid,
    macro_f1,
    mean_ci,
    precision_recall,
    psnr,
    ssim,
)


def test_the_library_backed_metrics_give_the_numbers_the_hand_written_ones_gave():
    # Pinned from the hand-written implementations these replaced (numpy/torch PSNR, SSIM, FID, KID,
    # confusion matrix, Student-t by bisection), on the same seeded inputs.
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 32, 32, generator=g)
    b = (a + 0.1 * torch.randn(4, 3, 32, 32, generator=g)).clamp(0, 1)
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.44403839, 20.35907745, 20.56295395, 20.53004074]))
    # torchmetrics averages the SSIM map over the whole (reflect-padded) tile, the old code over the
    # valid region 5 px in from each border: 0.0015 apart on 32 px tiles, less on 64 px ones.
    torch.testing.assert_close(ssim(a, b), torch.tensor([0.94662, 0.94437, 0.94767, 0.94621]), atol=2e-3, rtol=0)
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(200, 16)), rng.normal(0.3, 1.2, size=(150, 16))
    assert fid(real, fake) == pytest.approx(3.7941545964032883, rel=1e-10)
    # Subsets as large as both sets are permutations of them: the MMD no longer depends on the draws.
    mean, sd = kid(real[:150], fake, subsets=3, subset_size=150)
    assert mean == pytest.approx(0.5092777030993894, rel=1e-10) and sd == pytest.approx(0.0, abs=1e-12)
    ci = mean_ci([0.91, 0.88, 0.93, 0.9])
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx((0.8718760486558215, 0.9381239513441786), rel=1e-12)
    y = rng.integers(0, 5, 300)
    report = classification_report(y, np.where(rng.random(300) < 0.7, y, rng.integers(0, 5, 300)), 5)
    assert (report["accuracy"], report["balanced_accuracy"], report["macro_f1"]) == pytest.approx(
        (0.76, 0.7603947464964413, 0.7593321493449455), rel=1e-12
    )


def test_identical_images_score_perfectly_and_noise_scores_lower():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    assert (ssim(a, noisy) < 0.95).all() and (psnr(a, a) > 90).all()


def test_psnr_matches_its_definition():
    a = torch.zeros(1, 1, 4, 4)
    b = torch.full((1, 1, 4, 4), 0.1)  # MSE 0.01 → 20 dB
    torch.testing.assert_close(psnr(a, b), torch.tensor([20.0]))


def test_ssim_of_a_constant_shift_is_below_one_and_symmetric():
    a = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    b = a * 0.5 + 0.25
    assert 0 < ssim(a, b).item() < 1
    torch.testing.assert_close(ssim(a, b), ssim(b, a))


# --- classification -------------------------------------------------------------------------------


def test_classification_report_on_a_hand_computed_example_with_a_class_never_predicted():
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 0, 0, 1])  # class C (2) is never predicted
    r = classification_report(y_true, y_pred, 3, class_names=["A", "B", "C"])
    # rows = true, cols = predicted
    assert r["confusion"] == [[2, 1, 0], [1, 2, 0], [1, 1, 0]]
    assert r["n"] == 8
    assert r["accuracy"] == pytest.approx(4 / 8)
    assert r["per_class_recall"] == pytest.approx({"A": 2 / 3, "B": 2 / 3, "C": 0.0})
    assert r["per_class_precision"]["A"] == pytest.approx(0.5)
    assert r["per_class_precision"]["B"] == pytest.approx(0.5)
    assert r["per_class_precision"]["C"] is None  # never predicted
    # F1 = 2TP / (2TP + FP + FN): A and B have TP 2, FP 2, FN 1 → 4/7; C has TP 0 → 0
    assert r["per_class_f1"] == pytest.approx({"A": 4 / 7, "B": 4 / 7, "C": 0.0})
    assert r["per_class_support"] == {"A": 3, "B": 3, "C": 2}
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert r["macro_f1"] == pytest.approx(8 / 21)
    assert macro_f1(y_true, y_pred, 3) == pytest.approx(8 / 21)
    assert set(r) == {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "per_class_recall",
        "per_class_precision",
        "per_class_f1",
        "per_class_support",
        "confusion",
        "n",
    }


def test_classes_absent_from_y_true_leave_balanced_accuracy_but_count_zero_in_macro_f1():
    # 4 classes: class 2 is predicted but never true, class 3 is neither true nor predicted
    y_true, y_pred = [0, 0, 1, 1], [0, 2, 1, 1]
    r = classification_report(np.array(y_true), torch.tensor(y_pred), 4)
    assert r["confusion"] == [[1, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert r["per_class_recall"] == {"0": 0.5, "1": 1.0, "2": None, "3": None}
    assert r["per_class_precision"] == {"0": 1.0, "1": 1.0, "2": 0.0, "3": None}
    assert r["per_class_f1"] == pytest.approx({"0": 2 / 3, "1": 1.0, "2": 0.0, "3": 0.0})
    assert r["balanced_accuracy"] == pytest.approx(0.75)  # mean over the two classes present
    assert r["accuracy"] == pytest.approx(0.75)
    # sklearn f1_score(labels=range(4), average="macro", zero_division=0): (2/3 + 1 + 0 + 0) / 4
    assert r["macro_f1"] == pytest.approx(5 / 12)
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(5 / 12)
    assert macro_f1(y_true, y_pred, 2 + 2) != pytest.approx(macro_f1(y_true, y_pred, 3))


def test_macro_f1_equals_a_per_class_hand_computation_and_downstream_uses_it():
    from histodiff_ray import downstream, metrics

    assert downstream.macro_f1 is metrics.macro_f1
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    f1 = []
    for c in range(5):
        tp = np.sum((y_pred == c) & (y_true == c))
        p, rec = tp / np.sum(y_pred == c), tp / np.sum(y_true == c)
        f1.append(2 * p * rec / (p + rec))
    assert macro_f1(y_true, y_pred, 5) == pytest.approx(np.mean(f1))
    assert macro_f1(y_true, y_true, 5) == 1.0


def test_classification_inputs_are_validated():
    with pytest.raises(ValueError):
        classification_report([0, 1], [0], 2)
    with pytest.raises(ValueError):
        classification_report([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        classification_report([0, 1], [0, 1], 2, class_names=["a"])
    with pytest.raises(ValueError):
        classification_report([], [], 2)


# --- mean and confidence interval -----------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected", [(2, 12.7062), (3, 4.3027), (5, 2.7764), (10, 2.2622), (30, 2.0452), (101, 1.9840)]
)
def test_the_interval_uses_students_t_quantile_from_tables(n, expected):
    r = mean_ci(np.arange(n, dtype=float))
    assert (r["ci_high"] - r["mean"]) / (r["sd"] / math.sqrt(n)) == pytest.approx(expected, abs=1e-4)


def test_mean_ci_on_a_hand_example():
    r = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975}(4) · sd / √n
    assert r["n"] == 5 and r["mean"] == pytest.approx(3.0)
    assert r["sd"] == pytest.approx(math.sqrt(2.5))  # ddof = 1
    assert r["ci_low"] == pytest.approx(3.0 - half, abs=1e-8)
    assert r["ci_high"] == pytest.approx(3.0 + half, abs=1e-8)
    r90 = mean_ci(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), confidence=0.90)
    assert r90["ci_high"] == pytest.approx(3.0 + 2.131846786 * math.sqrt(0.5), abs=1e-8)
    assert mean_ci([0.7]) == {"mean": 0.7, "sd": None, "ci_low": None, "ci_high": None, "n": 1}
    with pytest.raises(ValueError):
        mean_ci([])
    with pytest.raises(ValueError):
        mean_ci([1.0, float("nan")])


# --- generation metrics on feature vectors ---------------------------------------------------------


def _exact_moments(n, mean, cov, seed):
    """n samples whose sample mean and (ddof=1) sample covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return np.asarray(mean) + z @ np.linalg.cholesky(cov).T


def test_fid_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 16))
    assert fid(x, x) == pytest.approx(0.0, abs=1e-8)
    few = np.random.default_rng(1).normal(size=(10, 32))  # singular covariance (N < D)
    assert fid(few, torch.from_numpy(few)) == pytest.approx(0.0, abs=1e-6)


def test_fid_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    a = _exact_moments(200, mu1, np.diag(v1), 0)
    b = _exact_moments(150, mu2, np.diag(v2), 1)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))  # = 6 + (4 + 1 + 0 + 0.5) = 11.5
    assert expected == pytest.approx(11.5)
    assert fid(a, b) == pytest.approx(expected, rel=1e-9)
    # rotating both sets by the same orthogonal matrix makes the covariances non-diagonal, FID unchanged
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(4, 4)))
    assert fid(a @ q, b @ q) == pytest.approx(expected, rel=1e-9)


def test_fid_matches_the_2x2_closed_form_for_non_commuting_covariances():
    # for 2×2 Σ1Σ2 with positive eigenvalues: Tr √(Σ1Σ2) = √(Tr Σ1Σ2 + 2·√det(Σ1Σ2))
    s1, s2 = np.array([[2.0, 0.9], [0.9, 1.0]]), np.array([[1.0, -0.4], [-0.4, 3.0]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = 1.0**2 + 2.0**2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    a = _exact_moments(100, [0.0, 0.0], s1, 3)
    b = _exact_moments(120, [1.0, -2.0], s2, 4)
    assert fid(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_is_symmetric_and_grows_with_a_shift():
    rng = np.random.default_rng(5)
    a = rng.exponential(size=(400, 12))
    b = rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12))
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-9)
    assert fid(a, a + 1.0) == pytest.approx(12.0, rel=1e-9)  # a shift changes only the mean term


def test_kid_matches_a_hand_computed_mmd():
    # d = 1, k(x, y) = (xy + 1)³; real {0, 1}, fake {1, 2}:
    # within = (2·k(0,1) + 2·k(1,2)) / (2·1) = (2 + 54) / 2 = 28; cross = 2·(1 + 1 + 8 + 27) / 4 = 18.5
    mean, sd = kid(np.array([[0.0], [1.0]]), np.array([[1.0], [2.0]]), subsets=5)
    assert mean == pytest.approx(9.5) and sd == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 32)), rng.normal(size=(600, 32))
    same_mean, same_sd = kid(a, b, subsets=10, subset_size=300)
    shifted_mean, shifted_sd = kid(a, torch.from_numpy(b + 0.5), subsets=10, subset_size=300)
    assert abs(same_mean) < 0.01
    assert shifted_mean > 0.1 and shifted_mean > 10 * max(shifted_sd, same_sd)  # far outside the subsets' spread
    assert kid(a, b, subsets=3, seed=7) == kid(a, b, subsets=3, seed=7)
    with pytest.raises(ValueError):
        kid(a, b[:, :8])


def _reference_precision_recall(real, fake, k):
    def dists(x, y):
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))

    r_rad = np.sort(dists(real, real), axis=1)[:, k]
    f_rad = np.sort(dists(fake, fake), axis=1)[:, k]
    d = dists(fake, real)
    return (d <= r_rad[None, :]).any(1).mean(), (d <= f_rad[:, None]).any(0).mean()


def test_precision_recall_of_identical_sets_is_one_and_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 6)), rng.normal(size=(200, 6)) * 1.3 + 0.3
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    p, r = precision_recall(real, fake, k=3)
    ref_p, ref_r = _reference_precision_recall(real, fake, 3)
    assert (p, r) == pytest.approx((ref_p, ref_r))
    assert 0 < p < 1 and 0 < r < 1
    assert precision_recall(real, fake, k=3, chunk=7) == (p, r)  # chunking changes nothing
    assert precision_recall(real, fake, k=5) != (p, r)


def test_precision_recall_when_fake_covers_only_half_the_modes():
    rng = np.random.default_rng(1)
    centers = np.array([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    real = np.concatenate([c + rng.normal(size=(250, 2)) for c in centers])
    fake = np.concatenate([c + rng.normal(size=(250, 2)) for c in centers[:2]])  # two of four modes
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.97
    assert 0.45 < r <= 0.5
    # exactly the real samples of two modes: precision 1, recall exactly 1/2
    assert precision_recall(real, real[:500], k=3) == (1.0, 0.5)
    # all real modes plus as many samples from a mode real data lacks: precision 1/2, recall 1
    junk = np.array([100.0, -100.0]) + rng.normal(size=(1000, 2))
    assert precision_recall(real, np.concatenate([real, junk]), k=3) == (0.5, 1.0)
