"""Metrics in plain numpy / torch (no Ray, no scipy, no sklearn).

- image quality: :func:`psnr`, :func:`ssim` (images in [0, 1], N×C×H×W; one value per image);
- classification: :func:`classification_report`, :func:`macro_f1`;
- summaries over seeds/runs: :func:`mean_ci` (Student-t interval; :func:`t_quantile`, :func:`t_cdf`);
- generation quality on N×D feature vectors: :func:`fid`, :func:`kid`, :func:`precision_recall`.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004): 11×11 Gaussian window, σ = 1.5, valid region."""
    c = a.shape[1]
    w = _gaussian_window(window, sigma, c, a)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    var_a = F.conv2d(a * a, w, groups=c) - mu_a**2
    var_b = F.conv2d(b * b, w, groups=c) - mu_b**2
    cov = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------------
# Evaluation metrics for the downstream harness (numpy / torch only, no Ray, no scipy, no sklearn).
# ---------------------------------------------------------------------------------------------------


def _labels(y, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y).reshape(-1)
    if y.size and not np.issubdtype(y.dtype, np.integer) and (not np.all(np.isfinite(y)) or np.any(y != np.round(y))):
        raise ValueError(f"{name} must hold integer class indices")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} holds a class index outside [0, {num_classes})")
    return y


