"""MEDS-Tab (MEDS_Tabular_AutoML: tabularization over look-back windows + XGBoost with an
Optuna sweep) as a peer on the study's synthetic sites: a gradient-boosting reference
nobody here wrote.

The study's source and target are exported with `fedclif export meds|labels` (the study's
patient split: train -> train, val -> tuning, test -> held_out); MEDS-Tab trains on the
source's train split, picks its trial on the source's tuning split, and is scored on the
source's held-out split (in-site) and on every target stay (zero-shot: the target's
subjects join held_out under offset ids, so they are scored, never trained or tuned on),
as the study's gbm arm and foundation model are. AUROCs carry bootstrap 95% intervals
(fedclif's metrics); given the study's results.json, fedclif's rows print beside them.

MEDS-Tab's MEDS-Transforms dependency pins polars < 2 (fedclif runs on 2), so it lives in
its own virtual environment, found by --meds-tab:

    python -m venv .venv-medstab && .venv-medstab/bin/pip install meds-tab==0.2.0
    fedclif simulate --profile quick --out runs/quick
    python -m bench.peer_meds_tab --profile quick --results runs/quick/results.json

Code inclusion (MEDS-Tab's `describe` counts codes over every shard it is given) sees the
held-out and target data's codes, never their labels.
"""

import argparse
import json
import logging
import subprocess
import time
from pathlib import Path

import meds
import numpy as np
import polars as pl
import pyarrow.parquet as pq

from fedclif.cli import main as fedclif
from fedclif.shared.evaluation.metrics import binary_metrics
from fedclif.simulations.commands import CACHE, load_study
from fedclif.simulations.sites import SOURCE, TARGET, study_sites

log = logging.getLogger("bench.peer_meds_tab")
# Subject ids are renumbered, the target's from OFFSET: both sites hash string patient ids
# the same way, so one id at both would be one subject.
OFFSET = 1 << 40
CORE = ("subject_id", "time", "code", "numeric_value")
SPLITS = ("train", "tuning", "held_out")
# The study's arms trained at the source alone: its gradient boosting and foundation model.
ARMS = ("gbm", "source_only")


def export(site: Path, out: Path, overrides: list[str]) -> tuple[Path, Path]:
    meds, labels = out / "meds", out / "labels"
    if not (out / ".complete").is_file():
        for args in (
            ["meds", str(site), "--out", str(meds), *overrides],
            ["labels", str(site), "--out", str(labels)],
        ):
            if fedclif(["export", *args]) != 0:
                raise SystemExit(f"fedclif export {' '.join(args)} failed (see above)")
        (out / ".complete").touch()
    return meds, labels


def _site(meds: Path, labels: Path, tasks: list[str], first: int) -> tuple[pl.DataFrame, dict]:
    """A site's events (with its split) and labels per task, subjects numbered from `first`."""
    files = sorted((meds / "data").glob("*.parquet"))
    data = pl.concat(pl.read_parquet(f, columns=list(CORE)) for f in files)
    split = pl.read_parquet(meds / "metadata" / "subject_splits.parquet")
    ids = split.with_columns((pl.int_range(pl.len()) + first).alias("new"))

    def renumber(df: pl.DataFrame) -> pl.DataFrame:
        out = df.join(ids, on="subject_id", how="left", validate="m:1")
        return out.with_columns(pl.col("new").alias("subject_id")).drop("new")

    return renumber(data), {t: renumber(pl.read_parquet(labels / t / "0.parquet")) for t in tasks}


def assemble(src: tuple[Path, Path], tgt: tuple[Path, Path], tasks: list[str], out: Path) -> Path:
    """MEDS-Tab's input, the target's subjects in held_out: data/<split>/0.parquet and
    labels/<task>/<split>/0.parquet."""
    source, src_labels = _site(*src, tasks, 0)
    target, tgt_labels = _site(*tgt, tasks, OFFSET)
    held_out = pl.lit("held_out").alias("split")
    frames = {"data": pl.concat([source, target.with_columns(held_out)])}
    for task in tasks:
        frames[f"labels/{task}"] = pl.concat(
            [src_labels[task], tgt_labels[task].with_columns(held_out)]
        )
    for where, df in frames.items():
        schema, time = (
            (meds.DataSchema, "time") if where == "data" else (meds.LabelSchema, "prediction_time")
        )
        for name in SPLITS:
            (out / where / name).mkdir(parents=True, exist_ok=True)
            part = df.filter(pl.col("split") == name).drop("split").sort("subject_id", time)
            pq.write_table(schema.align(part.to_arrow()), out / where / name / "0.parquet")
    return out


def tabularize(bin_dir: Path, inp: Path, out: Path, windows: str, workers: int) -> list[str]:
    """MEDS-Tab's features at every event time, once for all tasks; returns the settings
    the later steps repeat."""
    # MEDS-Tab's default aggregations but static/first: our static codes (sex, race,
    # ethnicity) carry no value, and MEDS-Tab refuses an aggregation with nothing to do.
    aggs = "[static/present,code/count,value/count,value/sum,value/sum_sqd,value/min,value/max]"
    tab = [
        f"input_dir={inp / 'data'}",
        f"output_dir={out}",
        f"tabularization.window_sizes={windows}",
        f"tabularization.aggs={aggs}",
        "tabularization.min_code_inclusion_count=10",
    ]
    parallel = ["--multirun", f"worker=range(0,{workers})", "hydra/launcher=joblib"]
    if not (out / ".complete").is_file():
        _step(bin_dir, "describe", tab[:2])
        _step(bin_dir, "tabularize-static", tab)
        _step(bin_dir, "tabularize-time-series", [*parallel, *tab])
        (out / ".complete").touch()
    return tab


