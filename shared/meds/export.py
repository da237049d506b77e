"""A CLIF site as a MEDS dataset (the Medical Event Data Standard every neighbouring EHR
foundation-model codebase reads), and our tasks as MEDS labels.

The events are the ones fedclif itself encodes (shared/tokens/events.py `stay_events`: the
tokenizable stays, their window, state changes only), so a MEDS export and the timelines
describe the same data. Codes are hierarchical (`VITAL//heart_rate`,
`LAB//sodium//mmol/L`, `ADT//icu`, `MED_CONT//norepinephrine//mcg/kg/min`): the namespace,
the CLIF category, and the site's most common unit where CLIF records one. Sex, race and
ethnicity are static (no time); admission type and age at admission are events at
admission, the discharge category at discharge with the length of stay in days as its
value (`HOSPITAL_DISCHARGE//Missing` where the site does not know how the stay ended:
the outcome is unknown), diagnoses
(`DIAGNOSIS//ICD10CM//I50.9`) at discharge, when they are coded; `MEDS_BIRTH` at the
birth date where known, and one `MEDS_DEATH` a patient at `death_dttm` (else at the
discharge of a stay that ended Expired). Each event row carries
its `hospitalization_id` and, as `value_float64`, the reading before MEDS's float32 (extra
columns MEDS allows: fedclif reads its own export back exactly). Written by table of stays: one
data shard per chunk of patients, so memory follows `site.chunk_stays`.

Written by hand: `meds` defines the schemas (used here to validate every file), and the
MEDS ETLs that exist (MIMIC, eICU, the CLIF consortium's FLAIR) read raw hospital tables,
not a cleaned CLIF site with fedclif's event rules.
"""

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from fedclif.shared.clif.site import Site
from fedclif.shared.errors import FedclifError
from fedclif.shared.meds.read import EXACT, NAMESPACES
from fedclif.shared.tokens.events import stay_events, stays
from fedclif.shared.tokens.labels import TASKS, outcome_labels, usable
from fedclif.shared.tokens.splits import assign_splits

STATIC = ("SEX", "RACE", "ETH")
# Units appended to a namespace's codes: (table, category column, unit column).
UNITS = {
    "LAB": ("labs", "lab_category", "reference_unit"),
    "MED_CONT": ("medication_admin_continuous", "med_category", "med_dose_unit"),
}
SPLITS = {"train": meds.train_split, "val": meds.tuning_split, "test": meds.held_out_split}


def meds_code(code: pl.Expr) -> pl.Expr:
    """fedclif event codes (`VTL_heart_rate`) as MEDS codes (`VITAL//heart_rate`)."""
    out = pl.when(code == "AGE").then(pl.lit("AGE"))
    for prefix, space in NAMESPACES:  # longest fedclif prefix first: the first match wins
        out = out.when(code.str.starts_with(prefix + "_")).then(
            pl.lit(space + "//") + code.str.slice(len(prefix) + 1)
        )
    return out.otherwise(code)


def subject_ids(patient_id: pl.Series) -> pl.Series:
    """MEDS subject ids (int64) of CLIF patient ids: the number itself when every id is
    one, else a stable 63-bit hash (sha256) of the id."""
    if patient_id.str.contains(r"^\d{1,18}$").all():
        return patient_id.cast(pl.Int64)
    return patient_id.map_elements(
        lambda p: int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") >> 1,
        return_dtype=pl.Int64,
    )


