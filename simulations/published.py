"""The study held against published federated EHR studies, beyond the transfer paper:

- the cross-site penalty (in-site minus other-site AUROC and AUPRC) of the foundation
  model beside that of the gradient-boosted bag-of-tokens baseline, as a federated study
  of generative event models on three CLIF health systems reports it;
- the federated model as a share of the pooled (centralized) model's AUROC and AUPRC, as
  a MIMIC-IV study with five non-IID sites reports it.

Each figure comes with a bootstrap 95% interval (shared/evaluation/metrics.py replicates)."""

from collections.abc import Callable

from fedclif.shared.evaluation.metrics import difference_text, paired_difference, paired_ratio
from fedclif.simulations.sites import SOURCE, TARGET

# Published figures the report prints beside ours.
PUBLISHED = {
    "penalty": {
        "source": "federated generative event models on three CLIF health systems "
        "(122,251 ICU stays, 12 tasks)",
        "foundation model": {"auroc": 0.025, "auprc": 0.027},
        "gradient boosting": {"auroc": 0.079, "auprc": 0.089},
    },
    "federated_share": {
        "source": "MIMIC-IV, 5 non-IID sites, FedAvg against centralized",
        "auroc": "98-100%",
        "auprc": "85%",
    },
}
# The arms whose penalty the report compares: the source's finetuned model and the
# gradient-boosting baseline fitted on the same source train split (simulations/reference_arms.py).
PENALTY_ARMS = {"foundation model": "source_only", "gradient boosting": "gbm"}


def penalty(compare: Callable, tasks: list[str], sites: list[str]) -> dict:
    """{arm label: {site: {metric: in-site minus at-site, with its interval}}}; `compare`
    is the report's `_compare(rows, a, b, tasks, paired, metric)` bound to the rows."""
    out = {}
    for label, arm in PENALTY_ARMS.items():
        home = {"arm": arm, "setting": "in_distribution", "eval_site": SOURCE}
        out[label] = {
            site: {
                metric: compare(
                    home,
                    {"arm": arm, "setting": "zero_shot", "eval_site": site},
                    tasks,
                    False,
                    metric,
                )
                for metric in ("auroc", "auprc")
            }
            for site in sites
        }
    return out


def federated_share(means: Callable, tasks: list[str], top: float) -> dict:
    """The federated model (federated pretraining, finetuned at the target on share
    `top`) as a percentage of the pooled model, both scored on the target's test stays:
    {metric: {percent, low, high}} from the paired replicates' ratio. `means` is the
    report's `_means(rows, a, b, tasks, metric)` bound to the rows."""
    fed = {
        "arm": "federated_finetuned",
        "setting": "local_finetune",
        "eval_site": TARGET,
        "fraction": top,
    }
    pooled = {"arm": "pooled", "setting": "pooled", "eval_site": TARGET}
    out = {}
    for metric in ("auroc", "auprc"):
        a, b, b_reps, a_reps = means(fed, pooled, tasks, metric)
        if a is None:
            out[metric] = {"verdict": "not measured"}
            continue
        out[metric] = paired_ratio(a, b, a_reps, b_reps) | {
            "difference": paired_difference(a, b, a_reps, b_reps)
        }
    return out


def published_markdown(pen: dict, share: dict, tasks: list[str]) -> list[str]:
    """The two comparisons as report.md lines."""
    p, s = PUBLISHED["penalty"], PUBLISHED["federated_share"]

    lines = [
        "## Against the published numbers",
        "",
        f"**Cross-site penalty** (in-site minus other-site, mean over {', '.join(tasks)}; "
        "95% interval of the difference of the two sites' bootstraps), the foundation "
        "model (source-only, finetuned at the source) beside the gradient-boosted "
        f"bag-of-tokens baseline fitted on the same train split; published: {p['source']}.",
        "",
        "| model | evaluated at | AUROC penalty | published | AUPRC penalty | published |",
        "|---|---|---|---|---|---|",
    ]
    for label, by_site in pen.items():
        for site, d in by_site.items():
            ours = {m: difference_text(d[m], verdict=False) for m in ("auroc", "auprc")}
            lines.append(
                f"| {label} | {site} | {ours['auroc']} | {p[label]['auroc']:.3f} "
                f"| {ours['auprc']} | {p[label]['auprc']:.3f} |"
            )
    lines += [
        "",
        "**Federated vs pooled** at the target (federated pretraining then finetuning on "
        "all of the target's training data, against pretraining and finetuning on the "
        "pooled data; the same test stays, paired bootstrap), as a percentage of pooled; "
        f"published: {s['source']}.",
        "",
        "| metric | federated / pooled | published |",
        "|---|---|---|",
    ]
    for metric in ("auroc", "auprc"):
        d = share[metric]
        cell = f"{d['percent']:.1f}% [{d['low']:.1f}%, {d['high']:.1f}%]" if "percent" in d else "-"
        lines.append(f"| {metric.upper()} | {cell} | {s[metric]} |")
    return [*lines, ""]
