"""The study report's calibration: Brier score and expected calibration error per arm, as
predicted and after Platt recalibration on the evaluated site's validation split (the
held-out stays every arm already uses for early stopping and thresholds, so the repair
costs no extra data), and the reliability curves as a PNG."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

# As predicted and after recalibration (shared/evaluation/calibration.py `calibration` keys).
KEYS = [f"{m}{s}" for s in ("", "_recal") for m in ("brier", "ece")]
KEYS += [f"brier{s}_{end}" for s in ("", "_recal") for end in ("low", "high")]


def select(rows: list[dict], arm: str, setting: str, site: str, task: str, frac: float):
    """The rows (one per seed) of one cell of the study's table."""
    return [
        r
        for r in rows
        if r["arm"] == arm
        and r["setting"] == setting
        and r["eval_site"] == site
        and r["task"] == task
        and abs(r["fraction"] - frac) < 1e-9
    ]


def calibration_cells(rows: list[dict], columns: list[tuple], tasks: list[str], top: float):
    """{task: {column label: mean over seeds of the calibration keys, raw and `_recal`}};
    columns are the report's (label, arm, setting, site), finetuned ones at share `top`."""
    out = {}
    for t in tasks:
        out[t] = {}
        for label, arm, setting, site in columns:
            sel = select(rows, arm, setting, site, t, top if setting == "local_finetune" else 1.0)
            sel = [r for r in sel if "brier" in r]
            if sel:
                out[t][label] = {
                    k: float(np.nanmean([r.get(k, np.nan) for r in sel])) for k in KEYS
                }
    return out


def _f(c: dict, key: str) -> str:
    v = c.get(key, np.nan)
    return "-" if np.isnan(v) else f"{v:.3f}"


def calibration_markdown(cells: dict) -> list[str]:
    """Two tables (Brier, ECE), arms down and tasks across, `predicted -> recalibrated`."""
    tasks = list(cells)
    labels = list(dict.fromkeys(label for t in tasks for label in cells[t]))
    lines = [
        "## Calibration",
        "",
        "Test stays of the evaluated site, mean over seeds: as predicted -> after Platt "
        "recalibration on that site's validation split. Brier score with its bootstrap 95% "
        "interval (lower is better; a model that always predicts the prevalence p scores "
        "p(1-p)); expected calibration error over 10 equal-mass bins. The curves: "
        "`reliability.png`.",
        "",
    ]
    for name, key in (("Brier score", "brier"), ("ECE", "ece")):
        lines += [f"| {name} | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for label in labels:
            row = []
            for t in tasks:
                c = cells[t].get(label, {})
                interval = ""
                if key == "brier":
                    interval = f" [{_f(c, 'brier_low')}, {_f(c, 'brier_high')}]"
                row.append(f"{_f(c, key)}{interval} -> {_f(c, key + '_recal')}" if c else "-")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def reliability_png(
    rows: list[dict], columns: list[tuple], tasks: list[str], top: float, path: Path
) -> str | None:
    """Observed rate against mean predicted probability per bin (mean over seeds), each
    column as predicted (solid) and recalibrated (dashed); None when no site sent a
    curve (its policy withholds curves whose bins hold fewer stays than its minimum)."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.8 * len(tasks), 3.8), squeeze=False)
    drawn = False
    for ax, t in zip(axes[0], tasks, strict=True):
        for i, (label, arm, setting, site) in enumerate(columns):
            sel = select(rows, arm, setting, site, t, top if setting == "local_finetune" else 1.0)
            for sfx, ls in (("", "-"), ("_recal", "--")):
                curves = [r for r in sel if f"reliability_observed{sfx}" in r]
                if not curves:
                    continue
                x = np.mean([r[f"reliability_predicted{sfx}"] for r in curves], 0)
                y = np.mean([r[f"reliability_observed{sfx}"] for r in curves], 0)
                ax.plot(x, y, ls=ls, marker=".", color=f"C{i}", label=label if not sfx else None)
                drawn = True
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set(
            xlabel="mean predicted probability",
            ylabel="observed rate",
            title=t,
            xlim=(0, 1),
            ylim=(0, 1),
        )
    if not drawn:
        plt.close(fig)
        return None
    axes[0][0].legend(
        fontsize=7, title="solid: as predicted\ndashed: recalibrated", title_fontsize=7
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name