def _units(site: Site) -> pl.DataFrame:
    """(namespace, category, unit): each category's most common unit at the site."""
    parts = []
    for space, (table, cat, unit) in UNITS.items():
        if site.has(table) and unit in site.tables[table].columns:
            parts.append(
                site.tables[table]
                .drop_nulls([cat, unit])
                .group_by(cat, unit)
                .len()
                .sort("len", cat, unit, descending=[True, False, False])
                .unique(cat, keep="first", maintain_order=True)
                .select(
                    pl.lit(space).alias("space"),
                    pl.col(cat).alias("category"),
                    pl.col(unit).alias("unit"),
                )
            )
    schema = {"space": pl.String, "category": pl.String, "unit": pl.String}
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def _patient_chunks(st: pl.DataFrame, size: int) -> Iterator[pl.DataFrame]:
    """The stays, by patient, about `size` at a time, a patient never split (a MEDS
    subject lives in one shard)."""
    st = st.sort("patient_id", "admission_dttm", "hospitalization_id")
    first = st.get_column("patient_id") != st.get_column("patient_id").shift()
    start = 0
    for cut in st.with_row_index().filter(first.fill_null(True)).get_column("index").to_list():
        if cut - start >= size:
            yield st.slice(start, cut - start)
            start = cut
    if start < st.height:
        yield st.slice(start)


def shard(site: Site, part: pl.DataFrame, units: pl.DataFrame) -> pa.Table:
    """The MEDS rows of the stays in `part` (stays(site) rows of whole patients), sorted by
    subject and time, validated by `meds.DataSchema`."""
    sub = site.restrict(part)
    ev = stay_events(sub, part).collect()
    ev = ev.join(
        part.select(
            "stay",
            "hospitalization_id",
            "patient_id",
            "admission_dttm",
            "discharge_dttm",
            "discharge_category",
        ),
        on="stay",
    )
    when = pl.col("admission_dttm") + pl.duration(microseconds=(pl.col("hours") * 3.6e9).round())
    static = pl.col("code").str.split("_").list.first().is_in(list(STATIC))
    # A stay whose outcome the site does not know says so in CLIF's own word (the token
    # stream's DSCG_UNK would read back as a known discharge).
    unknown = (pl.col("code") == "DSCG_UNK") & pl.col("discharge_category").is_null()
    # The discharge carries the length of stay in days (what a MEDS task reads as "a long
    # stay": shared/meds/aces.py), a value no model reads before the discharge.
    days = (pl.col("discharge_dttm") - pl.col("admission_dttm")).dt.total_microseconds() / 8.64e10
    rows = ev.with_columns(
        pl.when(pl.col("code").str.starts_with("DSCG_"))
        .then(days)
        .otherwise("value")
        .alias("value"),
        pl.when(static).then(None).otherwise(when).alias("time"),
        pl.when(static).then(None).otherwise(pl.col("hospitalization_id")).alias("hosp"),
        meds_code(pl.when(unknown).then(pl.lit("DSCG_Missing")).otherwise("code")).alias(
            "meds_code"
        ),
    )
    # Units: `LAB//sodium` -> `LAB//sodium//mmol/L` where the site records one.
    parts = rows.get_column("meds_code").str.splitn("//", 2).struct.unnest()
    rows = (
        rows.with_columns(
            parts.get_column("field_0").alias("space"),
            parts.get_column("field_1").alias("category"),
        )
        .join(units, on=["space", "category"], how="left")
        .with_columns(
            pl.when(pl.col("unit").is_not_null())
            .then(pl.col("meds_code") + "//" + pl.col("unit"))
            .otherwise(pl.col("meds_code"))
            .alias("meds_code")
        )
    )
    rows = rows.select(
        "patient_id",
        "time",
        pl.col("meds_code").alias("code"),
        pl.col("value").cast(pl.Float32).alias("numeric_value"),
        pl.col("hosp").alias("hospitalization_id"),
        pl.col("value").alias(EXACT),
        "prio",
    )
    data = pl.concat(
        [
            rows.filter(pl.col("time").is_not_null()),
            # A static code once per subject, not per stay.
            rows.filter(pl.col("time").is_null()).unique(maintain_order=True),
            _discharge_rows(sub, part),
        ],
        how="vertical_relaxed",
    )
    ids = data.get_column("patient_id").unique()
    lookup = pl.DataFrame({"patient_id": ids, "subject_id": subject_ids(ids)})
    data = (
        data.join(lookup, on="patient_id")
        .sort("subject_id", "time", "prio", "code", nulls_last=False)
        .select(
            "subject_id",
            pl.col("time").dt.replace_time_zone(None).dt.cast_time_unit("us"),
            "code",
            "numeric_value",
            "hospitalization_id",
            EXACT,
        )
    )
    return meds.DataSchema.align(data.to_arrow())


