"""A MEDS dataset standing in for a CLIF site: its events mapped back to CLIF tables,
which then pass the same checks, statistics and tokenizer as any site.

Codes are read through the namespaces `fedclif export meds` writes (`VITAL//heart_rate`,
`LAB//sodium//mmol/L`: namespace, CLIF category, unit); the site's own codes reach them
through its code map (shared/meds/codemap.py). A category outside CLIF's permissible
values becomes the table's unknown token downstream, as in CLIF; codes of other
namespaces are left out; both are counted per namespace in the validation report.
Stays: the column `site.meds.stay_column` names (else `hospitalization_id` where present),
each stay's window from its admission and discharge codes (else its first and last
event); without a stay column, the admission and discharge codes open and close the
stays. Everything the dataset lacks is listed at once, in MEDS terms, before anything
else runs (`MedsError`). `numeric_value` is the value (absent: every value null); fedclif's
own export keeps the float64 reading beside it (`value_float64`), used only where it
agrees with `numeric_value`, so another tool's edits win; other values are rounded to 7
significant digits (a reading recorded as 36.7 then equals a cut at 36.7 again).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from flexible_schema.exceptions import SchemaValidationError, TableValidationError
from omegaconf import DictConfig

from fedclif.shared.clif.schema import RESP_SETTINGS
from fedclif.shared.errors import FedclifError
from fedclif.shared.meds.codemap import TARGETS, apply_code_map, load_code_map, permissible

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
ADMISSION, DISCHARGE = "HOSPITAL_ADMISSION", "HOSPITAL_DISCHARGE"
STAY = "hospitalization_id"
# The reading as float64, beside MEDS's float32 `numeric_value` (written by fedclif).
EXACT = "value_float64"
# Codes read whole (no category): age at admission (fedclif's export), birth and death.
WHOLE = ("AGE", meds.birth_code, meds.death_code)
# Namespaces about the patient, not one stay: read outside any stay's window too.
PATIENT_LEVEL = ("GENDER", "RACE", "ETHNICITY", "CODE_STATUS", *WHOLE)
# The CLIF tables a site needs besides its patients and stays, and the codes that make each.
REQUIRED = {
    "adt": "ADT//<location_category> (e.g. ADT//icu)",
    "vitals": "VITAL//<vital_category> (e.g. VITAL//heart_rate)",
    "labs": "LAB//<lab_category>[//<unit>] (e.g. LAB//sodium//mmol/L)",
}
IN_STAY = pl.col(STAY).is_not_null()
# Namespace -> the CLIF column its categories are values of (the unknown-category count).
CATEGORY_OF = {space: (table, column) for space, table, column in TARGETS.values()}


class MedsError(FedclifError):
    """Everything a MEDS dataset lacks to be read as a site, each in MEDS terms (and its
    rows per namespace, where its events could be read)."""

    def __init__(self, root: Path, problems: list[str], counts: dict | None = None):
        self.problems, self.counts = problems, counts or {}
        super().__init__(
            f"{root}: not readable as a site ({len(problems)} problem(s)):\n  - "
            + "\n  - ".join(problems)
        )


@dataclass
class MedsData:
    """A MEDS dataset's events as fedclif reads them, its stays, and per namespace how
    many rows were read, mapped (the site's code map), read with an unknown category,
    and dropped (no namespace fedclif reads, a `drop` rule, or outside every stay)."""

    events: pl.DataFrame
    stays: pl.DataFrame
    counts: dict[str, dict[str, int]]


def is_meds(path: str | Path) -> bool:
    """A MEDS dataset: a `data/` folder and no CLIF table files."""
    path = Path(path)
    return (path / meds.data_subdirectory).is_dir() and not any(path.glob("clif_*.parquet"))


def read_events(root: str | Path) -> pl.DataFrame:
    """Every event of the dataset, checked (metadata, the MEDS data schema, each subject's
    rows together and in time order): raises `MedsError` listing every problem found."""
    root, problems = Path(root), []
    events = _events(root, problems)
    if problems:
        raise MedsError(root, problems)
    return events


def read_meds(root: str | Path, cfg: DictConfig) -> MedsData:
    """The dataset at `root` read as a site under `cfg` (`site.meds`): its events with
    their stays, checked up front; raises `MedsError` listing every problem at once."""
    root, problems = Path(root), []
    events = _events(root, problems)
    if events is None:
        raise MedsError(root, problems)
    events, stays = _stays(_values(_mapped(events, cfg)), cfg, problems)
    ev = _namespaced(events)
    counts = _counts(ev)
    for table, codes in REQUIRED.items():
        space = codes.split("//")[0]
        # Without stays (told above) an event anywhere counts: every lack at once.
        where = IN_STAY if stays.height else pl.lit(True)
        if not ev.filter(where & (pl.col("space") == space)).height:
            problems.append(
                f"no events for CLIF table {table}: codes {codes} within a stay, or the "
                f"dataset's own codes mapped to table {table} in site.meds.code_map"
            )
    if problems:
        unread = _unread(ev)
        if unread:
            problems.append(
                "codes fedclif does not read (map them in site.meds.code_map; `fedclif "
                f"site meds-codes {root}` lists every code): {unread}"
            )
        raise MedsError(root, problems, counts)
    return MedsData(ev.filter(_kept()), stays, counts)


def survey(root: str | Path, cfg: DictConfig) -> pl.DataFrame:
    """Every code of the dataset (`code`, its namespace `ns`, `rows`) and what fedclif
    makes of it under `cfg` (`site.meds`): `status` read, map (by the site's code map),
    unknown (a category outside CLIF's values: the table's unknown token) or drop; and
    the code it is read as (`becomes`)."""
    ev = _namespaced(_marked(_mapped(read_events(root), cfg), cfg))
    status = (
        pl.when(pl.col("space").is_null() | (pl.col("mapped") == False))  # noqa: E712
        .then(pl.lit("drop"))
        .when(~_known())
        .then(pl.lit("unknown"))
        .when(pl.col("mapped").fill_null(False))
        .then(pl.lit("map"))
        .otherwise(pl.lit("read"))
    )
    return (
        ev.with_columns(status.alias("status"))
        .group_by("source_code")
        .agg(
            pl.len().alias("rows"),
            pl.col("code").first().alias("becomes"),
            pl.col("status").first(),
        )
        .select(
            _namespace(pl.col("source_code")).alias("ns"),
            pl.col("source_code").alias("code"),
            "rows",
            "status",
            pl.when(pl.col("status") == "drop").then(None).otherwise("becomes").alias("becomes"),
        )
        .sort("ns", "rows", "code", descending=[False, True, False])
    )


def _namespace(code: pl.Expr) -> pl.Expr:
    """A code's namespace: its first `//` part (the code itself without one)."""
    return code.str.splitn("//", 2).struct.field("field_0")


def _mapped(events: pl.DataFrame, cfg: DictConfig) -> pl.DataFrame:
    """`events` through the site's code map (`source_code`: the dataset's own code;
    `mapped`: rewritten, dropped by a rule, or null: no rule)."""
    if cfg.code_map:
        return apply_code_map(events, load_code_map(cfg.code_map))
    return events.with_columns(
        pl.col("code").alias("source_code"), pl.lit(None, pl.Boolean).alias("mapped")
    )


def _events(root: Path, problems: list[str]) -> pl.DataFrame | None:
    """The shards' rows (None when none could be read), problems appended."""
    for f in (meds.dataset_metadata_filepath, meds.code_metadata_filepath):
        if not (root / f).is_file():
            problems.append(
                f"{root / f}: missing; a MEDS dataset holds metadata/dataset.json and "
                "metadata/codes.parquet beside data/"
            )
    if (root / meds.dataset_metadata_filepath).is_file():
        try:
            json.loads((root / meds.dataset_metadata_filepath).read_text())
        except ValueError as e:
            problems.append(f"{root / meds.dataset_metadata_filepath}: not JSON ({e})")
    shards = sorted((root / meds.data_subdirectory).rglob("*.parquet"))
    if not shards:
        problems.append(f"{root / meds.data_subdirectory}: no parquet shards")
    frames = [df for f in shards if (df := _shard(f, problems)) is not None]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def _shard(f: Path, problems: list[str]) -> pl.DataFrame | None:
    """One data shard, aligned to the MEDS data schema and checked for order."""
    want = "subject_id int64, time timestamp[us], code string, numeric_value float32"
    table = pq.read_table(f)
    missing = [c for c in ("subject_id", "time", "code") if c not in table.column_names]
    if missing:
        problems.append(
            f"{f}: no column {', '.join(map(repr, missing))} (the MEDS data schema: {want})"
        )
        return None
    if "numeric_value" not in table.column_names:  # optional in MEDS 0.4: no values
        table = table.append_column("numeric_value", pa.nulls(table.num_rows, pa.float32()))
    try:  # align: safe casts (large strings, as polars writes them) pass
        table = meds.DataSchema.align(table)
    except (SchemaValidationError, TableValidationError) as e:
        problems.append(f"{f}: {e} (the MEDS data schema: {want})")
        return None
    df = pl.from_arrow(table).with_row_index("__row")
    same = pl.col("subject_id") == pl.col("subject_id").shift()
    # MEDS keeps each subject's rows together (any subject order) in time order.
    starts = df.filter(~same.fill_null(False))
    if starts.height != df.get_column("subject_id").n_unique():
        again = pl.col("subject_id").is_duplicated() & ~pl.col("subject_id").is_first_distinct()
        bad = starts.filter(again).row(0, named=True)
        problems.append(
            f"{f}: subject {bad['subject_id']} has rows apart (again at row {bad['__row']}); "
            "MEDS keeps each subject's rows together"
        )
        return None
    back = df.filter(same & (pl.col("time") < pl.col("time").shift()))
    if back.height:
        bad = back.row(0, named=True)
        problems.append(
            f"{f}: column 'time' out of order at row {bad['__row']} (subject "
            f"{bad['subject_id']}); MEDS sorts each subject's rows by time"
        )
        return None
    return df.drop("__row")


def _values(events: pl.DataFrame) -> pl.DataFrame:
    """One float64 `value`: `numeric_value`, or fedclif's exact reading where it agrees."""
    f32 = pl.col("numeric_value").cast(pl.Float64).round_sig_figs(7)
    if EXACT not in events.columns:
        return events.with_columns(f32.alias("value"))
    agrees = pl.col(EXACT).cast(pl.Float32) == pl.col("numeric_value")
    return events.with_columns(pl.when(agrees).then(pl.col(EXACT)).otherwise(f32).alias("value"))


def _marked(events: pl.DataFrame, cfg: DictConfig) -> pl.DataFrame:
    """Admission and discharge codes (`site.meds.*_codes`, and fedclif's own) rewritten to
    fedclif's namespaces, marked in `kind`."""
    out = events.with_columns(pl.lit(None, pl.String).alias("kind"))
    for kind, space, prefixes in (
        ("admission", ADMISSION, cfg.admission_codes),
        ("discharge", DISCHARGE, cfg.discharge_codes),
    ):
        for p in dict.fromkeys([space, *[str(x).rstrip("/") for x in prefixes]]):
            hit = (pl.col("code") == p) | pl.col("code").str.starts_with(p + "//")
            rest = pl.col("code").str.slice(len(p) + 2)
            out = out.with_columns(
                pl.when(hit & pl.col("kind").is_null())
                .then(pl.lit(space + "//") + rest)
                .otherwise("code")
                .alias("code"),
                pl.when(hit & pl.col("kind").is_null())
                .then(pl.lit(kind))
                .otherwise("kind")
                .alias("kind"),
            )
    return out


def _stays(
    events: pl.DataFrame, cfg: DictConfig, problems: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each event's stay (`hospitalization_id`) and the stays: (hospitalization_id,
    patient_id, admission_dttm, admission_type_category, discharge_dttm,
    discharge_category)."""
    ev = _marked(events, cfg).with_columns(pl.col("subject_id").cast(pl.String).alias("patient_id"))
    column = cfg.stay_column or (STAY if STAY in ev.columns else None)
    if column and column not in ev.columns:
        problems.append(
            f"no column {column!r} (site.meds.stay_column) in the data shards; their "
            f"columns: {', '.join(c for c in events.columns if c not in ('source_code', 'mapped'))}"
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
    stays = timed.group_by(STAY).agg(
        pl.col("patient_id").first(),
        pl.col("patient_id").n_unique().alias("subjects"),
        pl.col("time").filter(pl.col("kind") == "admission").min().alias("admitted"),
        pl.col("time").filter(pl.col("kind") == "discharge").max().alias("discharged"),
        pl.col("time").min().alias("first"),
        pl.col("time").max().alias("last"),
        cat.filter(pl.col("kind") == "admission").first().alias("admission_type_category"),
        cat.filter(pl.col("kind") == "discharge").last().alias("discharge_category"),
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


def _kept() -> pl.Expr:
    """Rows read: a namespace fedclif reads, not dropped by the map, in a stay unless
    about the patient."""
    return (
        pl.col("space").is_not_null()
        & (pl.col("mapped") != False)  # noqa: E712 (null: no rule)
        .fill_null(True)
        & (IN_STAY | pl.col("space").is_in(PATIENT_LEVEL) | pl.col("time").is_null())
    )


def _known() -> pl.Expr:
    """A category CLIF permits for its namespace's column (namespaces without one: any)."""
    known = pl.lit(True)
    name = pl.col("category").str.splitn("=", 2).struct.field("field_0")  # assessments: q=a
    for space, (table, column) in CATEGORY_OF.items():
        values = list(permissible(table, column) or ())
        known = pl.when(pl.col("space") == space).then(name.is_in(values)).otherwise(known)
    return known.fill_null(False)


def _counts(ev: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Rows per namespace of the dataset's own codes: read, mapped, unknown (read, with a
    category outside CLIF's values), dropped."""
    status = (
        pl.when(~_kept())
        .then(pl.lit("dropped"))
        .when(~_known())
        .then(pl.lit("unknown"))
        .when(pl.col("mapped").fill_null(False))
        .then(pl.lit("mapped"))
        .otherwise(pl.lit("read"))
    )
    tally = ev.select(_namespace(pl.col("source_code")).alias("ns"), status.alias("s"))
    counts: dict[str, dict[str, int]] = {}
    for ns, s, n in tally.group_by("ns", "s").len().sort("ns", "s").iter_rows():
        c = counts.setdefault(ns, {"rows": 0, "read": 0, "mapped": 0, "unknown": 0, "dropped": 0})
        c[s] += n
        c["rows"] += n
    return counts


def _unread(ev: pl.DataFrame, top: int = 8) -> str:
    """The most frequent codes not read, with their rows."""
    rows = (
        ev.filter(~_kept())
        .group_by("source_code")
        .len()
        .sort("len", "source_code", descending=[True, False])
    )
    text = ", ".join(f"{c} ({n:,} rows)" for c, n in rows.head(top).iter_rows())
    return text + (f" and {rows.height - top:,} more" if rows.height > top else "")


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


def _namespaced(events: pl.DataFrame) -> pl.DataFrame:
    """MEDS events with each code split into its namespace (`space`, null: one fedclif
    does not read), `category` and `unit`."""
    # One when/then chain, longest namespace first: the first that matches wins.
    names = [name for _, name in NAMESPACES] + ["DIAGNOSIS"]  # diagnoses: exported, read
    ordered = sorted(names, key=lambda x: -len(x))
    space = pl.when(pl.col("code").is_in(list(WHOLE))).then(pl.col("code"))
    for name in ordered:
        space = space.when(pl.col("code").str.starts_with(name + "//")).then(pl.lit(name))
    ev = events.with_columns(space.otherwise(None).alias("space"))
    parts = pl.col("code").str.slice(pl.col("space").str.len_chars() + 2).str.splitn("//", 2)
    return ev.with_columns(
        parts.struct.field("field_0").alias("category"), parts.struct.field("field_1").alias("unit")
    )


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
