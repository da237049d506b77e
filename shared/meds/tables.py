"""CLIF tables from a MEDS dataset read by shared/meds/read.py: the patient and
hospitalization tables from its stays and patient-level codes, the event tables from its
namespaces; written as `clif_<table>.parquet` files, which the site's checks then read
like any CLIF export."""

from pathlib import Path

import meds
import polars as pl

from fedclif.shared.clif.schema import RESP_SETTINGS
from fedclif.shared.meds.read import STAY, MedsData


def clif_tables(data: MedsData) -> dict[str, pl.DataFrame]:
    """CLIF tables (UTC timestamps) from a MEDS dataset read by `read_meds`."""
    ev = data.events.with_columns(pl.col("time").dt.replace_time_zone("UTC"))
    by = {k: g for (k,), g in ev.group_by("space")}
    empty = ev.head(0)

    def of(name: str) -> pl.DataFrame:  # the events of one namespace
        return by.get(name, empty)

    tables = {**_patients_and_stays(data.stays, of), **_event_tables(ev, of)}
    required = ("patient", "hospitalization", "adt", "vitals", "labs")
    return {k: v for k, v in tables.items() if v.height or k in required}


def _patients_and_stays(stays: pl.DataFrame, of) -> dict[str, pl.DataFrame]:
    """The patient table (its static codes, birth and death) and the hospitalization table
    (the stays; age from fedclif's AGE code, else from the birth date; a stay the patient
    died in without a discharge category is Expired)."""
    utc = {c: pl.col(c).dt.replace_time_zone("UTC") for c in ("admission_dttm", "discharge_dttm")}
    stays = stays.with_columns(**utc)
    patient = stays.select("patient_id").unique()
    for name, col in (
        ("GENDER", "sex_category"),
        ("RACE", "race_category"),
        ("ETHNICITY", "ethnicity_category"),
    ):
        static = of(name).select("patient_id", pl.col("category").alias(col)).unique("patient_id")
        patient = patient.join(static, on="patient_id", how="left")
    for code, col in ((meds.birth_code, "birth_date"), (meds.death_code, "death_dttm")):
        when = of(code).group_by("patient_id").agg(pl.col("time").min().alias(col))
        patient = patient.join(when, on="patient_id", how="left")
    patient = patient.with_columns(pl.col("birth_date").dt.date()).sort("patient_id")
    age = of("AGE").select(STAY, pl.col("value").alias("age")).unique(STAY)
    hosp = (
        stays.join(age, on=STAY, how="left")
        .join(patient.select("patient_id", "birth_date", "death_dttm"), on="patient_id", how="left")
        .with_columns(
            pl.coalesce(
                "age",
                (pl.col("admission_dttm").dt.date() - pl.col("birth_date")).dt.total_days()
                / 365.25,
            ).alias("age_at_admission"),
            pl.when(
                pl.col("discharge_category").is_null()
                & pl.col("death_dttm").is_between("admission_dttm", "discharge_dttm")
            )
            .then(pl.lit("Expired"))
            .otherwise("discharge_category")
            .alias("discharge_category"),
        )
        .drop("age", "birth_date", "death_dttm")
    )
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


def write_clif(data: MedsData, out: str | Path) -> Path:
    """The CLIF tables of a MEDS dataset as `clif_<table>.parquet` files in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, df in clif_tables(data).items():
        df.write_parquet(out / f"clif_{name}.parquet")
    return out
