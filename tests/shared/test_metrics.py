"""Bootstrap metrics: intervals, and the vectorised resample scorers against scikit-learn."""

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from fedclif.shared.evaluation.calibration import calibration, ece, platt
from fedclif.shared.evaluation.metrics import (
    auprc_rows,
    auroc_rows,
    binary_metrics,
    f1_rows,
    f1_threshold,
    paired_difference,
    paired_ratio,
)


def test_calibration_measures_and_platt_repairs_a_shifted_base_rate():
    """A model right about the ranking but trained where the outcome was three times as
    common: Brier (equal to scikit-learn's) and ECE see it, the curve's equal-mass bins lie
    under the diagonal, and Platt scaling on held-out stays of the new site repairs it."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=6000)
    y = (rng.random(6000) < expit(z - 2.0)).astype(int)  # the new site's truth
    p = expit(z - 0.8)  # the model's: the old site's base rate
    fit, test = slice(0, 3000), slice(3000, None)
    raw = calibration(y[test], p[test], n_boot=100)
    assert raw["brier"] == pytest.approx(brier_score_loss(y[test], p[test]))
    assert raw["brier_low"] < raw["brier"] < raw["brier_high"] and raw["calibration_n"] == 3000
    pred, obs = raw["reliability_predicted"], raw["reliability_observed"]
    assert len(pred) == len(obs) == 10 and np.all(np.diff(pred) > 0)
    assert np.all(np.array(obs) < np.array(pred)) and raw["ece"] > 0.1
    recal = calibration(y[test], platt(y[fit], p[fit])(p[test]), n_boot=100, suffix="_recal")
    assert recal["ece_recal"] < 0.03 and recal["brier_recal"] < raw["brier"]
    assert platt(np.zeros(5), np.linspace(0.1, 0.5, 5)) is None  # one class: nothing to fit
    # ECE is the bins' size-weighted gap: 0 when every bin's rate equals its mean prediction.
    q = np.repeat(np.linspace(0.05, 0.95, 10), 10)
    yy = np.concatenate([np.r_[np.ones(k), np.zeros(10 - k)] for k in range(1, 11)])
    assert ece(yy, np.repeat((np.arange(1, 11)) / 10, 10)) == pytest.approx(0.0)
    assert ece(yy, q) == pytest.approx(
        np.mean(np.abs(np.linspace(0.05, 0.95, 10) - np.arange(1, 11) / 10))
    )


@pytest.mark.parametrize("n", [200, 1600])
def test_interval_width_matches_the_hanley_mcneil_standard_error(n):
    """The bootstrap 95% interval of AUROC is as wide as the normal interval of Hanley and
    McNeil's (1982) closed-form standard error, within 15%, and narrows as 1/sqrt(n); it
    holds the estimate, as do AUPRC's and F1's."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    p = y + rng.normal(0, 1.0, n)
    m = binary_metrics(y, p, threshold=0.5, n_boot=1000)
    a, n1 = m["auroc"], y.sum()
    n0 = n - n1
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = np.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    assert (m["auroc_high"] - m["auroc_low"]) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.15)
    for k in ("auroc", "auprc", "f1"):
        assert m[f"{k}_low"] < m[k] < m[f"{k}_high"]
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p))
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


def _paired(y, a, b, n_boot=400) -> dict:
    ma, mb = (binary_metrics(y, p, n_boot=n_boot, replicates=True) for p in (a, b))
    return paired_difference(ma["auroc"], mb["auroc"], ma["auroc_boot"], mb["auroc_boot"])


def test_a_paired_bootstrap_says_beats_only_when_its_interval_excludes_zero():
    """Two models on the same stays: a clearly better one beats (the interval above 0, the
    verdict reversed when swapped); a small gap on 13 events, like the 0.809 vs 0.783 the
    study once printed as a win, is no clear difference; the replicates pair (same
    resamples), so the paired interval is narrower than the unpaired one."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 600)
    signal = y + rng.normal(0, 1.0, 600)
    good, weak = signal + rng.normal(0, 0.2, 600), signal + rng.normal(0, 2.0, 600)
    d = _paired(y, good, weak)
    assert d["verdict"] == "beats" and 0 < d["low"] <= d["difference"] <= d["high"]
    assert _paired(y, weak, good)["verdict"] == "worse"
    # Paired: a model against itself plus tiny noise differs by (almost) nothing.
    same = _paired(y, good, good + rng.normal(0, 1e-3, 600))
    assert same["verdict"] == "no clear difference" and same["high"] - same["low"] < 0.01
    # 13 events among 300 stays, AUROCs ~0.8 apart by ~0.03: no clear difference.
    y = np.zeros(300, int)
    y[rng.choice(300, 13, replace=False)] = 1
    base = 1.3 * y + rng.normal(0, 1.0, 300)
    a, b = base + rng.normal(0, 0.3, 300), base + rng.normal(0, 0.45, 300)
    small = _paired(y, a, b)
    assert abs(small["difference"]) < 0.06, small
    assert small["verdict"] == "no clear difference", small
    ra = binary_metrics(y, a, n_boot=400, replicates=True)
    assert len(ra["auroc_boot"]) == len(
        binary_metrics(y, b, n_boot=400, replicates=True)["auroc_boot"]
    )


def test_paired_ratio_is_a_percentage_with_the_replicates_interval():
    r = paired_ratio(0.8, 0.9, np.array([0.7, 0.8, 0.9]), np.array([0.9, 0.9, 0.9]))
    assert r["percent"] == pytest.approx(100 * 0.8 / 0.9)
    assert r["low"] == pytest.approx(np.percentile([700 / 9, 800 / 9, 100], 2.5))
    assert r["high"] == pytest.approx(np.percentile([700 / 9, 800 / 9, 100], 97.5))
