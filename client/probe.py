"""What a frozen model's representations carry, at its own site and elsewhere (the
transfer paper's zero-shot test): linear probes on the last first-24 h state, and
trajectory metrics of the states over the 24 h with their association with outcomes."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import statsmodels.api as sm
import torch
from omegaconf import DictConfig
from scipy.special import expit
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from fedclif.client.loop import autocast, pick_device, to_device
from fedclif.shared.artifact import write_json
from fedclif.shared.evaluation.metrics import binary_metrics
from fedclif.shared.model.models import EHRModel, load_model
from fedclif.shared.model.sequences import SiteData, Windows, load_site_data, pad_collate
from fedclif.shared.tokens.labels import LABELS, usable

TRAJECTORY = ("path_length", "max_jump", "anomaly")


@torch.no_grad()
def representations(
    model: EHRModel, data: SiteData, rows: np.ndarray, context: int, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Per stay: the last state of its first-24 h view, the length of the path its states
    trace over the window and the largest single step along it."""
    device = next(model.parameters()).device
    model.eval()
    out: dict[str, list] = {"last": [], "path_length": [], "max_jump": []}
    loader = DataLoader(
        Windows(data, rows, context),
        batch_size=batch_size,
        collate_fn=pad_collate(model.lm.config.pad_token_id),
    )
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device):
            h = model.hidden(batch).float()
        n = batch["lengths"]
        out["last"].append(h[torch.arange(h.shape[0]), n - 1].cpu())
        step = (h[:, 1:] - h[:, :-1]).norm(dim=-1)
        real = torch.arange(step.shape[1], device=device)[None] < (n - 1)[:, None]
        step = step * real
        out["path_length"].append(step.sum(1).cpu())
        out["max_jump"].append(step.max(1).values.cpu() if step.shape[1] else n * 0.0)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _association(feats: np.ndarray, y: np.ndarray) -> dict:
    """Logistic regression of the outcome on standardized trajectory metrics (Wald
    p-values, statsmodels)."""
    z = (feats - feats.mean(0)) / np.where(feats.std(0) > 0, feats.std(0), 1.0)
    try:
        fit = sm.Logit(y, sm.add_constant(z)).fit(disp=0)
    except Exception as e:  # separation or a singular design on small sites
        return {"error": type(e).__name__}
    return {
        name: {"coef": float(fit.params[i + 1]), "p_value": float(fit.pvalues[i + 1])}
        for i, name in enumerate(TRAJECTORY)
    }


def fit_probes(
    rep: np.ndarray, labels: pl.DataFrame, names: dict[str, str], C: float
) -> dict[str, np.ndarray]:
    """One standardized logistic regression per outcome (`names`: name -> label column)
    on representations `rep` of the stays whose outcomes are `labels`, as plain arrays
    `<name>.mean|scale|coef|intercept`: what a site sends when another site scores its
    probes. Outcomes with one class here are left out."""
    out = {}
    for name, label in names.items():
        ok = usable(labels, label)
        y = labels.get_column(label).to_numpy()[ok].astype(int)
        if len(np.unique(y)) < 2:
            continue
        scaler = StandardScaler().fit(rep[ok])
        clf = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(rep[ok]), y)
        out |= {
            f"{name}.mean": scaler.mean_,
            f"{name}.scale": scaler.scale_,
            f"{name}.coef": clf.coef_[0],
            f"{name}.intercept": clf.intercept_,
        }
    return out


def score_probes(
    probes: dict[str, np.ndarray],
    rep: np.ndarray,
    labels: pl.DataFrame,
    names: dict[str, str],
    n_boot: int,
    seed: int,
) -> dict[str, dict]:
    """Per outcome with a probe: AUROC, AUPRC, F1 with bootstrap intervals of the probe's
    risk (the logistic regression's own formula, from `fit_probes`' arrays) on `rep`."""
    res = {}
    for name, label in names.items():
        if f"{name}.coef" not in probes:
            continue
        ok = usable(labels, label)
        y = labels.get_column(label).to_numpy()[ok].astype(int)
        z = (rep[ok] - probes[f"{name}.mean"]) / probes[f"{name}.scale"]
        p = expit(z @ probes[f"{name}.coef"] + probes[f"{name}.intercept"][0])
        res[name] = binary_metrics(y, p, n_boot=n_boot, seed=seed)
    return res


