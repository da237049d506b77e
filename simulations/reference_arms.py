"""The bars the foundation model is held to, as arms of the study scored on its stays.

`gbm`: the gradient-boosted bag-of-tokens baseline (shared/evaluation/baseline.py), fitted
on the source's train split (the split every arm uses), scored on the source's test split
and zero-shot on every stay of the other real sites, as the foundation model is; and
fitted on the target's own train split, scored on its test split (`in_site`): the bar the
arms finetuned at the target are held to. A fitted tree ensemble is not an array a site
could send (in a deployment the baseline is fitted and scored at each site with `fedclif
baseline`), so it runs after the engine, in this process, on the timelines the virtual
sites wrote with the source's tokenizer.

`ceiling`: each stay scored by its truth (simulations/truth.py: the probability of its
recorded outcome given the first day), on the same stays, splits and bootstrap resamples
as the foundation model's rows, so the report pairs the two: the best any model could do
at that site.
"""

from pathlib import Path

import numpy as np
import polars as pl
from omegaconf import DictConfig

from fedclif.shared.evaluation.baseline import Dataset, features, load_dataset, make_model, target
from fedclif.shared.evaluation.metrics import binary_metrics
from fedclif.shared.model.sequences import load_site_data
from fedclif.shared.tokens.labels import TASKS, usable
from fedclif.shared.tokens.splits import assign_splits
from fedclif.simulations.sites import SOURCE, TARGET, THIRD
from fedclif.simulations.truth import truth_path

ARM, CEILING = "gbm", "ceiling"
# (site, setting, split) where the foundation model's arms are scored: the ceiling's rows.
CEILING_EVALUATIONS = (
    (SOURCE, "in_distribution", "test"),
    (TARGET, "zero_shot", "all"),
    (TARGET, "in_site", "test"),
    (THIRD, "zero_shot", "all"),
)


def gbm_rows(cfg: DictConfig, work: Path, source_tokenizer: str) -> list[dict]:
    """The arm's results rows; `work` holds each virtual site's work directory, and
    `source_tokenizer` is the hash of the tokenizer the source's model used."""
    c = cfg.study
    others = [TARGET] + ([THIRD] if c.sites.third else [])
    ds = {s: load_dataset(work / s / f"tokens-{source_tokenizer[:16]}") for s in [SOURCE, *others]}
    n_boot = int(cfg.train.finetune.n_boot)
    rows = []
    for task in c.tasks:
        fitted = _fit(ds[SOURCE], task, cfg.train.split)
        if fitted is None:
            continue
        model, y, p = fitted
        rows.append(_row(ARM, task, SOURCE, "in_distribution", "test", y, p, n_boot))
        for site in others:
            ti, ty = target(ds[site], TASKS[task])
            p = _score(model, ds[site], ti)
            rows.append(_row(ARM, task, site, "zero_shot", "all", ty, p, n_boot))
        if (fitted := _fit(ds[TARGET], task, cfg.train.split)) is not None:
            _, y, p = fitted
            rows.append(_row(ARM, task, TARGET, "in_site", "test", y, p, n_boot, [TARGET]))
    return rows


def _fit(d: Dataset, task: str, split_cfg: DictConfig):
    """(model fitted on `d`'s train split, test outcomes, test scores), or None when the
    train split holds one class."""
    split = assign_splits(d.patients, split_cfg)
    idx, y = target(d, TASKS[task])
    train, test = split[idx] == "train", split[idx] == "test"
    if np.unique(y[train]).size < 2:
        return None
    model = make_model("gbm", 0).fit(features(d.X[idx[train]], "gbm"), y[train])
    return model, y[test], _score(model, d, idx[test])


def _score(model, d: Dataset, rows: np.ndarray) -> np.ndarray:
    return model.predict_proba(features(d.X[rows], "gbm"))[:, 1]


def ceiling_rows(
    cfg: DictConfig, sites: dict[str, Path], work: Path, source_tokenizer: str
) -> list[dict]:
    """The ceiling's rows; `sites` maps each real site's role to its CLIF directory (its
    truth file beside it), `work` and `source_tokenizer` as for `gbm_rows`."""
    c, rows = cfg.study, []
    n_boot = int(cfg.train.finetune.n_boot)
    loaded = {}  # each site read once (the target is scored on two splits)
    for site, setting, split in CEILING_EVALUATIONS:
        if site not in sites:
            continue
        if site not in loaded:
            d = load_site_data(work / site / f"tokens-{source_tokenizer[:16]}", cfg.train.split)
            truth = d.stays.select("hospitalization_id").join(
                pl.read_parquet(truth_path(sites[site])), on="hospitalization_id", how="left"
            )
            loaded[site] = d, truth
        data, truth = loaded[site]
        at = data.rows(split)
        labels = data.labels[at]
        for task in c.tasks:
            label = TASKS[task]
            ok = usable(labels, label)
            y = labels.get_column(label).to_numpy()[ok].astype(int)
            p = truth.get_column(f"p_{label}").to_numpy()[at][ok]
            row = _row(CEILING, task, site, setting, split, y, p, n_boot, [])
            # One copy per seed (the same stays score every seed's models): the report
            # pairs the ceiling with each seed's row as it pairs two models.
            rows += [row | {"seed": int(seed)} for seed in c.seeds]
    return rows


def _row(
    arm: str,
    task: str,
    site: str,
    setting: str,
    split: str,
    y,
    p,
    n_boot: int,
    trained: list[str] | None = None,
) -> dict:
    m = binary_metrics(y, p, n_boot=n_boot, replicates=True)
    return {
        "arm": arm,
        "setting": setting,
        "seed": 0,  # deterministic: no subsampling, no early stopping, no training
        "task": task,
        "fraction": 1.0,
        "train_sites": [SOURCE] if trained is None else trained,
        "eval_site": site,
        "eval_split": split,
        **{k: v if isinstance(v, list) else float(v) for k, v in m.items()},
    }
