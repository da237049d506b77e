"""The transfer study's report from its results.json: the paper-style table (ours beside
arXiv 2504.10422's), the properties the simulation must show, report.md and PNGs (AUROC by
arm and task, recovery against the target's data fraction, ROC curves, the cross-site
matrix)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

from fedclif.shared.artifact import write_json
from fedclif.shared.config import RESOLVED
from fedclif.shared.evaluation.metrics import (
    DROP_WORDS,
    FPR_GRID,
    difference_text,
    paired_difference,
)
from fedclif.simulations.calibration_report import (
    calibration_cells,
    calibration_markdown,
    reliability_png,
    select,
)
from fedclif.simulations.ceiling_report import (
    ceiling_markdown,
    gap_split,
    headline,
    recovery_to_ceiling,
    share_of_ceiling,
)
from fedclif.simulations.objectives_report import ablation, ablation_markdown, ablation_png
from fedclif.simulations.published import federated_share, penalty, published_markdown
from fedclif.simulations.sites import SOURCE, TARGET

# Columns of the paper-style table: (label, arm, setting, evaluated at).
COLUMNS = [
    ("in-distribution", "source_only", "in_distribution", SOURCE),
    ("zero-shot", "source_only", "zero_shot", TARGET),
    # Linear probes on the source's frozen pretrained model, fitted at the source.
    ("probe in-distribution", "source_only_probe", "in_distribution", SOURCE),
    ("probe zero-shot", "source_only_probe", "zero_shot", TARGET),
    ("local finetune", "source_finetuned", "local_finetune", TARGET),
    ("target only", "target_only", "local_finetune", TARGET),
    ("federated + finetune", "federated_finetuned", "local_finetune", TARGET),
    ("pooled", "pooled", "pooled", TARGET),
    # The bar for the arms finetuned at the target: the tree fitted on the target's own
    # train split, scored on its test split (simulations/reference_arms.py).
    ("GBM in-site", "gbm", "in_site", TARGET),
    # The best any model could do on those stays (simulations/truth.py).
    ("ceiling", "ceiling", "in_site", TARGET),
]
PAPER = {
    "in-distribution": "in_distribution",
    "zero-shot": "zero_shot",
    "local finetune": "local_finetune",
}
# Calibration: the arms that are the foundation model itself (a probe is a logistic
# regression; the tree's and the ceiling's rows carry no calibration).
REFERENCE_ARMS = ("gbm", "ceiling")
CALIBRATION_COLUMNS = [c for c in COLUMNS if "probe" not in c[0] and c[1] not in REFERENCE_ARMS]
# Fewest positives (and negatives) in the target's test split for a task to count in the
# recovery check.
MIN_EVENTS = 10
RECOVERY_ARMS = {
    "source_finetuned": "source model, finetuned at target",
    "target_only": "target from scratch",
    "federated_finetuned": "federated model, finetuned at target",
}


def _cell(rows: list[dict], arm: str, setting: str, site: str, task: str, frac: float) -> dict:
    """Mean over seeds of AUROC, its bootstrap interval and AUPRC."""
    sel = select(rows, arm, setting, site, task, frac)
    if not sel:
        return {}
    mean = {
        k: float(np.nanmean([r[k] for r in sel]))
        for k in ("auroc", "auroc_low", "auroc_high", "auprc", "auprc_low", "auprc_high")
    }
    mean["seeds"] = len(sel)
    mean["auroc_sd"] = float(np.nanstd([r["auroc"] for r in sel]))
    return mean


def _events(rows: list[dict], site: str, task: str) -> int:
    """The smaller class count of `site`'s test split for `task` (0: never evaluated)."""
    sel = [
        r
        for r in rows
        if r["eval_site"] == site and r["eval_split"] == "test" and r["task"] == task
    ]
    if not sel:
        return 0
    n, prev = sel[0]["n"], sel[0]["prevalence"]
    return round(min(n * prev, n * (1 - prev)))


