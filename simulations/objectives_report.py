"""The objectives question of the transfer study: does a pretraining objective beyond
next-token prediction (LLM4EHR's time-series alignment, MedHMP's hierarchical objectives)
narrow the zero-shot gap at the target or help in distribution?

Each named set of `study.objectives` pretrains the source-only model with the same steps;
the first set is the study's own (every other arm pretrains with it), so its cells are the
main table's. Per set: in-distribution and zero-shot AUROC, the gap between them, linear
probes, and finetuning on `study.ablation_fraction` of the target; against the first set,
the paired differences on the same stays and the change of the gap.
"""

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig

from fedclif.shared.errors import FedclifError
from fedclif.shared.evaluation.metrics import difference_text, paired_difference
from fedclif.shared.model.objectives import OBJECTIVES
from fedclif.simulations.sites import SOURCE, TARGET

# The ablation's cells: (label, arm of the source-only model, setting, evaluated at).
CELLS = [
    ("in-distribution", "source_only", "in_distribution", SOURCE),
    ("zero-shot", "source_only", "zero_shot", TARGET),
    ("probe in-distribution", "source_only_probe", "in_distribution", SOURCE),
    ("probe zero-shot", "source_only_probe", "zero_shot", TARGET),
    ("finetune at target", "source_finetuned", "local_finetune", TARGET),
]
GAP_WORDS = {"beats": "wider", "worse": "narrower", "no clear difference": "no clear change"}


def arm_name(arm: str, index: int, sets: list) -> str:
    """The arm of objective set `index`: the study's own arm for the first set,
    `arm[name]` (`source_only[ts]_probe`) for the others."""
    if index == 0:
        return arm
    name = f"[{sets[index]['name']}]"
    return arm.replace("_probe", name + "_probe") if arm.endswith("_probe") else arm + name


def pretrain_override(s: DictConfig | dict) -> dict:
    """The `train.pretrain` settings of objective set `s` ({name, objectives, stages})."""
    given = dict(s.get("objectives") or {"next_token": 1.0})
    return {
        "objectives": {k: float(given.get(k, 0.0)) for k in OBJECTIVES},
        "stages": [dict(x) for x in s.get("stages") or []],
    }


def check_sets(c: DictConfig) -> None:
    """Named, distinct sets, and a finetuning share the study already runs."""
    names = [str(s.get("name", "")) for s in c.objectives]
    if not names or not all(names) or len(set(names)) < len(names):
        raise FedclifError(f"study.objectives: give each set a distinct `name` (got {names})")
    if len(names) > 1 and float(c.ablation_fraction) not in [float(f) for f in c.fractions]:
        raise FedclifError(
            f"study.ablation_fraction {c.ablation_fraction} is not one of study.fractions "
            f"{list(c.fractions)}: the first set's finetuning comes from the main arms"
        )


def ablation(cfg: dict, cell: Callable, means: Callable, tasks: list[str]) -> dict:
    """Cells and comparisons per set and task. `cell(arm, setting, site, task, frac)`
    gives a mean-over-seeds cell; `means(a, b, tasks, metric)` the report's `_means`."""
    sets, frac = cfg.get("objectives", []), float(cfg.get("ablation_fraction", 0.0))
    if len(sets) < 2:
        return {}
    out = {}
    for i, s in enumerate(sets):
        per_task = {}
        for t in tasks:
            cells = {
                label: cell(
                    arm_name(arm, i, sets),
                    setting,
                    site,
                    t,
                    frac if setting == "local_finetune" else 1.0,
                )
                for label, arm, setting, site in CELLS
            }
            gap = _gap(means, i, sets, t)
            per_task[t] = {"cells": cells, "gap": gap}
            if i:
                per_task[t]["vs_first"] = {  # probes carry no bootstrap replicates
                    label: _versus(means, i, sets, arm, setting, site, t, frac)
                    for label, arm, setting, site in CELLS
                    if "probe" not in label
                }
                per_task[t]["gap_change"] = _gap_change(means, i, sets, t)
        out[s["name"]] = per_task
    return out


def _sel(arm: str, setting: str, site: str, frac: float = 1.0) -> dict:
    return {"arm": arm, "setting": setting, "eval_site": site, "fraction": frac}


def _gap(means: Callable, i: int, sets: list, t: str) -> dict:
    """In-distribution minus zero-shot AUROC of set i's source model, with the interval
    of the difference of two sites' bootstraps (independent stays: b's shuffled)."""
    arm = arm_name("source_only", i, sets)
    ma, mb, b, a = means(
        _sel(arm, "in_distribution", SOURCE), _sel(arm, "zero_shot", TARGET), [t], "auroc"
    )
    if ma is None:
        return {"verdict": "not measured"}
    return paired_difference(ma, mb, a, np.random.default_rng(0).permutation(b))


def _versus(means, i, sets, arm, setting, site, t, frac) -> dict:
    """Set i's cell minus the first set's, paired on the same stays and resamples."""
    f = frac if setting == "local_finetune" else 1.0
    ma, mb, b, a = means(
        _sel(arm_name(arm, i, sets), setting, site, f), _sel(arm, setting, site, f), [t], "auroc"
    )
    return {"verdict": "not measured"} if ma is None else paired_difference(ma, mb, a, b)


