"""Discrimination metrics with bootstrap confidence intervals.

Point estimates come from scikit-learn. The bootstrap resamples are scored by the
vectorised equivalents below: scikit-learn's input validation costs milliseconds per
call, which made 500 resamples x labels x sites the slowest part of an evaluation.
tests/shared/test_metrics.py checks that both agree.
"""

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

# False-positive rates at which an ROC curve is kept: an aggregate small enough to leave
# a site, and the same grid everywhere so curves average across seeds.
FPR_GRID = np.linspace(0.0, 1.0, 21)


def auroc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUROC of each row of [resamples, n] arrays (Mann-Whitney U with tied ranks)."""
    r = rankdata(p, axis=1)
    n1 = y.sum(1)
    n0 = y.shape[1] - n1
    return ((r * y).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def auprc_rows(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Average precision of each row, with ties grouped as scikit-learn does."""
    out = np.empty(y.shape[0])
    for i in range(y.shape[0]):
        o = np.argsort(-p[i], kind="stable")
        ps, ys = p[i][o], y[i][o]
        last = np.r_[np.flatnonzero(np.diff(ps)), ps.size - 1]  # end of each tie group
        tp = np.cumsum(ys)[last]
        precision = tp / (last + 1)
        recall = tp / tp[-1]
        out[i] = np.sum(np.diff(recall, prepend=0.0) * precision)
    return out


def f1_rows(threshold: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def f1(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        pred = p >= threshold
        tp = (pred & (y == 1)).sum(1)
        return 2 * tp / np.maximum(pred.sum(1) + y.sum(1), 1)

    return f1


def resamples(
    y: np.ndarray, p: np.ndarray, rows: Callable = auroc_rows, n_boot: int = 1000, seed: int = 0
) -> np.ndarray:
    """`rows` over `n_boot` resamples of the stays (those with both classes). The resamples
    depend only on the number of stays, the labels and `seed`: two models scored on the
    same stays in the same order with one seed get paired replicates."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    idx = np.random.default_rng(seed).integers(0, y.size, (n_boot, y.size))
    yb, pb = y[idx], p[idx]
    both = yb.min(1) != yb.max(1)
    return rows(yb[both], pb[both])


def bootstrap(
    y: np.ndarray,
    p: np.ndarray,
    metric: Callable = roc_auc_score,
    rows: Callable = auroc_rows,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(estimate, low, high): `metric` on the data, percentile interval of `rows` over
    resamples; resamples with one class are skipped. NaNs when `y` has one class."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    if len(np.unique(y)) < 2:
        return float("nan"), float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(resamples(y, p, rows, n_boot, seed), [tail, 100 - tail])
    return float(metric(y, p)), float(lo), float(hi)


def paired_difference(
    a: np.ndarray, b: np.ndarray, a_reps: np.ndarray, b_reps: np.ndarray, level: float = 0.95
) -> dict:
    """Metric `a` minus `b` (two models on the same stays) with the percentile interval of
    the differences of their paired bootstrap replicates (`resamples` with one seed; each
    argument may average several tasks or seeds, replicate by replicate), and the verdict
    it allows: "beats" or "worse" only when the interval excludes 0."""
    d = np.asarray(a_reps, float) - np.asarray(b_reps, float)
    tail = (1 - level) / 2 * 100
    lo, hi = (float(x) for x in np.percentile(d, [tail, 100 - tail]))
    verdict = "beats" if lo > 0 else "worse" if hi < 0 else "no clear difference"
    return {"difference": float(a - b), "low": lo, "high": hi, "verdict": verdict}


def paired_ratio(
    a: float, b: float, a_reps: np.ndarray, b_reps: np.ndarray, level: float = 0.95
) -> dict:
    """Metric `a` as a percentage of `b` (two models on the same stays) with the percentile
    interval of the ratios of their paired bootstrap replicates (as `paired_difference`)."""
    ratio = 100 * np.asarray(a_reps, float) / np.asarray(b_reps, float)
    tail = (1 - level) / 2 * 100
    lo, hi = (float(x) for x in np.percentile(ratio, [tail, 100 - tail]))
    return {"percent": float(100 * a / b), "low": lo, "high": hi}


# A difference of two metrics read as a drop from the first to the second.
DROP_WORDS = {"beats": "drop", "worse": "rise", "no clear difference": "level"}


def difference_text(d: dict, words: dict | None = None, verdict: bool = True) -> str:
    """A `paired_difference` as text: `+0.071 [+0.034, +0.102] beats` (`words` renames
    the verdict; without `verdict`, none); a comparison that was not measured says so."""
    if "difference" not in d:
        return d["verdict"]
    text = f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
    return f"{text} {(words or {}).get(d['verdict'], d['verdict'])}" if verdict else text


def f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability cut that maximises F1 (chosen on validation data, applied to test);
    0.5 when `y` has a single class."""
    if len(np.unique(y)) < 2:
        return 0.5
    prec, rec, thr = precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    return float(thr[int(np.argmax(f1))])


def binary_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float | None = None,
    n_boot: int = 500,
    seed: int = 0,
    replicates: bool = False,
) -> dict:
    """AUROC and AUPRC (and F1 at `threshold`) with bootstrap 95% intervals, and the ROC
    curve as TPR at FPR_GRID (when both classes are present), flat for JSON; with
    `replicates`, the AUROC and AUPRC of every resample too (`auroc_boot`, `auprc_boot`, for
    `paired_difference`)."""
    y, p = np.asarray(y).astype(int), np.asarray(p)
    row = {"n": int(y.size), "prevalence": float(y.mean()) if y.size else float("nan")}
    metrics = {
        "auroc": (roc_auc_score, auroc_rows),
        "auprc": (average_precision_score, auprc_rows),
    }
    if threshold is not None:
        row["threshold"] = threshold
        metrics["f1"] = (
            lambda yy, pp: f1_score(yy, pp >= threshold, zero_division=0.0),
            f1_rows(threshold),
        )
    for name, (fn, rows) in metrics.items():
        v, lo, hi = bootstrap(y, p, fn, rows, n_boot=n_boot, seed=seed)
        row.update({name: v, f"{name}_low": lo, f"{name}_high": hi})
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        row["tpr_at_fpr"] = [float(t) for t in np.interp(FPR_GRID, fpr, tpr)]
        if replicates:
            for name, rows in (("auroc", auroc_rows), ("auprc", auprc_rows)):
                reps = resamples(y, p, rows, n_boot, seed)
                row[f"{name}_boot"] = [round(float(x), 5) for x in reps]
    return row


def flat_metrics(per_task: dict[str, dict]) -> dict:
    """`{task: binary_metrics}` as one flat record (`<task>_<metric>`, lists kept: the ROC
    curve) with `num_examples`, the shape evaluation replies carry."""
    flat = {
        f"{t}_{k}": [float(x) for x in v] if isinstance(v, list) else float(v)
        for t, m in per_task.items()
        for k, v in m.items()
    }
    return {"num_examples": sum(m["n"] for m in per_task.values()), **flat}