def _compare(
    rows: list[dict],
    a: dict,
    b: dict,
    tasks: list[str],
    paired: bool = True,
    metric: str = "auroc",
) -> dict:
    """Rows matching `a` against rows matching `b` (each a dict of row fields): mean
    `metric` (auroc or auprc) over seeds and `tasks`, a minus b, with the 95% interval of
    the bootstrap replicates' differences, replicate by replicate. On the same test stays
    (`paired`) the replicates share their resamples (a paired bootstrap,
    shared/evaluation/metrics.py). On two sites' stays they must be independent: resample k draws
    the same relative positions at both sites (one seed), so b's replicates are shuffled
    first. Rows of seeds only one side has (a single-seed arm) are averaged as they are."""
    ma, mb, b_reps, a_reps = _means(rows, a, b, tasks, metric)
    if ma is None:
        return {"verdict": "not measured"}  # no replicates (or no measurable task)
    if not paired:
        b_reps = np.random.default_rng(0).permutation(b_reps)
    return paired_difference(ma, mb, a_reps, b_reps)


def _means(rows: list[dict], a: dict, b: dict, tasks: list[str], metric: str) -> tuple:
    """(mean metric of a, of b, b's mean replicates, a's): over the (seed, task) cells
    both have, or, when one side has a single seed, over each side's own cells of the
    tasks both have. Nones when a cell lacks replicates."""

    def cells(sel: dict) -> dict:
        return {
            (r["seed"], r["task"]): r
            for r in rows
            if r["task"] in tasks
            and all(abs(r[k] - v) < 1e-9 if k == "fraction" else r[k] == v for k, v in sel.items())
        }

    ca, cb = cells(a), cells(b)
    keys = sorted(ca.keys() & cb.keys())
    if keys:
        ka = kb = keys
    else:  # a single-seed arm (the gradient-boosting baseline) against a multi-seed one
        common = {t for _, t in ca} & {t for _, t in cb}
        ka = sorted(k for k in ca if k[1] in common)
        kb = sorted(k for k in cb if k[1] in common)
    boot = f"{metric}_boot"
    reps = [ca[k].get(boot) for k in ka] + [cb[k].get(boot) for k in kb]
    if not ka or not kb or not all(reps):
        return None, None, None, None
    m = min(len(x) for x in reps)

    def mean(xs):
        return np.mean(np.asarray([x[:m] if isinstance(x, list) else x for x in xs], float), 0)

    # Per task first, then over tasks: seeds count once per task on each side.
    def side(c: dict, ks: list, key: str):
        by_task = {}
        for k in ks:
            by_task.setdefault(k[1], []).append(c[k][key])
        return mean([mean(v) for v in by_task.values()])

    return (
        side(ca, ka, metric),
        side(cb, kb, metric),
        side(cb, kb, boot),
        side(ca, ka, boot),
    )


def _paired(rows: list[dict], a: str, b: str, frac: float, tasks: list[str]) -> dict:
    """Arm `a` against arm `b` finetuned at the target with share `frac`, on its test split."""
    at = {"setting": "local_finetune", "eval_site": TARGET, "fraction": frac}
    return _compare(rows, {"arm": a, **at}, {"arm": b, **at}, tasks)


