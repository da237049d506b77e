"""A site's tables as one stream of coded events per stay: what statistics count and
tokens encode.

Every event is (stay, hours since admission, code, optional numeric value, order). A code
is `<PREFIX>_<category>` (`LAB_creatinine`, `XFR-IN_icu`); a category that is not a CLIF
permissible value becomes `<PREFIX>_UNK`, so free text never turns into a code unless it
is an open-vocabulary column (assessment answers), which statistics guard separately.
Statistics and tokenization both read this stream, so the vocabulary is fitted on exactly
what gets encoded.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import polars as pl

from fedclif.shared.clif.schema import RESP_SETTINGS
from fedclif.shared.clif.site import Site
from fedclif.shared.clif.versions import vocabulary_terms

UNK = "UNK"
# Marks a code built from free text; statistics keep such codes only when common.
OPEN_SEP = "="

# Order of events that share a timestamp; lower first. Prefix and suffix bracket them.
PRIO_START, PRIO_PREFIX, PRIO_DISCHARGE, PRIO_END = 0, 1, 98, 99

# Token types (EHRMamba's type embedding): prefix of a code -> type id.
TOKEN_TYPES = (
    "special",
    "demographic",
    "time",
    "adt",
    "vital",
    "lab",
    "respiratory",
    "med_continuous",
    "med_intermittent",
    "assessment",
    "position",
    "code_status",
    "crrt",
    "discharge",
)
PREFIX_TYPE = {
    "TL": "special",
    "TASK": "special",
    "PAD": "special",
    "Q": "special",
    "SEX": "demographic",
    "RACE": "demographic",
    "ETH": "demographic",
    "AGE": "demographic",
    "ADM": "demographic",
    "T": "time",
    "XFR-IN": "adt",
    "VTL": "vital",
    "LAB": "lab",
    "RESP": "respiratory",
    "MEDC": "med_continuous",
    "MEDI": "med_intermittent",
    "ASMT": "assessment",
    "POS": "position",
    "CODE": "code_status",
    "CRRT": "crrt",
    "DSCG": "discharge",
}


def prefix_of(code: str) -> str:
    return code.split("_", 1)[0]


def type_id(code: str) -> int:
    return TOKEN_TYPES.index(PREFIX_TYPE.get(prefix_of(code), "special"))


def category_code(table: str, column: str, prefix: str) -> pl.Expr:
    """`PREFIX_value` for the vocabulary's terms, `PREFIX_UNK` for the rest."""
    allowed = vocabulary_terms(table, column)
    col = pl.col(column)
    known = col.is_in(sorted(allowed)) if allowed else col.is_not_null()
    return pl.when(known).then(pl.lit(prefix + "_") + col).otherwise(pl.lit(f"{prefix}_{UNK}"))


def _frame(
    df: pl.DataFrame,
    time: str,
    code: pl.Expr,
    value: pl.Expr | None,
    prio: int,
    state: str | None = None,
) -> pl.LazyFrame:
    """One table's events; `state` names a kind of state (device, position) whose
    repeated values are dropped."""
    return df.lazy().select(
        pl.col("hospitalization_id"),
        pl.col(time).alias("time"),
        code.alias("code"),
        (value if value is not None else pl.lit(None)).cast(pl.Float64).alias("value"),
        pl.lit(prio, pl.Int8).alias("prio"),
        pl.lit(state, pl.String).alias("state"),
    )


@dataclass(frozen=True)
class Source:
    """A category column whose values are events: `<prefix>_<category>` at `time`."""

    table: str
    time: str
    category: str
    prefix: str
    prio: int
    value: str | None = None
    state: str | None = None


# Tables (or columns) that map one-to-one onto events. Labs use the result time, not the
# collection time: a value is known to the model when it is reported.
SOURCES = (
    Source("adt", "in_dttm", "location_category", "XFR-IN", 10),
    Source(
        "respiratory_support", "recorded_dttm", "device_category", "RESP_device", 11, state="device"
    ),
    Source("respiratory_support", "recorded_dttm", "mode_category", "RESP_mode", 11, state="mode"),
    Source("vitals", "recorded_dttm", "vital_category", "VTL", 12, value="vital_value"),
    Source("labs", "lab_result_dttm", "lab_category", "LAB", 13, value="lab_value_numeric"),
    Source("position", "recorded_dttm", "position_category", "POS", 17, state="position"),
    Source("crrt_therapy", "recorded_dttm", "crrt_mode_category", "CRRT", 18, state="crrt"),
)