def probe(
    model_path: str | Path,
    train_dir: str | Path,
    test_dirs: list[str | Path],
    cfg: DictConfig,
    out: str | Path,
    labels: tuple[str, ...] = LABELS,
    test_split: str = "test",
) -> dict:
    """Fit one probe per label on the training site's train split and evaluate it on the
    training site's test split (in-site) and on `test_split` of every other site."""
    device = pick_device(cfg.device)
    model, _ = load_model(model_path, device)
    ctx = int(cfg.finetune.context)
    c = cfg.probe
    sites = [load_site_data(p, cfg.split) for p in [train_dir, *test_dirs]]
    for s in sites:
        model.check_data(s.tok.hash, s.path, model_path)
    train = sites[0]
    fit_rows = train.rows("train")
    evals = [(train, train.rows("test"), f"{train.name} (in-site)")] + [
        (s, s.rows(test_split), s.name) for s in sites[1:]
    ]
    fit_rep = representations(model, train, fit_rows, ctx)
    reps = [representations(model, s, r, ctx) for s, r, _ in evals]
    forest = IsolationForest(n_estimators=int(c.isolation_trees), random_state=int(cfg.seed))
    forest.fit(fit_rep["last"])
    for r in reps:
        r["anomaly"] = -forest.score_samples(r["last"])

    names = {label: label for label in labels}
    fitted = fit_probes(fit_rep["last"], train.labels[fit_rows], names, float(c.C))
    probes, assoc, summary = [], [], []
    for label in labels:
        for (s, rows, where), r in zip(evals, reps, strict=True):
            m = score_probes(
                fitted, r["last"], s.labels[rows], {label: label}, int(c.n_boot), int(cfg.seed)
            )
            if label not in m:
                break
            probes.append({"label": label, "test": where, **m[label]})
            ok = usable(s.labels[rows], label)
            ty = s.labels[rows].get_column(label).to_numpy()[ok].astype(int)
            feats = np.c_[tuple(r[k][ok] for k in TRAJECTORY)]
            if len(np.unique(ty)) == 2:
                assoc.append({"label": label, "site": where, **_association(feats, ty)})
    for (_, _, where), r in zip(evals, reps, strict=True):
        summary.append(
            {"site": where, "n": int(r["last"].shape[0])}
            | {k: float(np.mean(r[k])) for k in TRAJECTORY}
        )
    result = {
        "model": str(model_path),
        "train_site": train.name,
        "probes": probes,
        "trajectory": {"summary": summary, "association": assoc},
    }
    out = Path(out)
    write_json(result, out / "probe.json")
    _plot(result, [r["anomaly"] for r in reps], [w for _, _, w in evals], out / "probe.png")
    return result


def _plot(result: dict, anomaly: list[np.ndarray], sites: list[str], png: Path) -> None:
    labels = list(dict.fromkeys(r["label"] for r in result["probes"]))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[2, 1])
    width = 0.8 / max(len(sites), 1)
    for k, site in enumerate(sites):
        rows = {r["label"]: r for r in result["probes"] if r["test"] == site}
        x = np.arange(len(labels)) + k * width
        v = np.array([rows[lab]["auroc"] if lab in rows else np.nan for lab in labels])
        lo = np.array([rows[lab]["auroc_low"] if lab in rows else np.nan for lab in labels])
        hi = np.array([rows[lab]["auroc_high"] if lab in rows else np.nan for lab in labels])
        ax.bar(x, v, width, yerr=[v - lo, hi - v], capsize=3, label=site)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(labels)) + width * (len(sites) - 1) / 2, labels, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC (95% CI)")
    ax.set_title(f"linear probes trained at {result['train_site']}")
    ax.legend(fontsize=8)
    bx.boxplot(anomaly, tick_labels=[s[-25:] for s in sites], showfliers=False)
    bx.set_title("isolation-forest anomaly of 24 h state")
    bx.tick_params(axis="x", rotation=15)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
