"""Calibration of predicted probabilities: Brier score, expected calibration error, the
reliability curve, and Platt recalibration on held-out data.

A model moved to another hospital usually fails first in calibration (the outcome's base
rate moves), and a few labelled stays there repair that much more cheaply than they
repair discrimination. Bins are equal-mass (deciles of the predictions): at low
prevalence equal-width bins would put almost every stay in the first one, and every bin
holds at least n // bins stays, which is what a site's policy checks before a curve
leaves (client/policy.py `withhold`).
"""

import numpy as np
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression

from fedclif.shared.evaluation.metrics import resamples

BINS = 10


def reliability(
    y: np.ndarray, p: np.ndarray, bins: int = BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted, observed rate, size) of each of `bins` equal-mass bins of `p`."""
    parts = np.array_split(np.argsort(p, kind="stable"), bins)
    return (
        np.array([p[i].mean() for i in parts]),
        np.array([y[i].mean() for i in parts]),
        np.array([i.size for i in parts]),
    )


def _ece(predicted: np.ndarray, observed: np.ndarray, sizes: np.ndarray) -> float:
    return float(np.sum(np.abs(predicted - observed) * sizes) / sizes.sum())


def ece(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the bins' |predicted - observed|, weighted by size."""
    return _ece(*reliability(y, p, bins))


def brier_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Brier score of each row of [resamples, n] arrays (shared/evaluation/metrics.py
    `resamples`)."""
    return ((p - y) ** 2).mean(1)


def platt(y_fit: np.ndarray, p_fit: np.ndarray):
    """A map of probabilities fitted on held-out (y, p): logistic regression on the logit
    (Platt scaling; two parameters, so a few dozen stays suffice). None when `y_fit` has
    one class."""
    if np.unique(y_fit).size < 2:
        return None
    z = logit(np.clip(p_fit, 1e-6, 1 - 1e-6))[:, None]
    lr = LogisticRegression(C=1e4).fit(z, y_fit)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return lambda p: expit(a * logit(np.clip(p, 1e-6, 1 - 1e-6)) + b)


def calibration(
    y: np.ndarray, p: np.ndarray, n_boot: int = 500, seed: int = 0, suffix: str = ""
) -> dict:
    """Brier score (with its bootstrap 95% interval), ECE and the reliability curve of
    (y, p), flat; keys end in `suffix` (`_recal`: after recalibration)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    if y.size < BINS:
        return {}
    reps = resamples(y, p, brier_rows, n_boot, seed)
    pred, obs, sizes = reliability(y, p)  # binned once, for the curve and the ECE
    return {
        f"calibration_n{suffix}": int(y.size),
        f"brier{suffix}": float(np.mean((p - y) ** 2)),
        f"brier{suffix}_low": float(np.percentile(reps, 2.5)),
        f"brier{suffix}_high": float(np.percentile(reps, 97.5)),
        f"ece{suffix}": _ece(pred, obs, sizes),
        f"reliability_predicted{suffix}": [float(x) for x in pred],
        f"reliability_observed{suffix}": [float(x) for x in obs],
    }
