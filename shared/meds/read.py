"""A MEDS directory standing in for a CLIF site: its events mapped back to CLIF tables,
which then pass the same checks, statistics and tokenizer as any site.

Codes are read through the namespaces `fedclif export meds` writes (`VITAL//heart_rate`,
`LAB//sodium//mmol/L`: namespace, CLIF category, unit); a category outside CLIF's
permissible values becomes the table's unknown token downstream, as in CLIF; codes of
other namespaces are counted and left out. Each event needs its stay: MEDS's extra
`hospitalization_id` column, and the stay's `HOSPITAL_ADMISSION//<type>` and
`HOSPITAL_DISCHARGE//<category>` events give its window. MEDS stores values as float32:
fedclif's own export keeps the float64 reading beside it (`value_float64`), read back
exactly; other datasets' values are rounded to 7 significant digits (a reading recorded
as 36.7 then equals a cut at 36.7 again).
"""

import json
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
from flexible_schema.exceptions import SchemaValidationError, TableValidationError

from fedclif.shared.clif.schema import RESP_SETTINGS
from fedclif.shared.errors import FedclifError

# fedclif code prefix -> MEDS namespace (shared/meds/export.py writes them; read longest first).
NAMESPACES = (
    ("RESP_device", "RESP//device"),
    ("RESP_mode", "RESP//mode"),
    ("RESP", "RESP//setting"),
    ("MEDC_stop", "MED_CONT//stop"),
    ("MEDC", "MED_CONT"),
    ("MEDI", "MED_INT"),
    ("XFR-IN", "ADT"),
    ("VTL", "VITAL"),
    ("LAB", "LAB"),
    ("ASMT", "ASSESSMENT"),
    ("POS", "POSITION"),
    ("CODE", "CODE_STATUS"),
    ("CRRT", "CRRT"),
    ("DSCG", "HOSPITAL_DISCHARGE"),
    ("ADM", "HOSPITAL_ADMISSION"),
    ("SEX", "GENDER"),
    ("RACE", "RACE"),
    ("ETH", "ETHNICITY"),
)
STAY = "hospitalization_id"
# The reading as float64, beside MEDS's float32 `numeric_value` (written by fedclif).
EXACT = "value_float64"


def is_meds(path: str | Path) -> bool:
    """A MEDS dataset: a `data/` folder and no CLIF table files."""
    path = Path(path)
    return (path / meds.data_subdirectory).is_dir() and not any(path.glob("clif_*.parquet"))


def read_meds(root: str | Path) -> pl.DataFrame:
    """Every event of the dataset, checked: metadata present, each shard of the MEDS data
    schema with a `hospitalization_id`, and in time order within each subject."""
    root = Path(root)
    for f in (meds.dataset_metadata_filepath, meds.code_metadata_filepath):
        if not (root / f).is_file():
            raise FedclifError(
                f"{root / f}: missing; a MEDS dataset holds metadata/dataset.json and "
                "metadata/codes.parquet beside data/ (fedclif export meds writes both)"
            )
    try:
        json.loads((root / meds.dataset_metadata_filepath).read_text())
    except ValueError as e:
        raise FedclifError(f"{root / meds.dataset_metadata_filepath}: not JSON ({e})") from e
    shards = sorted((root / meds.data_subdirectory).rglob("*.parquet"))
    if not shards:
        raise FedclifError(f"{root / meds.data_subdirectory}: no parquet shards")
    frames = []
    for f in shards:
        try:  # align: safe casts (large strings, as polars writes them) pass
            table = meds.DataSchema.align(pq.read_table(f))
        except (SchemaValidationError, TableValidationError) as e:
            want = "subject_id int64, time timestamp[us], code string, numeric_value float32"
            raise FedclifError(f"{f}: {e} (the MEDS data schema: {want})") from e
        if STAY not in table.column_names:
            raise FedclifError(
                f"{f}: no column {STAY!r}: fedclif needs each event's stay (an extra column "
                "MEDS allows, as `fedclif export meds` writes it)"
            )
        df = pl.from_arrow(table).with_row_index("row")
        back = df.filter(
            (pl.col("subject_id") == pl.col("subject_id").shift())
            & (pl.col("time") < pl.col("time").shift())
        )
        unsorted = pl.col("subject_id") < pl.col("subject_id").shift()
        if back.height or df.filter(unsorted).height:
            bad = (back if back.height else df.filter(unsorted)).row(0, named=True)
            raise FedclifError(
                f"{f}: column 'time' out of order at row {bad['row']} (subject "
                f"{bad['subject_id']}); MEDS data is sorted by subject_id, then time"
            )
        frames.append(df.drop("row"))
    return pl.concat(frames, how="diagonal_relaxed")


