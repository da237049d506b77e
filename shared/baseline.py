"""Bag-of-tokens baseline: counts of first-24 h tokens plus age, with logistic regression or
gradient boosting (the EHRMamba paper's XGBoost-style baseline, via scikit-learn)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import sparse
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler

from shared.errors import FedclifError
from shared.labels import LABELS, WINDOW_FLAGGED
from shared.metrics import Estimate, auprc, auroc
from shared.timelines import LABELS as LABELS_FILE
from shared.timelines import read_timelines

MODELS = ("logreg", "gbm")


@dataclass
class Dataset:
    """A tokenized site as a feature matrix with its labels."""

    name: str
    ids: np.ndarray
    patients: np.ndarray
    X: sparse.csr_matrix
    labels: pl.DataFrame
    tokenizer_hash: str


def load_dataset(path: str | Path) -> Dataset:
    tl, tok = read_timelines(path)
    labels = pl.read_parquet(Path(path) / LABELS_FILE)
    tl = tl.join(labels.select("hospitalization_id"), on="hospitalization_id", how="semi")
    labels = tl.select("hospitalization_id").join(labels, on="hospitalization_id", how="left")
    lengths = tl.get_column("n_tokens_24h").to_numpy()
    rows = np.repeat(np.arange(tl.height), lengths)
    cols = tl.get_column("tokens_24h").explode().drop_nulls().to_numpy()
    counts = sparse.csr_matrix(
        (np.ones(cols.size, np.float32), (rows, cols)), shape=(tl.height, len(tok.vocab))
    )
    counts.data = np.log1p(counts.data)  # duplicates were summed by the constructor
    age = tl.get_column("age").fill_null(strategy="mean").to_numpy().astype(np.float32) / 100
    X = sparse.hstack([counts, sparse.csr_matrix(age[:, None])]).tocsr()
    return Dataset(
        str(path),
        tl.get_column("hospitalization_id").to_numpy(),
        tl.get_column("patient_id").to_numpy(),
        X,
        labels,
        tok.hash,
    )


def target(
    ds: Dataset, label: str, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, 0/1 outcomes) usable for a label: known outcome, and for ICU and
    ventilation not already happened in the input window."""
    y = ds.labels.get_column(label)
    ok = y.is_not_null().to_numpy()
    if label in WINDOW_FLAGGED:
        ok &= ~ds.labels.get_column(f"{label}_24h").fill_null(False).to_numpy()
    if rows is not None:
        mask = np.zeros(ok.size, bool)
        mask[rows] = True
        ok &= mask
    idx = np.flatnonzero(ok)
    return idx, y.to_numpy()[idx].astype(int)


def make_model(kind: str, seed: int):
    if kind == "logreg":
        return make_pipeline(MaxAbsScaler(), LogisticRegression(C=0.1, max_iter=2000))
    if kind == "gbm":
        return HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.05, max_leaf_nodes=15, random_state=seed
        )
    raise FedclifError(f"unknown baseline model {kind!r}; choose from {', '.join(MODELS)}")


def patient_split(ds: Dataset, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out rows, split by patient so no patient is on both sides."""
    pats = np.unique(ds.patients)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(pats, round(len(pats) * test_share), replace=False))
    test = np.array([p in held for p in ds.patients])
    return np.flatnonzero(~test), np.flatnonzero(test)


def run_baseline(
    train: Dataset,
    tests: list[Dataset],
    labels: tuple[str, ...] = LABELS,
    models: tuple[str, ...] = MODELS,
    seed: int = 0,
    test_share: float = 0.3,
    n_boot: int = 500,
) -> list[dict]:
    """Train on `train` (minus a held-out share) and evaluate in-site and at every test site."""
    for t in tests:
        if t.tokenizer_hash != train.tokenizer_hash:
            raise FedclifError(
                f"{t.name} was tokenized with another tokenizer than "
                f"{train.name}; tokenize every site with the same tokenizer.json"
            )
    fit_rows, held_rows = patient_split(train, test_share, seed)
    results = []
    for label in labels:
        idx, y = target(train, label, fit_rows)
        if len(np.unique(y)) < 2:
            continue
        for kind in models:
            model = make_model(kind, seed)
            X = train.X[idx]
            model.fit(X.toarray() if kind == "gbm" else X, y)
            evals = [(f"{train.name} (held out)", train, held_rows)] + [
                (t.name, t, None) for t in tests
            ]
            for where, ds, rows in evals:
                ti, ty = target(ds, label, rows)
                Xt = ds.X[ti]
                p = model.predict_proba(Xt.toarray() if kind == "gbm" else Xt)[:, 1]
                a: Estimate = auroc(ty, p, n_boot=n_boot, seed=seed)
                ap: Estimate = auprc(ty, p, n_boot=n_boot, seed=seed)
                results.append(
                    {
                        "model": kind,
                        "label": label,
                        "test": where,
                        "n": int(ty.size),
                        "prevalence": float(ty.mean()) if ty.size else float("nan"),
                        "auroc": a.value,
                        "auroc_low": a.low,
                        "auroc_high": a.high,
                        "auprc": ap.value,
                        "auprc_low": ap.low,
                        "auprc_high": ap.high,
                    }
                )
    return results
