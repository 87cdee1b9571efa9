"""Metrics (no Ray): torchmetrics and scipy where they have the measure, our own code where not.

- image quality: :func:`psnr`, :func:`ssim` (torchmetrics; images in [0, 1], N×C×H×W; one value per image);
- classification: :func:`classification_report`, :func:`macro_f1` (the confusion matrix from torchmetrics;
  sklearn's conventions, which the per-class arithmetic below spells out);
- summaries over seeds/runs: :func:`mean_ci` (Student-t interval, scipy's quantile);
- generation quality on N×D feature vectors: :func:`fid`, :func:`kid` (torchmetrics, on features
  computed elsewhere) and :func:`precision_recall` (Kynkäänniemi et al. 2019; no library has it).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.stats import t as student_t
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (images in [0, 1]); 100 dB for identical ones (not inf,
    which JSON cannot hold)."""
    return peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp_max(100.0)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: 11×11 Gaussian window, σ = 1.5), averaged
    over the whole tile, its borders reflect-padded (torchmetrics' convention; the hand-written code
    before it averaged the valid region only, ~1e-3 higher on these tiles)."""
    return structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")


# --- classification --------------------------------------------------------------------------------


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
    return multiclass_confusion_matrix(torch.from_numpy(p), torch.from_numpy(t), num_classes).numpy()


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


# --- summaries over seeds ---------------------------------------------------------------------------


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
    half = float(student_t.ppf(0.5 + confidence / 2.0, n - 1)) * sd / math.sqrt(n)
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


class _GivenFeatures(torch.nn.Module):
    """The identity as torchmetrics' feature extractor: FID and KID of feature vectors computed
    elsewhere (the oracle's or the judge's penultimate layer)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid(real, fake) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), in float64
    with unbiased covariances (torchmetrics). Tiny negative results from rounding are clipped to 0.
    Needs N ≥ 2 per set."""
    r, f = _pair(real, fake)
    if len(r) < 2 or len(f) < 2:
        raise ValueError("fid needs at least two samples per set")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(r.shape[1]))
    metric.update(torch.from_numpy(r), real=True)
    metric.update(torch.from_numpy(f), real=False)
    return max(float(metric.compute()), 0.0)


def kid(real, fake, subsets: int = 10, subset_size: int | None = None, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018; torchmetrics): unbiased MMD² with
    k(x, y) = (x·y/d + 1)³ over ``subsets`` random subsets of ``subset_size`` rows from each set
    (default ``min(len(real), len(fake), 1000)``, as in clean-fid). Returns ``(mean, sd)`` over the
    subsets. Unbiased, so slightly negative for matching distributions; deterministic for a ``seed``."""
    r, f = _pair(real, fake)
    if subsets < 1:
        raise ValueError("subsets must be >= 1")
    m = min(len(r), len(f), 1000) if subset_size is None else int(subset_size)
    if m < 2 or m > min(len(r), len(f)):
        raise ValueError(f"subset_size must be in [2, min(len(real), len(fake))], got {m}")
    with warnings.catch_warnings():  # "will save all extracted features": they are given, and kept anyway
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_GivenFeatures(r.shape[1]), subsets=subsets, subset_size=m)
    metric.update(torch.from_numpy(r), real=True)
    metric.update(torch.from_numpy(f), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, sd = metric.compute()
    return float(mean), float(sd)


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