def _life_rows(site: Site, part: pl.DataFrame) -> pl.DataFrame:
    """`MEDS_BIRTH` at the birth date where the site knows it, and one `MEDS_DEATH` a
    patient: at `death_dttm`, else at the discharge of a stay that ended Expired."""
    ids = part.select("patient_id").unique()
    utc = pl.Datetime("us", "UTC")
    patient = site.tables["patient"].join(ids, on="patient_id")
    patient = patient.with_columns(  # optional in a site's export: unknown where absent
        (pl.col(c) if c in patient.columns else pl.lit(None)).cast(utc).alias(c)
        for c in ("birth_date", "death_dttm")
    )
    expired = (
        part.filter(pl.col("discharge_category") == "Expired")
        .group_by("patient_id")
        .agg(pl.col("discharge_dttm").max().alias("expired"))
    )
    death = (
        ids.join(patient.select("patient_id", "death_dttm"), on="patient_id", how="left")
        .join(expired, on="patient_id", how="left")
        .select("patient_id", pl.coalesce("death_dttm", "expired").alias("time"))
        .with_columns(pl.lit(meds.death_code).alias("code"))
    )
    born = patient.select("patient_id", pl.col("birth_date").alias("time")).with_columns(
        pl.lit(meds.birth_code).alias("code")
    )
    return (
        pl.concat([born, death])
        .drop_nulls("time")
        .with_columns(
            pl.col("time").cast(utc),
            pl.lit(None, pl.Float32).alias("numeric_value"),
            pl.lit(None, pl.String).alias("hospitalization_id"),
            pl.lit(None, pl.Float64).alias(EXACT),
            pl.lit(99, pl.Int8).alias("prio"),
        )
        .select("patient_id", "time", "code", "numeric_value", "hospitalization_id", EXACT, "prio")
    )


def _discharge_rows(site: Site, part: pl.DataFrame) -> pl.DataFrame:
    """Coded diagnoses at discharge, and each patient's birth and death."""
    parts = [_life_rows(site, part)]
    if site.has("hospital_diagnosis"):
        dx = site.tables["hospital_diagnosis"]
        fmt = pl.col("diagnosis_code_format") if "diagnosis_code_format" in dx.columns else None
        parts.append(
            dx.join(
                part.select("hospitalization_id", "patient_id", "discharge_dttm"),
                on="hospitalization_id",
            )
            .drop_nulls("diagnosis_code")
            .select(
                "patient_id",
                pl.col("discharge_dttm").alias("time"),
                (
                    pl.lit("DIAGNOSIS//")
                    + (fmt.fill_null("UNKNOWN") if fmt is not None else pl.lit("UNKNOWN"))
                    + "//"
                    + pl.col("diagnosis_code")
                ).alias("code"),
                pl.lit(None, pl.Float32).alias("numeric_value"),
                "hospitalization_id",
                pl.lit(None, pl.Float64).alias(EXACT),
                pl.lit(99, pl.Int8).alias("prio"),
            )
            .unique(maintain_order=True)
        )
    return pl.concat(parts)