def summarize(results: dict) -> dict:
    """The table, the recovery curves, the cross-site matrix and the checks."""
    cfg, rows = results["config"]["study"], results["rows"]
    tasks, fracs = list(cfg["tasks"]), [float(f) for f in cfg["fractions"]]
    top = max(fracs)
    # Finetuned columns at the largest share of the target's data the study used.
    table = {
        t: {
            label: _cell(rows, arm, setting, site, t, top if setting == "local_finetune" else 1.0)
            for label, arm, setting, site in COLUMNS
        }
        for t in tasks
    }
    recovery = {
        arm: {t: [_cell(rows, arm, "local_finetune", TARGET, t, f) for f in fracs] for t in tasks}
        for arm in RECOVERY_ARMS
    }
    sites, matrix = _cross_site_matrix(rows)
    # Zero-shot at every site the source model was taken to (the target, and the third).
    zero_sites = sorted({r["eval_site"] for r in rows if r["setting"] == "zero_shot"})
    # Recovery and the federated comparison are judged on tasks with enough events in the
    # target's test split to measure them (a handful of deaths makes AUROC a coin toss).
    events = {
        site: {t: _events(rows, site, t) for t in tasks}
        for site in sorted({r["eval_site"] for r in rows})
    }
    measurable = [t for t in tasks if events[TARGET][t] >= MIN_EVENTS]
    # The penalty is measured at every site the source's model was taken to.
    measurable_all = [t for t in measurable if all(events[s][t] >= MIN_EVENTS for s in events)]
    checks = {
        **_zero_shot_checks(rows, table, tasks, zero_sites),
        "rises_with_target_fraction": {
            arm: _mean_auroc(recovery, fracs, arm, top, measurable)
            > _mean_auroc(recovery, fracs, arm, min(fracs), measurable)
            for arm in RECOVERY_ARMS
        },
        "test_events": events,
        "tasks_with_enough_target_events": measurable,
        "federated_vs_single_site": _federated_vs_single_site(rows, recovery, fracs, measurable),
    }
    return {
        "table": table,
        "recovery": recovery,
        "sites": sites,
        "matrix": matrix,
        "checks": checks,
        "pretraining": pretraining_curve(results.get("pretraining_curves", {})),
        "calibration": calibration_cells(rows, CALIBRATION_COLUMNS, tasks, top),
        "penalty": penalty(
            lambda a, b, ts, paired, metric: _compare(rows, a, b, ts, paired, metric),
            measurable_all,
            zero_sites,
        ),
        "federated_share": federated_share(
            lambda a, b, ts, metric: _means(rows, a, b, ts, metric), measurable, top
        ),
        "share_of_ceiling": share_of_ceiling(
            rows, COLUMNS, tasks, top, lambda a, b, ts: _means(rows, a, b, ts, "auroc")
        ),
        "gap_split": gap_split(
            lambda a, b, ts, paired: _compare(rows, a, b, ts, paired), tasks, zero_sites
        ),
        "recovery_to_ceiling": recovery_to_ceiling(
            list(RECOVERY_ARMS),
            tasks,
            fracs,
            lambda a, b, ts: _means(rows, a, b, ts, "auroc"),
            {t: table[t]["GBM in-site"] for t in tasks},
        ),
        "objectives": ablation(
            cfg,
            lambda arm, setting, site, t, f: _cell(rows, arm, setting, site, t, f),
            lambda a, b, ts, metric: _means(rows, a, b, ts, metric),
            tasks,
        ),
    }


def _cross_site_matrix(rows: list[dict]) -> tuple[list[str], list[list[float]]]:
    """The sites of the cross-site matrix, and mean AUROC over tasks and seeds of the
    federated model finetuned at each (rows), evaluated at each (columns)."""
    sites = sorted({r["eval_site"] for r in rows if r["setting"] == "cross_site"})
    cross = [r for r in rows if r["setting"] == "cross_site"]

    def mean(a: str, b: str) -> float:
        return float(
            np.nanmean(
                [r["auroc"] for r in cross if r["train_sites"] == [a] and r["eval_site"] == b]
            )
        )

    return sites, [[mean(a, b) for b in sites] for a in sites]


def _zero_shot_checks(
    rows: list[dict], table: dict, tasks: list[str], zero_sites: list[str]
) -> dict:
    """In-distribution minus zero-shot AUROC at each site the source's model was taken to,
    with the interval of the difference of the two sites' bootstraps: a drop when it lies
    above 0. A cell a site's policy withheld (too few events) is not measured, and counts
    as no clear drop."""
    key_tasks = [t for t in ("death", "long_los") if t in tasks]
    gaps, drops, no_drop = {}, {}, {}
    ind_rows = {"arm": "source_only", "setting": "in_distribution", "eval_site": SOURCE}
    for site in zero_sites:
        gaps[site], drops[site], no_drop[site] = {}, {}, {}
        zs_rows = {"arm": "source_only", "setting": "zero_shot", "eval_site": site}
        for t in tasks:
            ind = table[t]["in-distribution"]
            zs = _cell(rows, "source_only", "zero_shot", site, t, 1.0)
            gaps[site][t] = ind.get("auroc", np.nan) - zs.get("auroc", np.nan)
            drops[site][t] = d = _compare(rows, ind_rows, zs_rows, [t], paired=False)
            no_drop[site][t] = d["verdict"] != "beats"
    return {
        "zero_shot_gap": gaps,
        "zero_shot_drop_at_least_0.1": {
            site: any(g[t] >= 0.1 for t in key_tasks) for site, g in gaps.items()
        },
        "zero_shot_drop": drops,
        "zero_shot_no_clear_drop": no_drop,
    }


