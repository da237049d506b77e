"""The gradient-boosted bag-of-tokens baseline (shared/evaluation/baseline.py) as an arm of
the study: fitted on the source's train split (the split every arm uses), scored on the
source's test split and zero-shot on every stay of the other real sites, as the foundation
model is. Its
rows have the study's shape, so the report compares the two on the same stays.

It runs after the engine, in this process, on the timelines the virtual sites wrote with
the source's tokenizer: a fitted tree ensemble is not an array a site could send (in a
deployment the baseline would be fitted and scored at each site with `fedclif baseline`)."""

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fedclif.shared.evaluation.baseline import Dataset, features, load_dataset, make_model, target
from fedclif.shared.evaluation.metrics import binary_metrics
from fedclif.shared.tokens.labels import TASKS
from fedclif.shared.tokens.splits import assign_splits
from fedclif.simulations.sites import SOURCE, TARGET, THIRD

ARM = "gbm"


def gbm_rows(cfg: DictConfig, work: Path, source_tokenizer: str) -> list[dict]:
    """The arm's results rows; `work` holds each virtual site's work directory, and
    `source_tokenizer` is the hash of the tokenizer the source's model used."""
    c = cfg.study
    others = [TARGET] + ([THIRD] if c.sites.third else [])
    ds = {s: load_dataset(work / s / f"tokens-{source_tokenizer[:16]}") for s in [SOURCE, *others]}
    split = assign_splits(ds[SOURCE].patients, cfg.train.split)
    n_boot = int(cfg.train.finetune.n_boot)
    rows = []
    for task in c.tasks:
        idx, y = target(ds[SOURCE], TASKS[task])
        train, test = split[idx] == "train", split[idx] == "test"
        if np.unique(y[train]).size < 2:
            continue
        model = make_model("gbm", 0).fit(features(ds[SOURCE].X[idx[train]], "gbm"), y[train])
        rows.append(
            _row(
                task,
                SOURCE,
                "in_distribution",
                "test",
                y[test],
                _score(model, ds[SOURCE], idx[test]),
                n_boot,
            )
        )
        for site in others:
            ti, ty = target(ds[site], TASKS[task])
            p = _score(model, ds[site], ti)
            rows.append(_row(task, site, "zero_shot", "all", ty, p, n_boot))
    return rows


def _score(model, d: Dataset, rows: np.ndarray) -> np.ndarray:
    return model.predict_proba(features(d.X[rows], "gbm"))[:, 1]


def _row(task: str, site: str, setting: str, split: str, y, p, n_boot: int) -> dict:
    m = binary_metrics(y, p, n_boot=n_boot, replicates=True)
    return {
        "arm": ARM,
        "setting": setting,
        "seed": 0,  # deterministic: no subsampling, no early stopping
        "task": task,
        "fraction": 1.0,
        "train_sites": [SOURCE],
        "eval_site": site,
        "eval_split": split,
        **{k: v if isinstance(v, list) else float(v) for k, v in m.items()},
    }
