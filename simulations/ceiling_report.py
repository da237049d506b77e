"""Each hospital's ceiling in the report (simulations/truth.py, reference_arms.py): the
ceiling's AUROC where each arm is scored, every arm as a share of it, and the zero-shot
gap split into the ceiling difference (the target is harder) and the transfer gap (the
target's ceiling minus the source model there: what shift costs), each with its interval.

`compare(a, b, tasks, paired)` and `means(a, b, tasks)` are the report's `_compare` and
`_means` bound to the rows (AUROC): the ceiling's rows pair with every seed's."""

from collections.abc import Callable

import numpy as np

from fedclif.shared.evaluation.metrics import difference_text, paired_ratio
from fedclif.simulations.reference_arms import CEILING
from fedclif.simulations.sites import SOURCE, TARGET

# An arm has recovered when its AUROC at the target comes within this share of the
# target's ceiling on the same stays (the interval's upper end reaching it).
NEIGHBOURHOOD = 95.0
# The zero-shot gap's parts, as the report names them: gap = ceiling difference +
# transfer gap - home shortfall.
PARTS = {
    "ceiling_difference": "ceiling difference (the source's ceiling - this site's: it is harder)",
    "transfer_gap": "transfer gap (this site's ceiling - zero-shot: what the move costs)",
    "home_shortfall": "home shortfall (the source's ceiling - in-distribution)",
}


def _ceiling_of(arm_row: dict) -> dict:
    """The ceiling's selector for the stays an arm's rows are scored on."""
    return {"arm": CEILING, "eval_site": arm_row["eval_site"], "eval_split": arm_row["eval_split"]}


def share_of_ceiling(
    rows: list[dict], columns: list[tuple], tasks: list[str], top: float, means: Callable
) -> dict:
    """{task: {column label: {percent, low, high}}}: each column's mean AUROC over seeds as
    a percentage of the ceiling's on the same stays, with the 95% interval of the paired
    replicates' ratio."""
    out: dict[str, dict] = {t: {} for t in tasks}
    for label, arm, setting, site in columns:
        if arm == CEILING:
            continue
        frac = top if setting == "local_finetune" else 1.0
        sel = {"arm": arm, "setting": setting, "eval_site": site, "fraction": frac}
        some = [r for r in rows if all(r.get(k) == v for k, v in sel.items() if k != "fraction")]
        if not some:
            continue
        for t in tasks:
            a, b, b_reps, a_reps = means(sel, _ceiling_of(some[0]), [t])
            if a is not None:
                out[t][label] = paired_ratio(a, b, a_reps, b_reps)
    return out


def gap_split(compare: Callable, tasks: list[str], sites: list[str]) -> dict:
    """{site: {task: {part: difference with its interval}}} at every site the source model
    was taken to zero-shot (PARTS): the sites' ceilings on independent stays (unpaired),
    a ceiling and the model on the same stays (paired)."""
    home = {"arm": CEILING, "setting": "in_distribution", "eval_site": SOURCE}
    at_home = {"arm": "source_only", "setting": "in_distribution", "eval_site": SOURCE}
    out = {}
    for site in sites:
        there = {"arm": CEILING, "setting": "zero_shot", "eval_site": site}
        model = {"arm": "source_only", "setting": "zero_shot", "eval_site": site}
        out[site] = {
            t: {
                "ceiling_difference": compare(home, there, [t], False),
                "transfer_gap": compare(there, model, [t], True),
                "home_shortfall": compare(home, at_home, [t], True),
            }
            for t in tasks
        }
    return out


def recovery_to_ceiling(
    arms: list[str], tasks: list[str], fractions: list[float], means: Callable, tree: dict
) -> dict:
    """{arm: {task: {"shares": [{percent, low, high} per fraction], "ceiling_at",
    "tree_at"}}}: each arm finetuned at the target as a share of the target's ceiling on
    the same test stays at each share of its data; the smallest share whose interval
    reaches NEIGHBOURHOOD% of the ceiling, and the smallest whose AUROC reaches the lower
    end of the tree's in-site interval (`tree`: task -> its table cell); None: none did."""
    ceiling = {"arm": CEILING, "eval_site": TARGET, "eval_split": "test"}
    out: dict[str, dict] = {}
    for arm in arms:
        out[arm] = {}
        for t in tasks:
            shares, ceiling_at, tree_at = [], None, None
            for f in fractions:
                sel = {"arm": arm, "setting": "local_finetune", "eval_site": TARGET, "fraction": f}
                a, b, b_reps, a_reps = means(sel, ceiling, [t])
                if a is None:
                    shares.append({})
                    continue
                shares.append(paired_ratio(a, b, a_reps, b_reps))
                if ceiling_at is None and shares[-1]["high"] >= NEIGHBOURHOOD:
                    ceiling_at = f
                if tree_at is None and a >= tree.get(t, {}).get("auroc_low", np.inf):
                    tree_at = f
            out[arm][t] = {"shares": shares, "ceiling_at": ceiling_at, "tree_at": tree_at}
    return out