def clif_tables(events: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """CLIF tables (UTC timestamps) from MEDS events (`read_meds`)."""
    ev = _namespaced(events)
    by = {k: g for (k,), g in ev.filter(pl.col("space").is_not_null()).group_by("space")}
    empty = ev.head(0)

    def of(name: str) -> pl.DataFrame:  # the events of one namespace
        return by.get(name, empty)

    tables = {**_patients_and_stays(ev, of), **_event_tables(ev, of)}
    required = ("patient", "hospitalization", "adt", "vitals", "labs")
    return {k: v for k, v in tables.items() if v.height or k in required}


def _namespaced(events: pl.DataFrame) -> pl.DataFrame:
    """MEDS events with each code split into its namespace (`space`), `category` and
    `unit`, the patient as CLIF names it, UTC times and one `value`."""
    f32 = pl.col("numeric_value").cast(pl.Float64).round_sig_figs(7)
    ev = events.with_columns(
        pl.col("subject_id").cast(pl.String).alias("patient_id"),
        pl.col("time").dt.replace_time_zone("UTC"),
        (pl.coalesce(pl.col(EXACT), f32) if EXACT in events.columns else f32).alias("value"),
    )
    # One when/then chain, longest namespace first: the first that matches wins.
    ordered = [name for _, name in sorted(NAMESPACES, key=lambda x: -len(x[1]))]
    space = pl.when(pl.col("code").str.starts_with(ordered[0] + "//")).then(pl.lit(ordered[0]))
    for name in ordered[1:]:
        space = space.when(pl.col("code").str.starts_with(name + "//")).then(pl.lit(name))
    ev = ev.with_columns(space.otherwise(None).alias("space"))
    parts = pl.col("code").str.slice(pl.col("space").str.len_chars() + 2).str.splitn("//", 2)
    ev = ev.with_columns(
        parts.struct.field("field_0").alias("category"), parts.struct.field("field_1").alias("unit")
    )
    return ev.with_columns(
        pl.when(pl.col("code") == "AGE").then(pl.lit("AGE")).otherwise("space").alias("space")
    )


def _patients_and_stays(ev: pl.DataFrame, of) -> dict[str, pl.DataFrame]:
    """The patient table (its static codes) and the hospitalization table (admission,
    discharge, age)."""
    static = {
        col: of(name).select("patient_id", pl.col("category").alias(col)).unique("patient_id")
        for name, col in (
            ("GENDER", "sex_category"),
            ("RACE", "race_category"),
            ("ETHNICITY", "ethnicity_category"),
        )
    }
    patient = ev.select("patient_id").unique().sort("patient_id")
    for _col, df in static.items():
        patient = patient.join(df, on="patient_id", how="left")
    adm = (
        of("HOSPITAL_ADMISSION")
        .select(
            STAY,
            "patient_id",
            pl.col("time").alias("admission_dttm"),
            pl.col("category").alias("admission_type_category"),
        )
        .unique(STAY)
    )
    dis = (
        of("HOSPITAL_DISCHARGE")
        .select(
            STAY,
            pl.col("time").alias("discharge_dttm"),
            pl.col("category").alias("discharge_category"),
        )
        .unique(STAY)
    )
    age = of("AGE").select(STAY, pl.col("value").alias("age_at_admission")).unique(STAY)
    hosp = adm.join(dis, on=STAY, how="left").join(age, on=STAY, how="left")
    return {"patient": patient, "hospitalization": hosp}


def _event_tables(ev: pl.DataFrame, of) -> dict[str, pl.DataFrame]:
    """The CLIF tables of timed events: ADT, vitals, labs, respiratory support,
    medications, assessments, position, code status, CRRT, diagnoses."""
    tables = {}

    def events_of(name: str, time: str, category: str, value: str | None = None) -> pl.DataFrame:
        cols = [STAY, pl.col("time").alias(time), pl.col("category").alias(category)]
        if value:
            cols.append(pl.col("value").alias(value))
        return of(name).select(cols)

    tables["adt"] = events_of("ADT", "in_dttm", "location_category")
    tables["vitals"] = events_of("VITAL", "recorded_dttm", "vital_category", "vital_value")
    labs = of("LAB")
    tables["labs"] = labs.select(
        STAY,
        pl.col("time").alias("lab_result_dttm"),
        pl.col("category").alias("lab_category"),
        pl.col("value").cast(pl.String).alias("lab_value"),
        pl.col("value").alias("lab_value_numeric"),
        pl.col("unit").alias("reference_unit"),
    )
    resp = pl.concat(
        [
            of("RESP//device").select(STAY, "time", pl.col("category").alias("device_category")),
            of("RESP//mode").select(STAY, "time", pl.col("category").alias("mode_category")),
            of("RESP//setting").select(
                STAY,
                "time",
                *(
                    pl.when(pl.col("category") == s).then("value").otherwise(None).alias(s)
                    for s in RESP_SETTINGS
                ),
            ),
        ],
        how="diagonal_relaxed",
    )
    tables["respiratory_support"] = resp.rename({"time": "recorded_dttm"})
    tables["medication_admin_continuous"] = pl.concat(
        [
            of("MED_CONT").select(
                STAY,
                pl.col("time").alias("admin_dttm"),
                pl.col("category").alias("med_category"),
                pl.col("value").alias("med_dose"),
                pl.col("unit").alias("med_dose_unit"),
                pl.lit(None, pl.String).alias("mar_action_category"),
            ),
            of("MED_CONT//stop").select(
                STAY,
                pl.col("time").alias("admin_dttm"),
                pl.col("category").alias("med_category"),
                pl.lit(None, pl.Float64).alias("med_dose"),
                pl.lit(None, pl.String).alias("med_dose_unit"),
                pl.lit("stop").alias("mar_action_category"),
            ),
        ]
    )
    tables["medication_admin_intermittent"] = events_of("MED_INT", "admin_dttm", "med_category")
    asmt = of("ASSESSMENT").with_columns(pl.col("category").str.splitn("=", 2).alias("qa"))
    tables["patient_assessments"] = asmt.select(
        STAY,
        pl.col("time").alias("recorded_dttm"),
        pl.col("qa").struct.field("field_0").alias("assessment_category"),
        pl.col("qa").struct.field("field_1").alias("categorical_value"),
        pl.col("value").alias("numerical_value"),
    )
    tables["position"] = events_of("POSITION", "recorded_dttm", "position_category")
    tables["code_status"] = (
        of("CODE_STATUS")
        .select(
            "patient_id",
            pl.col("time").alias("start_dttm"),
            pl.col("category").alias("code_status_category"),
        )
        .unique(maintain_order=True)
    )
    tables["crrt_therapy"] = events_of("CRRT", "recorded_dttm", "crrt_mode_category")
    dx = ev.filter(pl.col("code").str.starts_with("DIAGNOSIS//"))
    parts = dx.get_column("code").str.splitn("//", 3).struct.unnest()
    tables["hospital_diagnosis"] = dx.select(STAY).with_columns(
        parts.get_column("field_2").alias("diagnosis_code"),
        parts.get_column("field_1").alias("diagnosis_code_format"),
    )
    return tables


def write_clif(events: pl.DataFrame, out: str | Path) -> Path:
    """The CLIF tables of MEDS `events` as `clif_<table>.parquet` files in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in clif_tables(events).items():
        df.write_parquet(out / f"clif_{name}.parquet")
    return out
