"""A MEDS dataset's stays: each event's `hospitalization_id` and the stays' windows.

The column `site.meds.stay_column` names (else `hospitalization_id` where present) gives
each event its stay, and each stay's window runs from its admission to its discharge
code (else its first to its last event). Without a stay column, an admission code opens
a stay and the next discharge code of the same subject closes it: MEDS datasets built
from hospital records (`ADMISSION//CARDIAC` ... `DISCHARGE`) carry no stay column.
"""

import polars as pl
from omegaconf import DictConfig

STAY = "hospitalization_id"
ADMISSION, DISCHARGE = "HOSPITAL_ADMISSION", "HOSPITAL_DISCHARGE"


def mark_admissions(events: pl.DataFrame, cfg: DictConfig) -> pl.DataFrame:
    """Admission and discharge codes (`site.meds.*_codes`, and fedclif's own) rewritten to
    fedclif's namespaces, marked in `kind`."""
    # Rewritten once per distinct code and joined back: matching every row cost 3x more.
    codes = events.select(pl.col("code").unique()).with_columns(
        pl.col("code").alias("new"), pl.lit(None, pl.String).alias("kind")
    )
    for kind, space, prefixes in (
        ("admission", ADMISSION, cfg.admission_codes),
        ("discharge", DISCHARGE, cfg.discharge_codes),
    ):
        for p in dict.fromkeys([space, *[str(x).rstrip("/") for x in prefixes]]):
            hit = (pl.col("code") == p) | pl.col("code").str.starts_with(p + "//")
            rest = pl.col("code").str.slice(len(p) + 2)
            codes = codes.with_columns(
                pl.when(hit & pl.col("kind").is_null())
                .then(pl.lit(space + "//") + rest)
                .otherwise("new")
                .alias("new"),
                pl.when(hit & pl.col("kind").is_null())
                .then(pl.lit(kind))
                .otherwise("kind")
                .alias("kind"),
            )
    out = events.join(codes, on="code", how="left", nulls_equal=True, maintain_order="left")
    return out.with_columns(pl.col("new").alias("code")).drop("new")


def meds_stays(
    events: pl.DataFrame, shard_columns: list[str], cfg: DictConfig, problems: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each event's stay (`hospitalization_id`) and the stays: (hospitalization_id,
    patient_id, admission_dttm, admission_type_category, discharge_dttm,
    discharge_category). `shard_columns`: the data shards' own columns (a stay column is
    one of them)."""
    ev = mark_admissions(events, cfg).with_columns(
        pl.col("subject_id").cast(pl.String).alias("patient_id")
    )
    column = cfg.stay_column or (STAY if STAY in shard_columns else None)
    if column and column not in shard_columns:
        problems.append(
            f"no column {column!r} (site.meds.stay_column) in the data shards; their "
            f"columns: {', '.join(shard_columns)}"
        )
        return ev.with_columns(pl.lit(None, pl.String).alias(STAY)), _no_stays()
    if column:
        ev = ev.with_columns(pl.col(column).cast(pl.String).alias(STAY))
    elif not ev.filter(pl.col("kind") == "admission").height:
        heads = ", ".join(dict.fromkeys([ADMISSION, *cfg.admission_codes]))
        problems.append(
            f"no stays: no column {STAY!r} (or the one site.meds.stay_column names) and no "
            f"admission codes (codes starting {heads}: site.meds.admission_codes) in "
            f"{ev.height:,} rows"
        )
        return ev.with_columns(pl.lit(None, pl.String).alias(STAY)), _no_stays()
    else:
        ev = _derived(ev)
    timed = ev.filter(pl.col(STAY).is_not_null() & pl.col("time").is_not_null())
    cat = pl.col("code").str.splitn("//", 2).struct.field("field_1")
    cat = pl.when(cat != "").then(cat)  # a bare DISCHARGE: how the stay ended is unknown
    # Admissions and discharges apart: a few rows a stay, where every row is millions.
    marks = (
        timed.filter(pl.col("kind").is_not_null())
        .group_by(STAY)
        .agg(
            pl.col("time").filter(pl.col("kind") == "admission").min().alias("admitted"),
            pl.col("time").filter(pl.col("kind") == "discharge").max().alias("discharged"),
            cat.filter(pl.col("kind") == "admission").first().alias("admission_type_category"),
            cat.filter(pl.col("kind") == "discharge").last().alias("discharge_category"),
        )
    )
    stays = (
        timed.group_by(STAY)
        .agg(
            pl.col("patient_id").first(),
            pl.col("patient_id").n_unique().alias("subjects"),
            pl.col("time").min().alias("first"),
            pl.col("time").max().alias("last"),
        )
        .join(marks, on=STAY, how="left")
    )
    shared = stays.filter(pl.col("subjects") > 1)
    if shared.height:
        problems.append(
            f"{shared.height:,} stays in column {column!r} hold rows of several subjects "
            f"(e.g. stay {shared.get_column(STAY)[0]}); a stay belongs to one subject"
        )
    stays = stays.select(
        STAY,
        "patient_id",
        pl.coalesce("admitted", "first").alias("admission_dttm"),
        "admission_type_category",
        pl.coalesce("discharged", "last").alias("discharge_dttm"),
        "discharge_category",
    ).sort("patient_id", "admission_dttm", STAY)
    return ev, stays


def _derived(ev: pl.DataFrame) -> pl.DataFrame:
    """Stays from admission and discharge codes: an admission opens one (`<subject>-<n>`)
    holding every row from its time to the first discharge at or after it (rows at that
    time too: diagnoses are coded at discharge); a later admission first closes an open
    one. Rows before a subject's first admission, or between a discharge and the next
    admission, belong to none."""
    adm = (
        ev.filter(pl.col("kind") == "admission")
        .select("subject_id", pl.col("time").alias("admitted"))
        .unique()
        .sort("subject_id", "admitted")
        .with_columns(
            (
                pl.col("subject_id").cast(pl.String)
                + "-"
                + (pl.int_range(pl.len()).over("subject_id") + 1).cast(pl.String)
            ).alias(STAY),
            pl.col("admitted").shift(-1).over("subject_id").alias("next"),
        )
    )
    dis = (
        ev.filter(pl.col("kind") == "discharge")
        .select("subject_id", pl.col("time").alias("discharged"))
        .unique()
        .sort("subject_id", "discharged")
    )
    adm = adm.join_asof(
        dis,
        left_on="admitted",
        right_on="discharged",
        by="subject_id",
        strategy="forward",
        check_sortedness=False,
    ).with_columns(  # a discharge after the next admission closes that one
        pl.when(pl.col("next").is_null() | (pl.col("discharged") < pl.col("next")))
        .then("discharged")
        .otherwise(None)
        .alias("discharged")
    )
    ev = ev.with_row_index("__order")
    timed = (
        ev.filter(pl.col("time").is_not_null())
        .select("__order", "subject_id", "time")
        .sort("subject_id", "time")
        .join_asof(
            adm.select("subject_id", "admitted", "discharged", STAY),
            left_on="time",
            right_on="admitted",
            by="subject_id",
            strategy="backward",
            check_sortedness=False,
        )
        .filter(pl.col("discharged").is_null() | (pl.col("time") <= pl.col("discharged")))
        .select("__order", STAY)
    )
    return ev.join(timed, on="__order", how="left").sort("__order").drop("__order")


def _no_stays() -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            STAY: pl.String,
            "patient_id": pl.String,
            "admission_dttm": pl.Datetime("us"),
            "admission_type_category": pl.String,
            "discharge_dttm": pl.Datetime("us"),
            "discharge_category": pl.String,
        }
    )