def _gap_change(means: Callable, i: int, sets: list, t: str) -> dict:
    """Set i's gap minus the first set's: (in-dist_i - in-dist_0) - (zero-shot_i -
    zero-shot_0), each pair paired on its site's resamples, the two sites independent."""
    arm = arm_name("source_only", i, sets)
    ind = means(
        _sel(arm, "in_distribution", SOURCE),
        _sel("source_only", "in_distribution", SOURCE),
        [t],
        "auroc",
    )
    zs = means(
        _sel(arm, "zero_shot", TARGET), _sel("source_only", "zero_shot", TARGET), [t], "auroc"
    )
    if ind[0] is None or zs[0] is None:
        return {"verdict": "not measured"}
    d_ind, d_zs = ind[3] - ind[2], zs[3] - zs[2]
    d_zs = np.random.default_rng(1).permutation(d_zs)
    return paired_difference(ind[0] - ind[1], zs[0] - zs[1], d_ind, d_zs)


def _fmt(c: dict) -> str:
    if not c:
        return "-"
    return f"{c['auroc']:.3f} [{c['auroc_low']:.2f}, {c['auroc_high']:.2f}]"


def ablation_markdown(ab: dict, cfg: dict) -> list[str]:
    if not ab:
        return []
    sets, first = cfg["objectives"], cfg["objectives"][0]["name"]
    frac = float(cfg["ablation_fraction"])
    lines = [
        "## Pretraining objectives",
        "",
        "The source-only model pretrained with each set of objectives "
        f"(`study.objectives`; the same {cfg['pretrain']['rounds']} x "
        f"{cfg['pretrain']['steps_per_round']} steps), AUROC (mean over seeds [mean "
        "bootstrap 95% interval]); gap: in-distribution minus zero-shot at the target, "
        f"with the interval of its difference; finetune: on {frac:g} of the target's "
        "training patients.",
        "",
        "| set | objectives | task | " + " | ".join(label for label, *_ in CELLS) + " | gap |",
        "|---" * (len(CELLS) + 4) + "|",
    ]
    for s in sets:
        what = _describe(s)
        for t, v in ab[s["name"]].items():
            cells = " | ".join(_fmt(v["cells"][label]) for label, *_ in CELLS)
            lines.append(
                f"| {s['name']} | {what} | {t} | {cells} | "
                f"{difference_text(v['gap'], verdict=False)} |"
            )
    lines += [
        "",
        f'Against `{first}` (paired bootstrap on the same stays; "beats" only when the '
        "interval excludes 0; the gap's change: narrower when the interval lies below 0):",
        "",
        "| set | task | in-distribution | zero-shot | finetune at target | gap change |",
        "|---|---|---|---|---|---|",
    ]
    findings = []
    for s in sets[1:]:
        for t, v in ab[s["name"]].items():
            vs = v["vs_first"]
            cols = [
                difference_text(vs[k])
                for k in ("in-distribution", "zero-shot", "finetune at target")
            ]
            cols.append(difference_text(v["gap_change"], GAP_WORDS))
            lines.append(f"| {s['name']} | {t} | " + " | ".join(cols) + " |")
            gap = v["gap_change"]
            if gap.get("verdict") in ("beats", "worse"):
                word = "narrows" if gap["verdict"] == "worse" else "widens"
                findings.append(
                    f"`{s['name']}` {word} the zero-shot gap on {t} "
                    f"({difference_text(gap, verdict=False)})"
                )
            for label in ("in-distribution", "zero-shot", "finetune at target"):
                verdict = vs[label].get("verdict")
                if verdict in ("beats", "worse"):
                    word = "helps" if verdict == "beats" else "hurts"
                    findings.append(
                        f"`{s['name']}` {word} {label} AUROC on {t} "
                        f"({difference_text(vs[label], verdict=False)})"
                    )
    # Each comparison is a 95% interval: among n of them about n/20 exclude 0 by chance.
    n = 4 * sum(len(ab[s["name"]]) for s in sets[1:])
    lines += [
        "",
        "- "
        + (
            "; ".join(findings)
            if findings
            else f"No set differs clearly from `{first}`: no objective narrows the zero-shot "
            "gap or changes in-distribution AUROC beyond its interval here"
        )
        + f". Of these {n} comparisons, about {n / 20:.1f} would exclude 0 by chance alone "
        "(95% intervals, not corrected for multiplicity).",
        "",
    ]
    return lines


def _describe(s: dict) -> str:
    if s.get("stages"):
        return " then ".join(
            "+".join(k for k, w in st["objectives"].items() if w) for st in s["stages"]
        )
    return "+".join(k for k, w in (s.get("objectives") or {"next_token": 1}).items() if w)


def ablation_png(ab: dict, cfg: dict, out: Path) -> str | None:
    """The zero-shot gap of each set per task, with its interval."""
    if not ab:
        return None
    names = [s["name"] for s in cfg["objectives"]]
    tasks = list(next(iter(ab.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tasks), 3.2))
    width = 0.8 / len(names)
    for k, n in enumerate(names):
        g = [ab[n][t]["gap"] for t in tasks]
        x = np.arange(len(tasks)) + (k - (len(names) - 1) / 2) * width
        y = np.array([d.get("difference", np.nan) for d in g])
        err = np.array(
            [[y[j] - d.get("low", y[j]), d.get("high", y[j]) - y[j]] for j, d in enumerate(g)]
        ).T
        ax.bar(x, y, width, yerr=err, capsize=3, label=n)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_ylabel("in-distribution - zero-shot AUROC")
    ax.set_title("Zero-shot gap at the target by pretraining objectives")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "objectives.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
