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

import numpy as np
import polars as pl

from fedclif.cli import main as fedclif
from fedclif.shared.metrics import binary_metrics
from fedclif.simulations.commands import CACHE, load_study
from fedclif.simulations.sites import SOURCE, TARGET, study_sites

log = logging.getLogger("bench.peer_meds_tab")
# Target subject ids are shifted past every source id: both sites hash ids the same way.
OFFSET = 1 << 62
CORE = ("subject_id", "time", "code", "numeric_value")
SPLITS = ("train", "tuning", "held_out")
# The study's arms trained at the source alone: its gradient boosting and foundation model.
ARMS = ("gbm", "source_only")


def export(site: Path, out: Path, overrides: list[str]) -> tuple[Path, Path]:
    meds, labels = out / "meds", out / "labels"
    if not (out / ".complete").is_file():
        assert fedclif(["export", "meds", str(site), "--out", str(meds), *overrides]) == 0
        assert fedclif(["export", "labels", str(site), "--out", str(labels)]) == 0
        (out / ".complete").touch()
    return meds, labels


def _data(meds: Path, shift: int) -> pl.DataFrame:
    frames = [
        pl.read_parquet(f, columns=list(CORE)) for f in sorted((meds / "data").glob("*.parquet"))
    ]
    return pl.concat(frames).with_columns(pl.col("subject_id") + shift)


def assemble(src: tuple[Path, Path], tgt: tuple[Path, Path], tasks: list[str], out: Path) -> Path:
    """MEDS-Tab's input: data/{train,tuning,held_out}/0.parquet (the target in held_out)
    and labels/<task>/{source,target}.parquet."""
    split = pl.read_parquet(src[0] / "metadata" / "subject_splits.parquet")
    source = _data(src[0], 0).join(split, on="subject_id", how="left")
    target = _data(tgt[0], OFFSET).with_columns(pl.lit("held_out").alias("split"))
    for name in SPLITS:
        part = pl.concat([source, target]).filter(pl.col("split") == name).drop("split")
        (out / "data" / name).mkdir(parents=True, exist_ok=True)
        part.sort("subject_id", "time", nulls_last=False).write_parquet(
            out / "data" / name / "0.parquet"
        )
    for task in tasks:
        (out / "labels" / task).mkdir(parents=True, exist_ok=True)
        for who, (_, labels), shift in (("source", src, 0), ("target", tgt, OFFSET)):
            pl.read_parquet(labels / f"{task}.parquet").with_columns(
                pl.col("subject_id") + shift
            ).write_parquet(out / "labels" / task / f"{who}.parquet")
    return out


def run_meds_tab(bin_dir: Path, inp: Path, out: Path, task: str, trials: int, windows: str) -> Path:
    """MEDS-Tab's five steps for one task; returns the best trial's directory."""
    common = [
        f"input_dir={inp / 'data'}",
        f"output_dir={out}",
        f"tabularization.window_sizes={windows}",
        "tabularization.min_code_inclusion_count=10",
    ]
    steps = [
        ("describe", []),
        ("tabularize-static", []),
        ("tabularize-time-series", []),
        ("cache-task", [f"input_label_dir={inp / 'labels' / task}", f"task_name={task}"]),
        (
            "model",
            [
                "--multirun",
                "model_launcher=xgboost",
                f"task_name={task}",
                f"output_model_dir={out / 'model' / task}",
                f"hydra.sweeper.n_trials={trials}",
                "hydra.sweeper.n_jobs=1",
            ],
        ),
    ]
    done = out / ".tabularized"
    for step, extra in steps:
        if step in ("describe", "tabularize-static", "tabularize-time-series") and done.is_file():
            continue
        t0 = time.perf_counter()
        cmd = [str(bin_dir / f"meds-tab-{step}"), *extra, *common]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"meds-tab-{step} failed ({res.returncode}):\n{res.stderr[-4000:]}")
        log.info("%s: meds-tab-%s %.1f s", task, step, time.perf_counter() - t0)
        if step == "tabularize-time-series":
            done.touch()
    best = sorted((out / "model" / task).glob("*/best_trial"))
    if not best:
        raise SystemExit(f"MEDS-Tab wrote no best trial under {out / 'model' / task}")
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
        out[site] = {k: m[k] for k in ("n", "prevalence", "auroc", "auroc_lo", "auroc_hi")}
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
            "auroc_lo": float(np.mean([r["auroc_lo"] for r in v])),
            "auroc_hi": float(np.mean([r["auroc_hi"] for r in v])),
            "n_seeds": len(v),
        }
        for k, v in out.items()
    }


def _line(name: str, site: str, m: dict, note: str) -> str:
    ci = f"[{m['auroc_lo']:.3f}, {m['auroc_hi']:.3f}]"
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
    p.add_argument("--windows", default="[1d,7d,30d,365d,full]")
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
    table = {}
    for task in tasks:
        t0 = time.perf_counter()
        best = run_meds_tab(bin_dir, inp, work / "meds-tab", task, args.trials, args.windows)
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
                    print(_line(f"fedclif {arm}", site, f, f"mean of {f['n_seeds']} seed(s)"))
    print(f"\nwrote {work / 'peer.json'}")


if __name__ == "__main__":
    main()
