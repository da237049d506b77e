"""Outcome labels per stay, from the full stay (not the 24 h input window)."""

import numpy as np
import polars as pl

from fedclif.shared.clif.site import Site

LABELS = (
    "same_admission_death",
    "long_length_of_stay",
    "icu_admission",
    "imv_event",
    "readmission_30d",
)
# Labels whose event can already have happened inside the input window; evaluation
# leaves those stays out, using the stored `<label>_24h` flag.
WINDOW_FLAGGED = ("icu_admission", "imv_event")
# Task tokens of prompted finetuning (`TASK_<name>`, tokenizer `tasks`) and their labels.
TASKS = {
    "death": "same_admission_death",
    "long_los": "long_length_of_stay",
    "icu": "icu_admission",
    "imv": "imv_event",
    "readmission": "readmission_30d",
}


def usable(labels: pl.DataFrame, label: str) -> np.ndarray:
    """Rows whose `label` can be evaluated: the outcome is known, and for ICU and
    ventilation it had not already happened in the input window (it would be read, not
    predicted)."""
    ok = labels.get_column(label).is_not_null().to_numpy()
    if label in WINDOW_FLAGGED:
        ok &= ~labels.get_column(f"{label}_24h").fill_null(False).to_numpy()
    return ok


def _any_event(
    events: pl.DataFrame, time: str, st: pl.DataFrame, name: str, input_hours: float
) -> pl.DataFrame:
    """Per stay: whether the event happened at all and within the input window."""
    cut = pl.col("admission_dttm") + pl.duration(minutes=60 * input_hours)
    hit = (
        st.select("hospitalization_id", "admission_dttm")
        .join(events.select("hospitalization_id", time), on="hospitalization_id")
        .group_by("hospitalization_id")
        .agg(pl.lit(True).alias(name), (pl.col(time) < cut).any().alias(f"{name}_24h"))
    )
    return (
        st.select("hospitalization_id")
        .join(hit, on="hospitalization_id", how="left")
        .with_columns(pl.col(name, f"{name}_24h").fill_null(False))
    )


def outcome_labels(site: Site, st: pl.DataFrame) -> pl.DataFrame:
    """One row per stay in `st` (see `events.stays`), keyed by hospitalization_id.

    A label is null when the site cannot know it: death when the discharge category is
    missing, ventilation when the site has no respiratory support table.
    """
    hours = float(site.cfg.input_hours)
    dscg = pl.col("discharge_category")
    out = st.select(
        "hospitalization_id",
        pl.when(dscg.is_null() | (dscg == "Missing"))
        .then(None)
        .otherwise(dscg == "Expired")
        .alias("same_admission_death"),
        (pl.col("discharge_dttm") - pl.col("admission_dttm") > pl.duration(days=7)).alias(
            "long_length_of_stay"
        ),
    )
    adt = site.tables["adt"].filter(pl.col("location_category") == "icu")
    out = out.join(_any_event(adt, "in_dttm", st, "icu_admission", hours), on="hospitalization_id")
    if site.has("respiratory_support"):
        rs = site.tables["respiratory_support"].filter(pl.col("device_category") == "IMV")
        out = out.join(
            _any_event(rs, "recorded_dttm", st, "imv_event", hours), on="hospitalization_id"
        )
    else:
        out = out.with_columns(
            pl.lit(None, pl.Boolean).alias(c) for c in ("imv_event", "imv_event_24h")
        )
    # Any other admission of the same patient within 30 days after this discharge,
    # counting stays too short to tokenize.
    allh = site.tables["hospitalization"].select(
        "patient_id", pl.col("admission_dttm").alias("next_admission")
    )
    readmit = (
        st.select("hospitalization_id", "patient_id", "discharge_dttm")
        .join(allh, on="patient_id")
        .filter(
            (pl.col("next_admission") > pl.col("discharge_dttm"))
            & (pl.col("next_admission") <= pl.col("discharge_dttm") + pl.duration(days=30))
        )
        .select("hospitalization_id")
        .unique()
        .with_columns(pl.lit(True).alias("readmission_30d"))
    )
    out = out.join(readmit, on="hospitalization_id", how="left").with_columns(
        pl.col("readmission_30d").fill_null(False)
    )
    cols = [c for lab in LABELS for c in (lab, f"{lab}_24h") if c in out.columns]
    return out.select("hospitalization_id", *cols)
