"""Bag-of-tokens baseline: counts of first-24 h tokens plus age, with logistic regression or
gradient boosting (the EHRMamba paper's XGBoost-style baseline, via scikit-learn)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import sparse
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler

from fedclif.shared.errors import FedclifError
from fedclif.shared.evaluation.metrics import binary_metrics
from fedclif.shared.tokens.labels import LABELS, usable
from fedclif.shared.tokens.timelines import LABELS as LABELS_FILE
from fedclif.shared.tokens.timelines import read_timelines

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
    # Only the input window is a feature: the full-stay columns are never read.
    tl, tok = read_timelines(
        path, ["hospitalization_id", "patient_id", "age", "n_tokens_24h", "tokens_24h"]
    )
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


def target(ds: Dataset, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, 0/1 outcomes) usable for a label: known outcome, and for ICU and
    ventilation not already happened in the input window."""
    idx = np.flatnonzero(usable(ds.labels, label))
    return idx, ds.labels.get_column(label).to_numpy()[idx].astype(int)


def make_model(kind: str, seed: int):
    if kind == "logreg":
        return make_pipeline(MaxAbsScaler(), LogisticRegression(C=0.1, max_iter=2000))
    if kind == "gbm":
        return HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.05, max_leaf_nodes=15, random_state=seed
        )
    raise FedclifError(f"unknown baseline model {kind!r}; choose from {', '.join(MODELS)}")


def _row(
    kind: str, label: str, where: str, y: np.ndarray, p: np.ndarray, n_boot: int, seed: int
) -> dict:
    return {
        "model": kind,
        "label": label,
        "test": where,
        **binary_metrics(y, p, n_boot=n_boot, seed=seed),
    }


def run_baseline(
    train: Dataset,
    tests: list[Dataset],
    labels: tuple[str, ...] = LABELS,
    models: tuple[str, ...] = MODELS,
    seed: int = 0,
    folds: int = 5,
    n_boot: int = 500,
) -> list[dict]:
    """Evaluate in-site and at every test site.

    In-site scores are out-of-fold: folds are grouped by patient, so every stay is scored
    by a model that never saw its patient, and the estimate uses every stay of the site.
    Other sites are scored by the model fitted on the whole training site.
    """
    for t in tests:
        if t.tokenizer_hash != train.tokenizer_hash:
            raise FedclifError(
                f"{t.name} was tokenized with another tokenizer than "
                f"{train.name}; tokenize every site with the same tokenizer.json"
            )
    results = []
    for label in labels:
        idx, y = target(train, label)
        if np.bincount(y, minlength=2).min() < folds:
            continue
        for kind in models:
            X = features(train.X[idx], kind)
            oof = cross_val_predict(
                make_model(kind, seed),
                X,
                y,
                groups=train.patients[idx],
                cv=GroupKFold(folds),
                method="predict_proba",
            )[:, 1]
            results.append(
                _row(kind, label, f"{train.name} (in-site, {folds}-fold)", y, oof, n_boot, seed)
            )
            model = make_model(kind, seed).fit(X, y)
            for t in tests:
                ti, ty = target(t, label)
                p = model.predict_proba(features(t.X[ti], kind))[:, 1]
                results.append(_row(kind, label, t.name, ty, p, n_boot, seed))
    return results


def features(X: sparse.csr_matrix, kind: str):
    # Gradient boosting in scikit-learn takes dense input only.
    return X.toarray() if kind == "gbm" else X
