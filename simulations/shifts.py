"""Every kind of hospital difference in one table: the study run once per target preset
(`study.targets`, the `shifts` profile: one single-shift preset each, plus `ucmc-like`
where they all come together), each with its own report, and `shifts.md` / `shifts.json`
/ `shifts.png` beside them: by kind of shift and task, the zero-shot gap (in-distribution
minus zero-shot AUROC, with its interval), its parts (the target's ceiling lower than the
source's, the model below the target's ceiling: simulations/ceiling_report.py) and the
smallest target share at which local finetuning, and federated pretraining then
finetuning, recover it."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from fedclif.shared.artifact import write_json
from fedclif.shared.evaluation.metrics import DROP_WORDS, difference_text
from fedclif.simulations.sites import SOURCE, TARGET

ARMS = {"source_finetuned": "local finetune", "federated_finetuned": "federated + finetune"}
GAP_PARTS = {
    "ceiling_difference": "ceiling difference (harder target)",
    "transfer_gap": "transfer gap (ceiling - zero-shot)",
}


def recovered_at(summary: dict, arm: str, task: str, fractions: list[float]) -> float | None:
    """The smallest share whose AUROC at the target reaches the lower end of the source's
    in-distribution interval (the gap is closed within what the source's own test split
    can tell apart); None when no share does."""
    ind = summary["table"][task]["in-distribution"]
    if "auroc_low" not in ind:
        return None
    for f, cell in zip(fractions, summary["recovery"][arm][task], strict=True):
        if cell.get("auroc", -np.inf) >= ind["auroc_low"]:
            return f
    return None


def shifts_table(summaries: dict[str, dict], fractions: list[float]) -> dict:
    """{preset: {task: {gap (with interval and verdict), recovered_at per arm}}} from each
    target's report summary (simulations/report.py `summarize`)."""
    out = {}
    for preset, s in summaries.items():
        drops = s["checks"]["zero_shot_drop"].get(TARGET, {})
        split = s.get("gap_split", {}).get(TARGET, {})
        none = {"verdict": "not measured"}
        out[preset] = {
            task: {
                "gap": drops.get(task, none),
                # The gap's parts (simulations/ceiling_report.py): a harder target, or the move.
                **{part: split.get(task, {}).get(part, none) for part in GAP_PARTS},
                **{arm: recovered_at(s, arm, task, fractions) for arm in ARMS},
            }
            for task in s["table"]
        }
    return out


def _share(f: float | None) -> str:
    return "not within the shares" if f is None else f"{f:g}"


def shifts_markdown(table: dict, source: str, fractions: list[float]) -> str:
    lines = [
        "# Which hospital difference breaks the model",
        "",
        f"Source `{source}`; each row a study with that target (its own report: "
        "`<preset>/report.md`). Zero-shot gap: in-distribution minus zero-shot AUROC at the "
        "target, with the 95% interval of the difference (drop / level / rise). Recovered "
        "at: the smallest share of the target's training data (of "
        f"{', '.join(f'{f:g}' for f in fractions)}) whose AUROC at the target reaches the "
        "lower end of the source's in-distribution interval. The gap's parts: the source's "
        "ceiling minus the target's (a harder target) and the target's ceiling minus "
        "zero-shot (the move), each with its interval.",
        "",
        "| target | task | zero-shot gap | "
        + " | ".join(GAP_PARTS.values())
        + " | "
        + " | ".join(f"{label}: recovered at" for label in ARMS.values())
        + " |",
        "|---|---|---|" + "---|" * (len(GAP_PARTS) + len(ARMS)),
    ]
    for preset, tasks in table.items():
        for task, v in tasks.items():
            parts = [difference_text(v[p], verdict=False) for p in GAP_PARTS]
            lines.append(
                f"| {preset} | {task} | {difference_text(v['gap'], DROP_WORDS)} | "
                + " | ".join([*parts, *(_share(v[arm]) for arm in ARMS)])
                + " |"
            )
    return "\n".join(lines) + "\n"


def shifts_png(table: dict, path: Path) -> str:
    """The zero-shot gap by target and task, with intervals."""
    presets = list(table)
    tasks = list(dict.fromkeys(t for v in table.values() for t in v))
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(presets), 3.8))
    w = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        gaps = [table[p].get(task, {}).get("gap", {}) for p in presets]
        y = np.array([g.get("difference", np.nan) for g in gaps])
        lo = y - np.array([g.get("low", np.nan) for g in gaps])
        hi = np.array([g.get("high", np.nan) for g in gaps]) - y
        x = np.arange(len(presets)) + (i - len(tasks) / 2 + 0.5) * w
        ax.bar(x, y, w, yerr=[lo, hi], capsize=2, label=task)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(
        xticks=range(len(presets)),
        xticklabels=presets,
        title="zero-shot gap by shift",
        ylabel="in-distribution - zero-shot AUROC",
    )
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def write_shifts(out: Path, summaries: dict[str, dict], cfg) -> str:
    """shifts.md, shifts.json and shifts.png in `out`; returns the markdown table."""
    fractions = [float(f) for f in cfg.study.fractions]
    table = shifts_table(summaries, fractions)
    write_json(table, out / "shifts.json")
    shifts_png(table, out / "shifts.png")
    text = shifts_markdown(table, str(cfg.study.sites[SOURCE].preset), fractions)
    (out / "shifts.md").write_text(text + "\n![shifts.png](shifts.png)\n")
    return text