def _step(bin_dir: Path, step: str, args: list[str]) -> None:
    t0 = time.perf_counter()
    res = subprocess.run([str(bin_dir / f"meds-tab-{step}"), *args], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"meds-tab-{step} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    log.info("meds-tab-%s %.1f s", step, time.perf_counter() - t0)


def fit(bin_dir: Path, inp: Path, out: Path, task: str, tab: list[str], trials: int) -> Path:
    """MEDS-Tab's task caching and XGBoost sweep for one task; returns the best trial's
    directory."""
    task_args = [*tab, f"task_name={task}"]
    _step(bin_dir, "cache-task", [*task_args, f"input_label_dir={inp / 'labels' / task}"])
    model = out / "model" / task
    sweep = [
        f"output_model_dir={model}",
        "model_launcher=xgboost",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.n_jobs=1",
    ]
    _step(bin_dir, "model", ["--multirun", *task_args, *sweep])
    best = sorted(model.glob("*/best_trial"))
    if not best:
        raise SystemExit(f"MEDS-Tab wrote no best trial under {model}")
    return best[-1]


def score(best: Path, n_boot: int) -> dict[str, dict]:
    pred = pl.read_parquet(best / "held_out_predictions.parquet")
    out = {}
    for site, rows in (
        (SOURCE, pred.filter(pl.col("subject_id") < OFFSET)),
        (TARGET, pred.filter(pl.col("subject_id") >= OFFSET)),
    ):
        y = rows["boolean_value"].to_numpy().astype(int)
        p = rows["predicted_boolean_probability"].to_numpy()
        m = binary_metrics(y, p, n_boot=n_boot)
        out[site] = {k: m[k] for k in ("n", "prevalence", "auroc", "auroc_low", "auroc_high")}
    return out


def fedclif_rows(results: Path, task: str) -> dict[str, dict]:
    """The study's gbm arm and source foundation model (finetuned at the source, all its
    data, mean over seeds) at the source's test split and the target."""
    rows = json.loads(results.read_text())["rows"]
    out: dict[str, dict] = {}
    for r in rows:
        if r["task"] != task or r["train_sites"] != [SOURCE] or r.get("fraction", 1.0) != 1.0:
            continue
        if r["eval_site"] not in (SOURCE, TARGET) or r["arm"] not in ARMS:
            continue
        out.setdefault(f"{r['arm']}@{r['eval_site']}", []).append(r)
    return {
        k: {
            "auroc": float(np.mean([r["auroc"] for r in v])),
            "auroc_low": float(np.mean([r["auroc_low"] for r in v])),
            "auroc_high": float(np.mean([r["auroc_high"] for r in v])),
            "n_seeds": len(v),
            "n": v[0]["n"],
        }
        for k, v in out.items()
    }


def _line(name: str, site: str, m: dict, note: str) -> str:
    ci = f"[{m['auroc_low']:.3f}, {m['auroc_high']:.3f}]"
    return f"  {name:<20} @{site:<7} AUROC {m['auroc']:.3f} {ci}  {note}"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--profile", default="quick")
    p.add_argument("--meds-tab", default=".venv-medstab", help="virtual env with meds-tab")
    p.add_argument("--work", default="runs/peer-meds-tab")
    p.add_argument("--results", help="the study's results.json, to print fedclif beside")
    p.add_argument("--trials", type=int, default=20, help="MEDS-Tab's Optuna trials per task")
    p.add_argument("--windows", default="[1d,7d,30d,365d,full]", help="MEDS-Tab's default")
    p.add_argument("--workers", type=int, default=2, help="parallel tabularization workers")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bin_dir = Path(args.meds_tab) / "bin"
    if not (bin_dir / "meds-tab-model").is_file():
        raise SystemExit(f"no meds-tab in {bin_dir}: see this script's docstring to install it")
    cfg = load_study(None, args.profile, [])
    work = Path(args.work) / args.profile
    dirs, _ = study_sites(cfg.study, CACHE)
    sites = dict(zip((SOURCE, TARGET), dirs[:2], strict=True))
    split = [f"train.split.{k}={v}" for k, v in cfg.train.split.items()]
    exported = {s: export(d, work / "export" / s, split) for s, d in sites.items()}
    tasks = list(cfg.study.tasks)
    inp = assemble(exported[SOURCE], exported[TARGET], tasks, work / "input")
    tab = tabularize(bin_dir, inp, work / "meds-tab", args.windows, args.workers)
    table = {}
    for task in tasks:
        t0 = time.perf_counter()
        best = fit(bin_dir, inp, work / "meds-tab", task, tab, args.trials)
        table[task] = {"meds_tab": score(best, int(cfg.train.finetune.n_boot))}
        table[task]["meds_tab"]["seconds"] = round(time.perf_counter() - t0, 1)
        if args.results:
            table[task]["fedclif"] = fedclif_rows(Path(args.results), task)
    (work / "peer.json").write_text(json.dumps(table, indent=1))
    for task, t in table.items():
        print(f"\n{task}")
        for site in (SOURCE, TARGET):
            m = t["meds_tab"][site]
            print(_line("MEDS-Tab", site, m, f"n={m['n']} prevalence={m['prevalence']:.3f}"))
            for arm in ARMS:
                if f := t.get("fedclif", {}).get(f"{arm}@{site}"):
                    print(
                        _line(
                            f"fedclif {arm}", site, f, f"n={f['n']}, mean of {f['n_seeds']} seed(s)"
                        )
                    )
    print(f"\nwrote {work / 'peer.json'}")


if __name__ == "__main__":
    main()
