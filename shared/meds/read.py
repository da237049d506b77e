"""A MEDS dataset standing in for a CLIF site: its events read, checked and mapped to
fedclif's codes (shared/meds/tables.py then makes them CLIF tables, which pass the same
checks, statistics and tokenizer as any site).

Codes are read through the namespaces `fedclif export meds` writes (`VITAL//heart_rate`,
`LAB//sodium//mmol/L`: namespace, CLIF category, unit); the site's own codes reach them
through its code map (shared/meds/codemap.py). A category outside CLIF's permissible
values becomes the table's unknown token downstream, as in CLIF; codes of other
namespaces are left out; both are counted per namespace in the validation report. Stays:
shared/meds/stays.py. Everything the dataset lacks is listed at once, in MEDS terms,
before anything else runs (`MedsError`). `numeric_value` is the value (absent: every
value null); fedclif's own export keeps the float64 reading beside it (`value_float64`),
used only where it agrees with `numeric_value`, so another tool's edits win; other values
are rounded to 7 significant digits (a reading recorded as 36.7 then equals a cut at 36.7
again).
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

from fedclif.shared.errors import FedclifError
from fedclif.shared.meds.codemap import TARGETS, apply_code_map, load_code_map, permissible
from fedclif.shared.meds.stays import STAY, mark_admissions, meds_stays

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
# What becomes of a row of the dataset (`_status`), in the order reports show them.
STATUSES = ("read", "mapped", "unknown", "dropped")
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
    events, stays = meds_stays(_values(_mapped(events, cfg)), events.columns, cfg, problems)
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
    makes of the code under `cfg` (`site.meds`): `status` (`_status`: read, mapped,
    unknown or dropped) and the code it is read as (`becomes`)."""
    ev = _namespaced(mark_admissions(_mapped(read_events(root), cfg), cfg))
    return (
        ev.with_columns(_status(_read_code()).alias("status"))
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
            pl.when(pl.col("status") == "dropped").then(None).otherwise("becomes").alias("becomes"),
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


def _read_code() -> pl.Expr:
    """A code fedclif reads: a namespace it knows, not dropped by the site's map."""
    return pl.col("space").is_not_null() & (pl.col("mapped") != False).fill_null(True)  # noqa: E712


def _kept() -> pl.Expr:
    """Rows read: a code fedclif reads, in a stay unless about the patient."""
    return _read_code() & (
        IN_STAY | pl.col("space").is_in(PATIENT_LEVEL) | pl.col("time").is_null()
    )


def _status(read: pl.Expr) -> pl.Expr:
    """What became of a row: dropped (not `read`), unknown (a category outside CLIF's
    values: its table's unknown token), mapped (by the site's code map), or read."""
    return (
        pl.when(~read)
        .then(pl.lit("dropped"))
        .when(~_known())
        .then(pl.lit("unknown"))
        .when(pl.col("mapped").fill_null(False))
        .then(pl.lit("mapped"))
        .otherwise(pl.lit("read"))
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
    """Rows per namespace of the dataset's own codes by `_status` (a row outside every
    stay is dropped too)."""
    # Statuses of distinct (code, mapping, kept) groups, not of every row: a dataset has
    # millions of rows and a few thousand such groups.
    groups = ev.group_by("source_code", "space", "category", "mapped", _kept().alias("kept"))
    tally = groups.len().select(
        _namespace(pl.col("source_code")).alias("ns"), _status(pl.col("kept")).alias("s"), "len"
    )
    counts: dict[str, dict[str, int]] = {}
    for ns, s, n in tally.group_by("ns", "s").agg(pl.sum("len")).sort("ns", "s").iter_rows():
        c = counts.setdefault(ns, dict.fromkeys(("rows", *STATUSES), 0))
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


def _namespaced(events: pl.DataFrame) -> pl.DataFrame:
    """MEDS events with each code split into its namespace (`space`, null: one fedclif
    does not read), `category` and `unit`."""
    # One when/then chain, longest namespace first: the first that matches wins. Split
    # once per distinct code and joined back (string matching on every row cost 4x more).
    names = [name for _, name in NAMESPACES] + ["DIAGNOSIS"]  # diagnoses: exported, read
    ordered = sorted(names, key=lambda x: -len(x))
    space = pl.when(pl.col("code").is_in(list(WHOLE))).then(pl.col("code"))
    for name in ordered:
        space = space.when(pl.col("code").str.starts_with(name + "//")).then(pl.lit(name))
    codes = events.select(pl.col("code").unique()).with_columns(
        space.otherwise(None).alias("space")
    )
    parts = pl.col("code").str.slice(pl.col("space").str.len_chars() + 2).str.splitn("//", 2)
    codes = codes.with_columns(
        parts.struct.field("field_0").alias("category"), parts.struct.field("field_1").alias("unit")
    )
    return events.join(codes, on="code", how="left", nulls_equal=True, maintain_order="left")