def headline(summary: dict, arms: dict[str, str], tasks: list[str]) -> str:
    """Which half of the transfer paper the study reproduced, and by how much: the zero-shot
    drop at the target, and the recovery of the best arm against the tree and the ceiling."""
    drops = summary["checks"]["zero_shot_drop"].get(TARGET, {})
    dropped = [t for t in tasks if drops.get(t, {}).get("verdict") == "beats"]
    first = (
        "the drop: **reproduced** ("
        + ", ".join(f"{t} {difference_text(drops[t], verdict=False)}" for t in dropped)
        + ")"
        if dropped
        else "the drop: **not reproduced** (no task falls clearly zero-shot)"
    )
    rec = summary["recovery_to_ceiling"]
    parts = []
    for t in tasks:
        tree = {a: rec[a][t]["tree_at"] for a in arms if rec[a][t]["tree_at"] is not None}
        ceil = {a: rec[a][t]["ceiling_at"] for a in arms if rec[a][t]["ceiling_at"] is not None}
        text = (
            f"{t}: the tree's in-site interval at {min(tree.values()):g} of the target's data "
            f"({', '.join(arms[a] for a, f in tree.items() if f == min(tree.values()))})"
            if tree
            else f"{t}: not the tree's in-site interval"
        )
        text += (
            f", {NEIGHBOURHOOD:g}% of the ceiling at {min(ceil.values()):g}"
            if ceil
            else f", not {NEIGHBOURHOOD:g}% of the ceiling"
        )
        parts.append(text)
    return (
        "**Which half of the paper** (arXiv 2504.10422: a model loses at another hospital "
        f"zero-shot, and finetuning there recovers it): {first}; the recovery, finetuned at "
        "the target: " + "; ".join(parts) + "."
    )


def _percent(c: dict | None) -> str:
    return f"{c['percent']:.0f}% [{c['low']:.0f}, {c['high']:.0f}]" if c else "-"


def ceiling_markdown(summary: dict) -> list[str]:
    """The ceiling section: the shares table and the gap split."""
    shares, split = summary["share_of_ceiling"], summary["gap_split"]
    tasks = list(shares)
    labels = list(dict.fromkeys(label for t in tasks for label in shares[t]))
    lines = [
        "## Each hospital's ceiling",
        "",
        "The ceiling scores every stay by the probability of its recorded outcome given "
        "everything that exists by hour 24 (the generator's own latents, Monte Carlo over "
        "what happens after: simulations/truth.py); no model can beat it on average. Each "
        "arm's AUROC as a share of the ceiling's on the same stays [95% interval of the "
        "paired replicates' ratio]:",
        "",
        "| arm | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    for label in labels:
        cells = []
        for t in tasks:
            c = shares[t].get(label)
            cells.append(_percent(c))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rec = summary.get("recovery_to_ceiling", {})
    if rec:
        lines += [
            "",
            f"Finetuned at the target, as a share of its ceiling at each share of its data "
            f"[95% interval]; reaches: the smallest share whose interval reaches "
            f"{NEIGHBOURHOOD:g}% of the ceiling, and whose AUROC reaches the lower end of the "
            "tree's in-site interval:",
            "",
            "| arm | task | by share of the target's data | "
            f"{NEIGHBOURHOOD:g}% of the ceiling at | the tree at |",
            "|---|---|---|---|---|",
        ]
        for arm, by_task in rec.items():
            for t, v in by_task.items():
                cells = " / ".join(_percent(c) for c in v["shares"])
                at = [("-" if x is None else f"{x:g}") for x in (v["ceiling_at"], v["tree_at"])]
                lines.append(f"| {arm} | {t} | {cells} | {at[0]} | {at[1]} |")
    lines += [
        "",
        "The zero-shot gap (in-distribution minus zero-shot AUROC) = ceiling difference + "
        "transfer gap - home shortfall, each with its 95% interval:",
        "",
    ]
    for site, by_task in split.items():
        for part, name in PARTS.items():
            text = ", ".join(
                f"{t} {difference_text(d[part], verdict=False)}" for t, d in by_task.items()
            )
            lines.append(f"- {site}, {name}: {text}")
    return [*lines, ""]