def _source(site: Site, src: Source) -> list[pl.LazyFrame]:
    df = site.tables[src.table]
    if src.category not in df.columns:
        return []
    return [
        _frame(
            df.filter(pl.col(src.category).is_not_null()),
            src.time,
            category_code(src.table, src.category, src.prefix),
            pl.col(src.value) if src.value else None,
            src.prio,
            src.state,
        )
    ]


def _resp_settings(site: Site) -> list[pl.LazyFrame]:
    df = site.tables["respiratory_support"]
    return [
        _frame(
            df.filter(pl.col(s).is_not_null()), "recorded_dttm", pl.lit(f"RESP_{s}"), pl.col(s), 11
        )
        for s in RESP_SETTINGS
        if s in df.columns
    ]


def _meds_continuous(site: Site) -> list[pl.LazyFrame]:
    df = site.tables["medication_admin_continuous"]
    code = category_code("medication_admin_continuous", "med_category", "MEDC")
    dose = pl.col("med_dose") if "med_dose" in df.columns else None
    if "mar_action_category" in df.columns:
        stop = pl.col("mar_action_category") == "stop"
        code = (
            pl.when(stop)
            .then(code.str.replace("MEDC_", "MEDC_stop_", literal=True))
            .otherwise(code)
        )
        if dose is not None:
            dose = pl.when(stop).then(None).otherwise(dose)
    return [_frame(df, "admin_dttm", code, dose, 14)]


def _meds_intermittent(site: Site) -> list[pl.LazyFrame]:
    df = site.tables["medication_admin_intermittent"]
    if "mar_action_category" in df.columns:
        df = df.filter(pl.col("mar_action_category").fill_null("") != "not_given")
    code = category_code("medication_admin_intermittent", "med_category", "MEDI")
    return [_frame(df, "admin_dttm", code, None, 15)]


def _assessments(site: Site) -> list[pl.LazyFrame]:
    df = site.tables["patient_assessments"]
    code = category_code("patient_assessments", "assessment_category", "ASMT")
    value = pl.col("numerical_value") if "numerical_value" in df.columns else pl.lit(None)
    if "categorical_value" in df.columns:
        # Open vocabulary: the answer joins the code after OPEN_SEP (ASMT_cam_icu=positive).
        answer = pl.col("categorical_value").str.strip_chars()
        code = (
            pl.when(value.is_null() & answer.is_not_null() & ~code.str.ends_with(f"_{UNK}"))
            .then(code + OPEN_SEP + answer)
            .otherwise(code)
        )
    return [_frame(df, "recorded_dttm", code, value, 16)]


def _code_status(site: Site, stays: pl.DataFrame) -> list[pl.LazyFrame]:
    # Code status is recorded per patient: attach each order to that patient's stays.
    df = site.tables["code_status"].join(
        stays.select("patient_id", "hospitalization_id"), on="patient_id"
    )
    return [
        _frame(
            df,
            "start_dttm",
            category_code("code_status", "code_status_category", "CODE"),
            None,
            19,
            state="code_status",
        )
    ]


# Tables whose events need more than a category column.
EVENT_TABLES: dict[str, Callable[[Site], list[pl.LazyFrame]]] = {
    "respiratory_support": _resp_settings,
    "medication_admin_continuous": _meds_continuous,
    "medication_admin_intermittent": _meds_intermittent,
    "patient_assessments": _assessments,
}


def stays(site: Site, min_hours: float | None = None) -> pl.DataFrame:
    """Stays long enough to tokenize (`min_hours`, default `site.min_stay_hours`), with
    demographics and index within the patient.

    `stay` is a dense integer id in admission order, used instead of the string id in the
    hot sort and group steps.
    """
    h = site.tables["hospitalization"].with_columns(
        pl.col("admission_dttm")
        .rank("ordinal")
        .over("patient_id")
        .sub(1)
        .cast(pl.Int32)
        .alias("hosp_index")
    )
    p = site.tables["patient"].select(
        "patient_id", "sex_category", "race_category", "ethnicity_category"
    )
    min_h = float(site.cfg.min_stay_hours if min_hours is None else min_hours)
    return (
        h.join(p, on="patient_id", how="left")
        .filter(
            pl.col("discharge_dttm") - pl.col("admission_dttm") >= pl.duration(minutes=60 * min_h)
        )
        .sort("admission_dttm", "hospitalization_id")
        .with_row_index("stay")
        .with_columns(pl.col("stay").cast(pl.Int32))
    )


