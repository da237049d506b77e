"""Discrimination metrics with bootstrap confidence intervals."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


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


def auprc(y: np.ndarray, p: np.ndarray, **kw) -> Estimate:
    return bootstrap(y, p, average_precision_score, **kw)