def _mean_auroc(recovery: dict, fracs: list[float], arm: str, f: float, ts: list[str]) -> float:
    """Mean AUROC over tasks `ts` of `arm` at the target with share `f`."""
    return float(np.nanmean([recovery[arm][t][fracs.index(f)].get("auroc", np.nan) for t in ts]))


def _federated_vs_single_site(
    rows: list[dict], recovery: dict, fracs: list[float], tasks: list[str]
) -> dict:
    """At each share of the target's data: federated pretraining then finetuning beside
    the source's model finetuned there and the target alone, with paired differences."""
    out = {}
    for f in fracs:
        fed, src, tgt = (
            _mean_auroc(recovery, fracs, a, f, tasks)
            for a in ("federated_finetuned", "source_finetuned", "target_only")
        )
        vs = {
            other: _paired(rows, "federated_finetuned", arm, f, tasks)
            for other, arm in (("source_only", "source_finetuned"), ("target_only", "target_only"))
        }
        out[f"{f:g}"] = {
            "federated": fed,
            "source_only": src,
            "target_only": tgt,
            **{f"vs_{k}": v for k, v in vs.items()},
            **{f"beats_{k}": v["verdict"] == "beats" for k, v in vs.items()},
        }
    return out


def pretraining_curve(curves: dict[str, list[dict]]) -> dict:
    """The federated pretraining's validation loss by round (mean over seeds, and each
    seed's) and the first round whose mean came within 1% of the last round's."""
    by_seed = {s: [p["val_loss"] for p in c] for s, c in curves.items() if c}
    if not by_seed:
        return {}
    n = min(len(v) for v in by_seed.values())
    mean = np.nanmean([v[:n] for v in by_seed.values()], 0)
    within = int(np.flatnonzero(mean <= mean[-1] * 1.01)[0]) + 1
    return {
        "rounds": list(range(1, n + 1)),
        "mean": [float(x) for x in mean],
        "seeds": by_seed,
        "within_1pct_of_last": within,
    }


