"""Discrimination metrics with bootstrap confidence intervals."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
)


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    metric: Callable = roc_auc_score,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Estimate:
    """Point estimate and percentile bootstrap interval; resamples with one class are skipped."""
    y, p = np.asarray(y), np.asarray(p)
    if len(np.unique(y)) < 2:
        return Estimate(float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        i = rng.integers(0, y.size, y.size)
        if y[i].min() != y[i].max():
            stats.append(metric(y[i], p[i]))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return Estimate(float(metric(y, p)), float(lo), float(hi))


def auroc(y: np.ndarray, p: np.ndarray, **kw) -> Estimate:
    return bootstrap(y, p, roc_auc_score, **kw)


def f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises F1 (chosen on validation data, applied to test);
    0.5 when `y` has a single class."""
    if len(np.unique(y)) < 2:
        return 0.5
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def binary_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float | None = None, n_boot: int = 500, seed: int = 0
) -> dict:
    """AUROC and AUPRC (and F1 at `threshold`) with bootstrap 95% intervals, flat for JSON."""
    y, p = np.asarray(y).astype(int), np.asarray(p)
    row = {"n": int(y.size), "prevalence": float(y.mean()) if y.size else float("nan")}
    metrics = {"auroc": roc_auc_score, "auprc": average_precision_score}
    if threshold is not None:
        row["threshold"] = threshold
        metrics["f1"] = lambda yy, pp: f1_score(yy, pp >= threshold, zero_division=0.0)
    for name, fn in metrics.items():
        e = bootstrap(y, p, fn, n_boot=n_boot, seed=seed)
        row.update({name: e.value, f"{name}_low": e.low, f"{name}_high": e.high})
    return row
