"""Bootstrap metrics: intervals, and the vectorised resample scorers against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from fedclif.shared.metrics import (
    auprc_rows,
    auroc_rows,
    binary_metrics,
    f1_rows,
    f1_threshold,
)


def test_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = y + rng.normal(0, 1.0, 400)
    m = binary_metrics(y, p, threshold=0.5, n_boot=200)
    for k in ("auroc", "auprc", "f1"):
        assert m[f"{k}_low"] < m[k] < m[f"{k}_high"]
    assert 0.7 < m["auroc"] < 0.85
    assert binary_metrics(y, y.astype(float), n_boot=50)["auroc"] == 1.0
    assert np.isnan(binary_metrics(np.zeros(10), np.arange(10.0))["auroc"])


@pytest.mark.parametrize("ties", [False, True])
def test_vectorised_scorers_equal_scikit_learn(ties):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (40, 60))
    y[:, :2] = [0, 1]  # both classes in every row
    p = rng.normal(size=(40, 60)) + y
    if ties:
        p = np.round(p, 0)  # many tied scores, within and across classes
    for rows, ref in (
        (auroc_rows, roc_auc_score),
        (auprc_rows, average_precision_score),
        (f1_rows(0.5), lambda a, b: f1_score(a, b >= 0.5)),
    ):
        np.testing.assert_allclose(rows(y, p), [ref(a, b) for a, b in zip(y, p, strict=True)])


def test_f1_threshold_is_the_best_cut():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = rng.random(300) * 0.5 + y * 0.3
    t = f1_threshold(y, p)
    best = f1_score(y, p >= t)
    assert all(f1_score(y, p >= c) <= best + 1e-12 for c in np.unique(p))
    assert f1_threshold(np.zeros(5), np.arange(5.0)) == 0.5