def profile(results: dict) -> list[str]:
    """Where the study's time went, per phase: its wall time, the seconds its site jobs
    spent loading data and building the model, training and evaluating (each job timed
    where it ran), and how busy that kept the machine's slots for site jobs (CPUs /
    `engine.cpus_per_site`); the rest is process start-up, imports, Ray scheduling and
    messages."""
    work, wall = results.get("site_seconds", {}), results.get("phase_seconds", {})
    if not work:
        return []
    cpus = int(results["config"]["study"]["engine"]["cpus_per_site"])
    slots = max(1, int(results.get("cpus") or 1) // max(cpus, 1))
    lines = [
        "## Where the time goes",
        "",
        f"Seconds per phase: wall clock, then the sum over its site jobs of their own "
        f"timings; busy: that sum over wall x {slots} slot(s) for site jobs.",
        "",
        "| phase | wall | site jobs | load (data, model) | train | evaluate | busy |",
        "|---|---|---|---|---|---|---|",
    ]
    # In the order they ran (results.json keeps keys sorted).
    order = ["statistics and tokenizers", "pretraining", "probes", "finetuning", "evaluation"]
    for phase, seconds in sorted(wall.items(), key=lambda kv: [*order, kv[0]].index(kv[0])):
        w = work.get(phase, {})
        parts = [w.get(k, 0.0) for k in ("load_seconds", "train_seconds", "evaluate_seconds")]
        busy = f"{sum(parts) / (seconds * slots):.0%}" if w else "-"
        cells = " | ".join(f"{x:.0f}" if w else "-" for x in parts)
        lines.append(f"| {phase} | {seconds:.0f} | {w.get('jobs', '-')} | {cells} | {busy} |")
    return [*lines, ""]


def _fmt(c: dict, metric: str = "auroc") -> str:
    if not c or np.isnan(c.get(metric, np.nan)):
        return "-"
    return f"{c[metric]:.3f} [{c[f'{metric}_low']:.2f}, {c[f'{metric}_high']:.2f}]"


def console_table(summary: dict, paper: dict) -> Table:
    """The table of report.md turned a quarter (arms down, tasks across: it fits a
    terminal), the paper's numbers under ours."""
    t = Table(
        title="AUROC at the target unless in-distribution (mean over seeds) "
        "[mean bootstrap 95% interval]",
        title_justify="left",
    )
    t.add_column("arm")
    tasks = list(summary["table"])
    for task in tasks:
        t.add_column(task, justify="right")
    for label, *_ in COLUMNS:
        cells = []
        for task in tasks:
            cell = _fmt(summary["table"][task][label])
            ref = paper.get(PAPER.get(label, ""), {}).get(task)
            cells.append(cell + (f"\n[dim]paper {ref:.3f}[/dim]" if ref is not None else ""))
        t.add_row(label, *cells)
    return t


def _plots(summary: dict, results: dict, out: Path) -> list[str]:
    """Every figure of the report, each its own function; the files written."""
    cfg, rows = results["config"]["study"], results["rows"]
    tasks, fracs = list(cfg["tasks"]), [float(f) for f in cfg["fractions"]]
    files = [
        _auroc_by_arm(summary, tasks, out),
        _recovery(summary, tasks, fracs, out),
        _roc(rows, tasks, fracs, out),
        _cross_site(summary, out),
        _pretraining_loss(summary, out),
    ]
    # Four arms: six curves twice over make a panel nobody can read.
    shown = [c for c in CALIBRATION_COLUMNS if c[0] not in ("target only", "pooled")]
    files.append(reliability_png(rows, shown, tasks, max(fracs), out / "reliability.png"))
    files.append(ablation_png(summary.get("objectives", {}), cfg, out))
    return [f for f in files if f]


def _auroc_by_arm(summary: dict, tasks: list[str], out: Path) -> str:
    """AUROC by arm and task, with intervals."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 4))
    w = 0.8 / len(COLUMNS)
    for i, (label, *_) in enumerate(COLUMNS):
        cells = [summary["table"][t][label] for t in tasks]
        y = np.array([c.get("auroc", np.nan) for c in cells])
        lo = y - np.array([c.get("auroc_low", np.nan) for c in cells])
        hi = np.array([c.get("auroc_high", np.nan) for c in cells]) - y
        x = np.arange(len(tasks)) + (i - len(COLUMNS) / 2 + 0.5) * w
        ax.bar(x, y, w, label=label, yerr=[lo, hi], capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(
        xticks=range(len(tasks)),
        xticklabels=tasks,
        ylabel="AUROC",
        ylim=(0.3, 1.0),
        title="AUROC by arm (target unless in-distribution)",
    )
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out / "auroc_by_arm.png")


def _recovery(summary: dict, tasks: list[str], fracs: list[float], out: Path) -> str:
    """AUROC at the target against the share of its training data, beside zero-shot."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for arm, label in RECOVERY_ARMS.items():
            cells = summary["recovery"][arm][t]
            y = np.array([c.get("auroc", np.nan) for c in cells])
            lo = np.array([c.get("auroc_low", np.nan) for c in cells])
            hi = np.array([c.get("auroc_high", np.nan) for c in cells])
            ax.plot(fracs, y, marker="o", label=label)
            ax.fill_between(fracs, lo, hi, alpha=0.15)
        zs = summary["table"][t]["zero-shot"].get("auroc", np.nan)
        ax.axhline(zs, color="k", ls=":", lw=1, label="zero-shot")
        # Limits set, not derived: a task a site's policy withheld has no points to scale by.
        ax.set(
            xscale="log",
            xlim=(min(fracs) / 1.5, max(fracs) * 1.5),
            ylim=(0.3, 1.0),
            xlabel="share of target training data",
            ylabel="AUROC",
            title=t,
        )
    axes[0][0].legend(fontsize=7)
    return _save(fig, out / "recovery.png")


def _roc(rows: list[dict], tasks: list[str], fracs: list[float], out: Path) -> str:
    """ROC curves of the first arms, mean over seeds."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        for label, arm, setting, site in COLUMNS[:3]:
            curves = [
                r["tpr_at_fpr"]
                for r in rows
                if (r["arm"], r["task"], r["setting"], r["eval_site"]) == (arm, t, setting, site)
                and r["fraction"] in (1.0, max(fracs))
                and "tpr_at_fpr" in r
            ]
            if curves:
                ax.plot(FPR_GRID, np.mean(curves, axis=0), label=label)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=t)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out / "roc.png")


def _cross_site(summary: dict, out: Path) -> str | None:
    """The federated model finetuned at each site, evaluated at each: mean AUROC."""
    sites, m = summary["sites"], np.array(summary["matrix"])
    if not sites:
        return None
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(sites), 1.2 + 1.1 * len(sites)))
    im = ax.imshow(m, vmin=0.5, vmax=1.0, cmap="viridis")
    for i in range(len(sites)):
        for j in range(len(sites)):
            ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", color="w")
    ax.set(
        xticks=range(len(sites)),
        xticklabels=sites,
        yticks=range(len(sites)),
        yticklabels=sites,
        xlabel="evaluated at",
        ylabel="finetuned at",
        title="federated model finetuned locally:\nmean AUROC over tasks",
    )
    fig.colorbar(im, ax=ax)
    return _save(fig, out / "cross_site.png")


def _pretraining_loss(summary: dict, out: Path) -> str | None:
    """The federated pretraining's validation loss, round by round."""
    curve = summary["pretraining"]
    if not curve:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    first = next(iter(curve["seeds"]))
    for seed, v in curve["seeds"].items():
        label = "one seed" if seed == first else None
        ax.plot(range(1, len(v) + 1), v, color="grey", lw=0.8, alpha=0.6, label=label)
    ax.plot(curve["rounds"], curve["mean"], marker="o", color="C0", label="mean")
    last = curve["within_1pct_of_last"]
    ax.axvline(last, color="C1", ls="--", lw=1, label="within 1% of the last round")
    ax.set(
        xlabel="round",
        ylabel="validation loss (nats/token)",
        xticks=curve["rounds"],
        title="federated pretraining:\nthe global model on validation splits",
    )
    ax.legend(fontsize=7)
    return _save(fig, out / "pretraining_loss.png")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _markdown(summary: dict, results: dict, files: list[str]) -> str:
    """report.md: the header, the AUROC and AUPRC tables, what the simulation shows, then
    calibration, the published comparisons, the objectives question, the profile and the
    figures."""
    cfg, ch = results["config"]["study"], summary["checks"]
    lines = [
        *_header(results),
        *_tables(summary, cfg["paper"]),
        *_findings(summary, cfg),
        "",
        *ceiling_markdown(summary),
        *calibration_markdown(summary["calibration"]),
        *published_markdown(
            summary["penalty"], summary["federated_share"], ch["tasks_with_enough_target_events"]
        ),
        *ablation_markdown(summary.get("objectives", {}), cfg),
        *profile(results),
        "## Figures",
        "",
        *[f"![{f}]({f})" for f in files],
    ]
    return "\n".join(lines) + "\n"


def _header(results: dict) -> list[str]:
    cfg, model = results["config"]["study"], results["config"]["model"]
    s = cfg["sites"]
    return [
        f"# Transfer study `{cfg['name']}`",
        "",
        f"Source `{s['source']['preset']}` ({s['source']['stays']} stays), target "
        f"`{s['target']['preset']}` ({s['target']['stays']} stays)"
        + (f", third `{s['third']['preset']}`" if s.get("third") else "")
        + f"; model `{model['size']}` `{model['arch']}`; seeds {cfg['seeds']}; measured in "
        f"{results['seconds'] / 60:.1f} min on Flower's simulation engine. Every setting: "
        f"[`{RESOLVED}`]({RESOLVED}) (`fedclif simulate --config {RESOLVED}` runs it again).",
        "",
    ]


def _tables(summary: dict, paper: dict) -> list[str]:
    """The AUROC table (with the paper's rows) and the AUPRC table, every arm a column."""
    head = [
        "| task | " + " | ".join(label for label, *_ in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    lines = [
        "AUROC at the target unless in-distribution (mean over seeds, [mean bootstrap 95% "
        "interval]; test splits, zero-shot on every stay of the site the model never saw); "
        "`paper` rows: arXiv 2504.10422, MIMIC-IV -> UCMC.",
        "",
        *head,
    ]
    for task, cells in summary["table"].items():
        lines.append(f"| {task} | " + " | ".join(_fmt(cells[c]) for c, *_ in COLUMNS) + " |")
        ref = [
            f"{paper[PAPER[c]][task]:.3f}" if c in PAPER and task in paper.get(PAPER[c], {}) else ""
            for c, *_ in COLUMNS
        ]
        if any(ref):
            lines.append("| paper | " + " | ".join(ref) + " |")
    lines += [
        "",
        "AUPRC, the same cells (a model without skill scores the task's prevalence):",
        "",
        *head,
    ]
    for task, cells in summary["table"].items():
        lines.append(
            f"| {task} | " + " | ".join(_fmt(cells[c], "auprc") for c, *_ in COLUMNS) + " |"
        )
    return lines


def _findings(summary: dict, cfg: dict) -> list[str]:
    """What the simulation shows: events per test split, the zero-shot drops, the
    recovery with the target's data, federated against single-site, the pretraining
    curve."""
    ch = summary["checks"]
    presets = {k: v["preset"] for k, v in cfg["sites"].items() if v}
    lines = [
        "",
        "Events in each test split (the smaller class; under "
        f"{MIN_EVENTS} an AUROC is mostly noise): "
        + "; ".join(
            f"{site} " + ", ".join(f"{t} {n}" for t, n in ev.items())
            for site, ev in ch["test_events"].items()
        )
        + ".",
        "",
        "## What the simulation shows",
        "",
        headline(summary, RECOVERY_ARMS, [t for t in ("death", "long_los") if t in cfg["tasks"]]),
        "",
    ]
    for site, d in ch["zero_shot_drop"].items():
        ok = [t for t, v in ch["zero_shot_no_clear_drop"][site].items() if v]
        drop = "yes" if ch["zero_shot_drop_at_least_0.1"][site] else "no"
        lines.append(
            f"- Zero-shot at {site} (`{presets[site]}`), in-distribution minus zero-shot "
            f"AUROC [95% interval of the difference]: "
            f"{', '.join(f'{t} {difference_text(v, DROP_WORDS)}' for t, v in d.items())}. A drop "
            f"of at least 0.1 on death or long stay: **{drop}**; no clear drop for: "
            f"{', '.join(ok) or 'none'}."
        )
    lines += [
        "- AUROC at the target rises from the smallest to the largest training share (tasks "
        f"with at least {MIN_EVENTS} events in its test split: "
        f"{', '.join(ch['tasks_with_enough_target_events']) or 'none'}): "
        + ", ".join(
            f"{RECOVERY_ARMS[a]} **{'yes' if ok else 'no'}**"
            for a, ok in ch["rises_with_target_fraction"].items()
        )
        + ".",
        "- Federated pretraining then local finetuning, against the source-only model "
        "finetuned at the target and the target trained alone (mean AUROC over the tasks "
        "above; each difference with the 95% interval of a paired bootstrap on the same "
        'test stays: "beats" only when the interval excludes 0):',
        "",
        "| target share | federated | source only | target only | federated - source only "
        "| federated - target only |",
        "|---|---|---|---|---|---|",
    ]
    for f, v in ch["federated_vs_single_site"].items():
        lines.append(
            f"| {f} | {v['federated']:.3f} | {v['source_only']:.3f} | {v['target_only']:.3f} "
            f"| {difference_text(v['vs_source_only'])} | {difference_text(v['vs_target_only'])} |"
        )
    if curve := summary["pretraining"]:
        lines.append(
            "- Federated pretraining, validation loss of the global model after each round "
            "(example-weighted over the sites' validation splits, first seed): "
            + ", ".join(f"{x:.3f}" for x in curve["mean"])
            + f"; within 1% of its last round from round **{curve['within_1pct_of_last']}** "
            f"of {len(curve['rounds'])} (`pretraining_loss.png`)."
        )
    return lines


def write_report(out: Path, results: dict) -> dict:
    """report.md, summary.json and the PNGs next to results.json; returns the summary."""
    summary = summarize(results)
    files = _plots(summary, results, out)
    (out / "report.md").write_text(_markdown(summary, results, files))
    write_json(summary, out / "summary.json")
    return summary