def export_meds(
    site: Site,
    out: str | Path,
    split: DictConfig,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict:
    """Write `out/data/<i>.parquet`, `out/metadata/{codes.parquet,dataset.json,
    subject_splits.parquet}`; fedclif's patient splits become train/tuning/held_out.
    Returns counts (rows per MEDS namespace, subjects, shards)."""
    out = Path(out)
    (out / meds.data_subdirectory).mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    # Every stay, short ones too (MEDS is not fedclif's input window; a readmission after a
    # short stay stays visible to whoever reads the export).
    st, units = stays(site, min_hours=0.0), _units(site)
    counts: dict[str, int] = {}
    codes, subjects, done, n = set(), [], 0, 0
    for n, part in enumerate(_patient_chunks(st, int(site.cfg.chunk_stays))):
        table = shard(site, part, units)
        pq.write_table(table, out / meds.data_subdirectory / f"{n}.parquet")
        frame = pl.from_arrow(table)
        space = frame.get_column("code").str.split("//").list.first()
        for k, v in space.value_counts().iter_rows():
            counts[k] = counts.get(k, 0) + v
        codes |= set(frame.get_column("code").unique().to_list())
        ids = part.get_column("patient_id").unique(maintain_order=True)
        subjects.append(pl.DataFrame({"patient_id": ids, "subject_id": subject_ids(ids)}))
        done += part.height
        if on_chunk:
            on_chunk(done, st.height)
    _write_metadata(site, out, sorted(codes), subjects, split)
    return {
        "rows": counts,
        "subjects": sum(s.height for s in subjects),
        "shards": n + 1,
        "stays": st.height,
    }


def _write_metadata(site: Site, out: Path, codes: list[str], subjects: list, split) -> None:
    parents = [c.split("//")[0] for c in codes]
    table = pl.DataFrame(
        {
            "code": codes,
            "description": [f"CLIF {c.replace('//', ': ', 1).replace('//', ', ')}" for c in codes],
            "parent_codes": [[p] if p != c else None for p, c in zip(parents, codes, strict=True)],
        },
        schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)},
    )
    pq.write_table(
        meds.CodeMetadataSchema.align(table.to_arrow()), out / meds.code_metadata_filepath
    )
    sub = (
        pl.concat(subjects)
        if subjects
        else pl.DataFrame(schema={"patient_id": pl.String, "subject_id": pl.Int64})
    )
    names = assign_splits(sub.get_column("patient_id").to_numpy(), split)
    splits = sub.select("subject_id").with_columns(
        pl.Series("split", [SPLITS.get(x, x) for x in names], pl.String)
    )
    pq.write_table(
        meds.SubjectSplitSchema.align(splits.to_arrow()), out / meds.subject_splits_filepath
    )
    dataset = {
        "dataset_name": Path(site.path).name,
        "dataset_version": "",
        "etl_name": "fedclif",
        "etl_version": version("fedclif"),
        "meds_version": version("meds"),
        "created_at": datetime.now(UTC).isoformat(),
        "site_id_columns": [],
        "other_extension_columns": ["hospitalization_id", EXACT],
    }
    meds.DatasetMetadataSchema.validate(dataset)
    (out / meds.dataset_metadata_filepath).write_text(json.dumps(dataset, indent=1))


def export_labels(site: Site, out: str | Path, tasks: list[str]) -> dict[str, int]:
    """Our tasks in the MEDS label schema, one folder each (`<task>/0.parquet`, as MEDS
    tools read a task's labels): `subject_id`,
    `prediction_time` (admission + `site.input_hours`: a stay is its subject and that time;
    the label schema takes no extra column), `boolean_value`; stays a task cannot be
    evaluated on (unknown outcome, ICU or
    ventilation already in the input window) are left out, as in training."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = stays(site)
    labels = outcome_labels(site, st)
    base = st.select("hospitalization_id", "patient_id", "admission_dttm").join(
        labels, on="hospitalization_id", how="left", maintain_order="left"
    )
    ids = base.get_column("patient_id").unique()
    base = base.join(
        pl.DataFrame({"patient_id": ids, "subject_id": subject_ids(ids)}),
        on="patient_id",
        maintain_order="left",
    )
    cut = pl.duration(minutes=60 * float(site.cfg.input_hours))
    written = {}
    for task in tasks:
        if task not in TASKS:
            raise FedclifError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        label = TASKS[task]
        rows = (
            base.filter(pl.Series(usable(base, label)))
            .select(
                "subject_id",
                (pl.col("admission_dttm") + cut)
                .dt.replace_time_zone(None)
                .dt.cast_time_unit("us")
                .alias("prediction_time"),
                pl.col(label).cast(pl.Boolean).alias("boolean_value"),
            )
            .sort("subject_id", "prediction_time")
        )
        (out / task).mkdir(exist_ok=True)
        pq.write_table(meds.LabelSchema.align(rows.to_arrow()), out / task / "0.parquet")
        written[task] = rows.height
    return written