def stay_chunks(site: Site, st: pl.DataFrame | None = None) -> Iterator[tuple[Site, pl.DataFrame]]:
    """The site's stays (`st`, default `stays(site)`) `site.cfg.chunk_stays` at a time,
    each with the site restricted to them: what statistics and tokenization iterate over
    to keep memory bounded."""
    st = stays(site) if st is None else st
    chunk = max(1, int(site.cfg.chunk_stays))
    for lo in range(0, st.height, chunk):
        part = st.slice(lo, chunk)
        yield site.restrict(part), part


def _hours(expr: pl.Expr) -> pl.Expr:
    return (expr - pl.col("admission_dttm")).dt.total_microseconds() / 3.6e9


def _prefix_suffix(site: Site, st: pl.DataFrame) -> pl.LazyFrame:
    lf = st.lazy()

    def demo(table: str, column: str, prefix: str, prio: int) -> pl.LazyFrame:
        return lf.select(
            "stay",
            pl.lit(0.0).alias("hours"),
            category_code(table, column, prefix).alias("code"),
            pl.lit(None, pl.Float64).alias("value"),
            pl.lit(prio, pl.Int8).alias("prio"),
        )

    age = lf.select(
        "stay",
        pl.lit(0.0).alias("hours"),
        pl.lit("AGE").alias("code"),
        pl.col("age_at_admission").cast(pl.Float64).alias("value"),
        pl.lit(PRIO_PREFIX + 3, pl.Int8).alias("prio"),
    )
    discharge = lf.select(
        "stay",
        _hours(pl.col("discharge_dttm")).alias("hours"),
        category_code("hospitalization", "discharge_category", "DSCG").alias("code"),
        pl.lit(None, pl.Float64).alias("value"),
        pl.lit(PRIO_DISCHARGE, pl.Int8).alias("prio"),
    )
    return pl.concat(
        [
            demo("patient", "sex_category", "SEX", PRIO_PREFIX),
            demo("patient", "race_category", "RACE", PRIO_PREFIX + 1),
            demo("patient", "ethnicity_category", "ETH", PRIO_PREFIX + 2),
            age,
            demo("hospitalization", "admission_type_category", "ADM", PRIO_PREFIX + 4),
            discharge,
        ]
    )


def stay_events(site: Site, st: pl.DataFrame | None = None) -> pl.LazyFrame:
    """Every coded event of every tokenizable stay, within the stay's window.

    Columns: stay, hours (since admission; events up to `pre_admission_hours` early are
    placed at 0), code, value (null when not numeric or missing), prio; unordered. State codes
    (device, mode, position, CRRT mode, code status) are kept only when they change.
    """
    st = stays(site) if st is None else st
    parts = [f for src in SOURCES if site.has(src.table) for f in _source(site, src)]
    parts += [f for name, fn in EVENT_TABLES.items() if site.has(name) for f in fn(site)]
    if site.has("code_status"):
        parts += _code_status(site, st)
    window = st.lazy().select("hospitalization_id", "stay", "admission_dttm", "discharge_dttm")
    pre = pl.duration(minutes=60 * float(site.cfg.pre_admission_hours))
    events = (
        pl.concat(parts)
        .join(window, on="hospitalization_id")
        .filter(
            (pl.col("time") >= pl.col("admission_dttm") - pre)
            & (pl.col("time") <= pl.col("discharge_dttm"))
        )
        .with_columns(_hours(pl.col("time")).clip(lower_bound=0.0).alias("hours"))
    )
    # A state event that repeats the previous state of the same kind adds nothing. Only
    # the (few) state events are sorted here; ordering the stream is the encoder's job.
    cols = ("stay", "hours", "code", "value", "prio")
    changed = (pl.col("code") != pl.col("code").shift().over("stay", "state")).fill_null(True)
    states = (
        events.filter(pl.col("state").is_not_null())
        .sort("stay", "hours", "prio", "code")
        .filter(changed)
    )
    events = pl.concat([events.filter(pl.col("state").is_null()).select(cols), states.select(cols)])
    return pl.concat([_prefix_suffix(site, st), events])