def _confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    t, p = _labels(y_true, num_classes, "y_true"), _labels(y_pred, num_classes, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length ({len(t)} vs {len(p)})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 = 2·TP / (2·TP + FP + FN); 0 where that is 0/0 (a class neither true nor predicted)."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)


def macro_f1(y_true, y_pred, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over **all** ``range(num_classes)`` labels.

    Same as ``sklearn.metrics.f1_score(y_true, y_pred, labels=range(num_classes), average="macro",
    zero_division=0)``: a class that is never predicted has F1 0, and a class absent from both
    ``y_true`` and ``y_pred`` also counts as F1 0 (it still divides the mean by ``num_classes``).
    """
    return float(_per_class_f1(_confusion(y_true, y_pred, num_classes)).mean())


def classification_report(y_true, y_pred, num_classes: int, class_names=None) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class recall/F1/precision and the confusion matrix.

    - ``accuracy``: fraction of correct predictions.
    - ``balanced_accuracy``: mean recall over the classes that occur in ``y_true`` (sklearn's
      ``balanced_accuracy_score``; classes with no true samples are left out, not counted as 0).
    - ``macro_f1``: see :func:`macro_f1` (all ``num_classes`` labels, zero_division=0).
    - ``per_class_recall``: ``{name: TP/(TP+FN)}``; ``None`` for a class with no true samples.
    - ``per_class_precision``: ``{name: TP/(TP+FP)}``; ``None`` for a class that is never predicted.
    - ``per_class_f1``: ``{name: F1}``; 0.0 where F1 is 0/0 (zero_division=0, as in ``macro_f1``).
    - ``per_class_support``: ``{name: number of true samples}``.
    - ``confusion``: ``num_classes × num_classes`` list of lists, rows = true, columns = predicted.
    - ``n``: number of samples.

    All values are plain Python numbers (JSON-serialisable). Empty inputs raise ``ValueError``.
    """
    cm = _confusion(y_true, y_pred, num_classes)
    n = int(cm.sum())
    if n == 0:
        raise ValueError("classification_report needs at least one sample")
    names = [str(c) for c in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != num_classes or len(set(names)) != num_classes:
        raise ValueError("class_names must hold num_classes distinct names")
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = [float(tp[c] / support[c]) if support[c] else None for c in range(num_classes)]
    precision = [float(tp[c] / predicted[c]) if predicted[c] else None for c in range(num_classes)]
    f1 = _per_class_f1(cm)
    present = [r for r in recall if r is not None]
    return {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": float(np.mean(present)),
        "macro_f1": float(f1.mean()),
        "per_class_recall": dict(zip(names, recall)),
        "per_class_precision": dict(zip(names, precision)),
        "per_class_f1": {name: float(v) for name, v in zip(names, f1)},
        "per_class_support": {name: int(v) for name, v in zip(names, support)},
        "confusion": cm.astype(int).tolist(),
        "n": n,
    }


# --- Student's t quantile (no scipy) ---------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise RuntimeError("incomplete beta continued fraction did not converge")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom: 1 − ½·I_{df/(df+t²)}(df/2, ½) for t ≥ 0."""
    if df <= 0:
        raise ValueError("df must be > 0")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t: the exact inverse of :func:`t_cdf`, found by bisection.

    For ``df > 1e6`` (or ``inf``) the normal quantile with the first Cornish-Fisher term
    z + (z³ + z)/(4·df) is used (error < 1e-9 there).
    """
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    if df <= 0:
        raise ValueError("df must be > 0")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df > 1e6:
        z = statistics.NormalDist().inv_cdf(p)
        return z + (z**3 + z) / (4.0 * df) if math.isfinite(df) else z
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return 0.5 * (lo + hi)


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean, sample SD (ddof=1) and the two-sided Student-t confidence interval of the mean.

    ``ci = mean ± t_{(1+confidence)/2}(n−1) · sd / √n``. Returns ``{"mean", "sd", "ci_low", "ci_high",
    "n"}`` as plain floats (``n`` an int). With a single value the SD and the interval are undefined:
    ``sd``, ``ci_low`` and ``ci_high`` are ``None``. Empty or non-finite input raises ``ValueError``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError("mean_ci got non-finite values")
    n, mean = int(v.size), float(v.mean())
    if n == 1:
        return {"mean": mean, "sd": None, "ci_low": None, "ci_high": None, "n": 1}
    sd = float(v.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "n": n}


# --- generation metrics on feature vectors -----------------------------------------------------------


def _features(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an N×D array of feature vectors, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds non-finite values")
    return x


def _pair(real, fake) -> tuple[np.ndarray, np.ndarray]:
    r, f = _features(real, "real"), _features(fake, "fake")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake features differ in dimension ({r.shape[1]} vs {f.shape[1]})")
    return r, f


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def fid(real, fake) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).

    FID = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2·Tr √(Σ₁Σ₂), with unbiased covariances (ddof=1, as in
    pytorch-fid / clean-fid), all in float64. No scipy ``sqrtm``: with A = √Σ₁ (symmetric PSD, by
    eigen-decomposition) Σ₁Σ₂ = A·(AΣ₂) and A·Σ₂·A = (AΣ₂)·A have the same eigenvalues (XY and YX
    always do), so Tr √(Σ₁Σ₂) = Tr √(√Σ₁ Σ₂ √Σ₁) = Σᵢ √λᵢ with λᵢ the eigenvalues of the symmetric
    PSD matrix √Σ₁ Σ₂ √Σ₁ (rounding negatives clipped to 0). Works for singular covariances
    (N ≤ D). Tiny negative results from rounding are clipped to 0. Needs N ≥ 2 per set.
    """
    r, f = _pair(real, fake)
    if len(r) < 2 or len(f) < 2:
        raise ValueError("fid needs at least two samples per set")
    mu1, mu2 = r.mean(0), f.mean(0)
    s1, s2 = np.atleast_2d(np.cov(r, rowvar=False)), np.atleast_2d(np.cov(f, rowvar=False))
    a = _sqrtm_psd(s1)
    m = a @ s2 @ a
    lam = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def kid(real, fake, subsets: int = 10, subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD² with k(x, y) = (x·y/d + 1)³.

    Each of ``subsets`` rounds draws ``subset_size`` rows (without replacement) from each set —
    default ``min(len(real), len(fake), 1000)`` as in clean-fid — and computes
    MMD²_u = [Σ_{i≠j} k(xᵢ,xⱼ) + Σ_{i≠j} k(yᵢ,yⱼ)] / (m(m−1)) − 2·Σ_{i,j} k(xᵢ,yⱼ) / m².
    Returns ``(mean, sd)`` over the rounds (sd with ddof=0, as torchmetrics and the original code).
    The estimate is unbiased, so it can be slightly negative for matching distributions. Deterministic
    for a given ``seed``. Computed in float64.
    """
    r, f = _pair(real, fake)
    if subsets < 1:
        raise ValueError("subsets must be >= 1")
    m = min(len(r), len(f), 1000) if subset_size is None else int(subset_size)
    if m < 2 or m > min(len(r), len(f)):
        raise ValueError(f"subset_size must be in [2, min(len(real), len(fake))], got {m}")
    d = r.shape[1]
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(subsets):
        x = r[rng.choice(len(r), m, replace=False)]
        y = f[rng.choice(len(f), m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        scores.append(within - 2.0 * kxy.sum() / (m * m))
    scores = np.asarray(scores)
    return float(scores.mean()), float(scores.std())


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row (self, at distance 0, excluded)."""
    out = torch.empty(len(x), dtype=x.dtype)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = torch.cdist(x[s : s + chunk], x).kthvalue(k + 1, dim=1).values
    return out


def precision_recall(real, fake, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Each real (fake) sample gets a ball of radius = distance to its k-th nearest neighbour in its own
    set. precision = fraction of fake samples inside at least one real ball; recall = fraction of real
    samples inside at least one fake ball (boundary counts as inside). Distances come from
    ``torch.cdist`` in float64 over row chunks of ``chunk``, so memory is O(chunk · N), not O(N²)
    (5,000 × 5,000 runs on CPU). Needs more than ``k`` samples per set.
    """
    r, f = _pair(real, fake)
    if k < 1 or len(r) <= k or len(f) <= k:
        raise ValueError(f"precision_recall needs k >= 1 and more than k={k} samples per set")
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    r_rad, f_rad = _knn_radii(rt, k, chunk), _knn_radii(ft, k, chunk)
    fake_in_real = torch.zeros(len(ft), dtype=torch.bool)
    real_in_fake = torch.zeros(len(rt), dtype=torch.bool)
    for s in range(0, len(ft), chunk):
        dist = torch.cdist(ft[s : s + chunk], rt)  # chunk × N_real
        fake_in_real[s : s + chunk] = (dist <= r_rad[None, :]).any(1)
        real_in_fake |= (dist <= f_rad[s : s + chunk, None]).any(0)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())
