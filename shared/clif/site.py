"""Read one site's CLIF directory, check it against the clifpy schemas, and clean it.

Checking and cleaning are one pass: every row a check flags is counted in the report
and then dropped or nulled in the same place, so the report always describes exactly
what downstream steps receive. Structural problems (a missing table or column, an
unreadable file, a wrong type, duplicate primary keys) are fatal; row-level ones are
warnings unless they hit more than `max_bad_fraction` of a table.
"""

import atexit
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl
from omegaconf import DictConfig

from fedclif.shared.clif.schema import (
    EVENT_CATEGORY,
    PRIMARY_KEYS,
    Column,
    TableSchema,
    load_schemas,
)
from fedclif.shared.clif.versions import (
    VOCABULARY_VERSION,
    normalize_category_value,
    site_version,
    to_vocabulary,
    vocabulary_terms,
)
from fedclif.shared.errors import FedclifError
from fedclif.shared.meds.read import MedsError, is_meds, read_meds
from fedclif.shared.meds.tables import write_clif

Severity = Literal["fatal", "warning"]

_INT_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
_FLOAT_TYPES = (pl.Float32, pl.Float64)


@dataclass
class Problem:
    severity: Severity
    table: str
    file: str
    column: str | None
    kind: str
    message: str
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class TableReport:
    table: str
    file: str
    present: bool = False
    rows: int = 0
    hospitalizations: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class SiteReport:
    path: str
    clif_version: str = VOCABULARY_VERSION
    tables: dict[str, TableReport] = field(default_factory=dict)
    usable_stays: int = 0
    # "meds": a MEDS dataset read as CLIF tables; its rows per namespace of its own codes
    # (read, mapped by the site's code map, read with an unknown category, dropped).
    source: Literal["clif", "meds"] = "clif"
    meds_codes: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def problems(self) -> list[Problem]:
        return [p for t in self.tables.values() for p in t.problems]

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "fatal"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "source": self.source,
            "clif_version": self.clif_version,
            "usable": not self.fatal,
            "usable_stays": self.usable_stays,
            "tables": {k: asdict(v) for k, v in self.tables.items()},
            **({"meds_codes": self.meds_codes} if self.source == "meds" else {}),
        }


@dataclass
class Site:
    """A site's cleaned tables (UTC timestamps, schema types) and how they were checked."""

    path: Path
    tables: dict[str, pl.DataFrame]
    report: SiteReport
    cfg: DictConfig

    def has(self, table: str) -> bool:
        return table in self.tables

    def restrict(self, stays: pl.DataFrame) -> "Site":
        """The same site holding only the rows of these stays (and their patients)."""
        hosp = stays.get_column("hospitalization_id").implode()
        pats = stays.get_column("patient_id").unique().implode()
        tables = {
            name: df.filter(pl.col("hospitalization_id").is_in(hosp))
            if "hospitalization_id" in df.columns
            else df.filter(pl.col("patient_id").is_in(pats))
            for name, df in self.tables.items()
        }
        return Site(self.path, tables, self.report, self.cfg)


class SiteInvalid(FedclifError):
    """The site has fatal problems; `report` says which."""

    def __init__(self, report: SiteReport):
        self.report = report
        first = report.fatal[0]
        more = (
            f" (and {len(report.fatal) - 1} more fatal problems)" if len(report.fatal) > 1 else ""
        )
        super().__init__(f"{first.file}: {first.message}{more}")


class _Checker:
    """Records problems for one table and applies the matching clean-up to its frame."""

    def __init__(
        self, schema: TableSchema, report: TableReport, cfg: DictConfig, version: str
    ) -> None:
        self.schema = schema
        self.version = version
        self.report = report
        self.cfg = cfg
        self.df: pl.DataFrame | None = None
        self.found: list[str] = []  # column names in the file

    def add(
        self,
        severity: Severity,
        column: str | None,
        kind: str,
        message: str,
        count: int = 0,
        examples: list[str] | None = None,
    ) -> None:
        self.report.problems.append(
            Problem(
                severity,
                self.schema.name,
                self.report.file,
                column,
                kind,
                message,
                count,
                examples or [],
            )
        )

    def _examples(self, rows: pl.DataFrame, columns: tuple[str, ...]) -> list[str]:
        key = next((c for c in ("hospitalization_id", "patient_id") if c in rows.columns), None)
        show = [c for c in columns if c and c != key and c in rows.columns]
        out = []
        for r in rows.head(int(self.cfg.examples)).iter_rows(named=True):
            parts = [f"{key}={r[key]}"] if key else []
            parts += [f"{c}={r[c]!r}" for c in show]
            out.append(" ".join(parts))
        return out

    def rows(
        self,
        mask: pl.Expr,
        column: str | None,
        kind: str,
        message: str,
        action: Literal["drop", "null", "keep"],
        context: tuple[str, ...] = (),
    ) -> int:
        """Flag rows matching `mask`; drop them, null `column` in them, or keep them.

        Examples show the row's id, `context` columns and `column`."""
        assert self.df is not None
        n = int(self.df.select(mask.sum()).item() or 0)
        if n == 0:
            return 0
        hit = self.df.filter(mask).head(int(self.cfg.examples))
        total = self.df.height
        severity: Severity = "warning"
        what = {"drop": "rows dropped", "null": "values treated as missing", "keep": "kept"}[action]
        msg = f"{message} ({n} of {total} rows; {what})"
        if n / total > float(self.cfg.max_bad_fraction):
            severity = "fatal"
            msg += (
                f"; more than {float(self.cfg.max_bad_fraction):.0%} of rows: is the export right?"
            )
        self.add(severity, column, kind, msg, n, self._examples(hit, (*context, column)))
        if action == "drop":
            self.df = self.df.filter(~mask)
        elif action == "null":
            self.df = self.df.with_columns(
                pl.when(mask).then(None).otherwise(pl.col(column)).alias(column)
            )
        return n


_TARGET = {
    "VARCHAR": pl.String,
    "INT": pl.Int64,
    "DOUBLE": pl.Float64,
    "FLOAT": pl.Float64,
    "DATETIME": pl.Datetime("us", "UTC"),
    "DATE": pl.Datetime("us", "UTC"),
}
_HINT = {
    "DATETIME": "a timestamp (with timezone)",
    "DATE": "a date or timestamp",
    "VARCHAR": "a string",
    "INT": "an integer",
    "DOUBLE": "a number",
    "FLOAT": "a number",
}


def _conversion(name: str, dt: pl.DataType, expected: str, tz: str) -> pl.Expr | None:
    """The cast that brings a column of type `dt` to its schema type; None if none does."""
    col = pl.col(name)
    if dt == pl.Null:
        return col.cast(_TARGET[expected])
    if expected == "VARCHAR":
        if dt == pl.String:
            return col
        if isinstance(dt, pl.Categorical | pl.Enum) or dt in _INT_TYPES:
            return col.cast(pl.String)
    elif expected in ("DATETIME", "DATE"):
        if isinstance(dt, pl.Datetime):
            if dt.time_zone is None:
                col = col.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
            return col.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        if dt == pl.Date:
            return col.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    elif expected == "INT":
        if dt in _INT_TYPES or dt == pl.Boolean:
            return col.cast(pl.Int64)
        if dt in _FLOAT_TYPES:
            return col.round(0).cast(pl.Int64, strict=False)
    elif expected in ("DOUBLE", "FLOAT") and (dt in _INT_TYPES or dt in _FLOAT_TYPES):
        return col.cast(pl.Float64)
    return None


def _read(path: Path, checker: _Checker) -> pl.DataFrame | None:
    """Check every schema column's type from the file's schema; read (and cast) only the
    columns fedclif reads, so validation costs little more than the read itself."""
    schema = checker.schema
    try:
        found = pl.read_parquet_schema(path)
    except Exception as e:  # polars raises several unrelated types for a bad file
        checker.add(
            "fatal",
            None,
            "unreadable",
            f"cannot read parquet file: {type(e).__name__}: {e}. Expected a parquet "
            "file written by pyarrow, pandas or polars.",
        )
        return None
    extra = [c for c in found if c not in schema.columns and not c.startswith("__index_level_")]
    if extra:
        checker.add(
            "warning",
            None,
            "extra-columns",
            f"columns not in CLIF {checker.version}, ignored: {', '.join(extra)}",
        )
    checker.found = list(found)
    casts = []
    for name, dt in found.items():
        col = schema.columns.get(name)
        if col is None:
            continue
        conv = _conversion(name, dt, col.dtype, str(checker.cfg.timezone))
        used = name in schema.used
        if conv is None:
            checker.add(
                "fatal" if used else "warning",
                name,
                "type",
                f"column {name!r} has type {dt}, expected {col.dtype} "
                f"({_HINT[col.dtype]})" + ("" if used else "; column ignored"),
            )
        elif name in schema.read:
            casts.append(conv)
            if isinstance(dt, pl.Datetime) and dt.time_zone is None:
                checker.add(
                    "warning",
                    name,
                    "timezone-naive",
                    f"timestamps have no timezone; read as {checker.cfg.timezone}",
                )
    try:
        return pl.read_parquet(path, columns=[c.meta.output_name() for c in casts]).with_columns(
            casts
        )
    except Exception as e:
        checker.add(
            "fatal", None, "unreadable", f"cannot read parquet data: {type(e).__name__}: {e}"
        )
        return None


def _normalise_categories(df: pl.DataFrame, col: Column, checker: _Checker) -> pl.DataFrame:
    """Map spelling variants (case, spaces, `&`, `/`: clifpy's category normaliser) onto
    permissible values; count what stays unknown."""
    allowed = col.permissible or ()
    values = df.get_column(col.name).drop_nulls().unique()
    unknown = values.filter(~values.is_in(list(allowed)))
    if unknown.is_empty():
        return df
    spelled = {normalize_category_value(a): a for a in allowed}
    fix = {
        v: spelled[k] for v in unknown.to_list() if (k := normalize_category_value(v)) in spelled
    }
    if fix:
        n = df.filter(pl.col(col.name).is_in(list(fix))).height
        checker.add(
            "warning",
            col.name,
            "category-spelling",
            f"{n} values match permissible values only in another spelling (case, "
            "spaces, punctuation); mapped",
            n,
            [f"{k!r} -> {v!r}" for k, v in list(fix.items())[: int(checker.cfg.examples)]],
        )
        df = df.with_columns(pl.col(col.name).replace(fix))
    rest = [v for v in unknown.to_list() if v not in fix]
    terms = vocabulary_terms(checker.schema.name, col.name) or frozenset()
    outcomes = (
        (
            "category-version",
            [v for v in rest if v in terms],
            f"not CLIF {checker.version} permissible values but terms of another CLIF version; "
            "kept as those terms",
        ),
        (
            "unknown-category",
            [v for v in rest if v not in terms],
            "not CLIF permissible values; they become the table's unknown token",
        ),
    )
    for kind, values, says in outcomes:
        if values:
            n = df.filter(pl.col(col.name).is_in(values)).height
            checker.add(
                "warning",
                col.name,
                kind,
                f"{n} values ({len(values)} distinct) are {says}",
                n,
                [repr(v) for v in sorted(values)[: int(checker.cfg.examples)]],
            )
    return df


def _check_table(
    path: Path, schema: TableSchema, report: TableReport, cfg: DictConfig, version: str
) -> pl.DataFrame | None:
    checker = _Checker(schema, report, cfg, version)
    file = path / schema.file_name
    if not file.exists():
        if schema.required:
            checker.add(
                "fatal",
                None,
                "missing-table",
                f"required table {schema.name!r} not found: expected file {file}",
            )
        return None
    report.present = True
    if not file.is_file():
        checker.add("fatal", None, "unreadable", f"{file} is not a regular file")
        return None
    df = _read(file, checker)
    if df is None:
        return None
    report.rows = df.height
    if df.height == 0:
        checker.add(
            "fatal" if schema.required else "warning",
            None,
            "empty",
            "table has no rows" + ("" if schema.required else "; table ignored"),
        )
        return None
    found = checker.found
    for c in schema.columns.values():
        if c.name in found or not (c.required or c.name in schema.used):
            continue
        if c.name in schema.used:
            checker.add(
                "fatal",
                c.name,
                "missing-column",
                f"column {c.name!r} ({c.dtype}) is missing; fedclif needs it. "
                f"Found columns: {', '.join(found)}",
            )
        else:
            checker.add(
                "warning",
                c.name,
                "missing-column",
                f"CLIF column {c.name!r} ({c.dtype}) is missing; fedclif does not need it",
            )
    if any(p.severity == "fatal" for p in report.problems):
        return None
    for col in schema.columns.values():
        if col.name in df.columns and col.permissible and col.dtype == "VARCHAR":
            df = _normalise_categories(df, col, checker)
    checker.df = df
    # A row without its key, time or event category says nothing; a patient without a
    # sex or race is still a patient, so demographics stay (as unknown tokens).
    for c in schema.used:
        if c.endswith(("_id", "_dttm")) or c == EVENT_CATEGORY.get(schema.name):
            checker.rows(pl.col(c).is_null(), c, "null", f"{c!r} is empty", "drop")
    for c, col in schema.columns.items():
        if col.dtype in ("DOUBLE", "FLOAT") and c in checker.df.columns:
            checker.rows(
                pl.col(c).is_nan() | pl.col(c).is_infinite(),
                c,
                "nan",
                f"{c!r} holds NaN or infinite values",
                "null",
            )
    return checker.df


def _check_ranges(checker: _Checker, category: str, value: str) -> None:
    """Values outside clifpy's plausible range per category are treated as missing."""
    ranges = checker.schema.ranges
    if not ranges:
        return
    # One hash join attaches the bounds; comparing columns is then cheap for every pass
    # `rows` makes (count, examples, nulling).
    bounds = pl.DataFrame(
        {
            category: list(ranges),
            "_lo": [r[0] for r in ranges.values()],
            "_hi": [r[1] for r in ranges.values()],
        }
    )
    assert checker.df is not None
    checker.df = checker.df.join(bounds, on=category, how="left", maintain_order="left")
    checker.rows(
        (pl.col(value) < pl.col("_lo")) | (pl.col(value) > pl.col("_hi")),
        value,
        "out-of-range",
        f"{value!r} outside the plausible range for its category (clifpy outlier ranges)",
        "null",
        context=(category,),
    )
    checker.df = checker.df.drop("_lo", "_hi")


def _lab_values(checker: _Checker) -> None:
    """Labs carry a string `lab_value` and optionally `lab_value_numeric`; use the number."""
    df = checker.df
    assert df is not None
    parsed = pl.col("lab_value").str.strip_chars().cast(pl.Float64, strict=False)
    numeric = (
        pl.coalesce(pl.col("lab_value_numeric"), parsed)
        if "lab_value_numeric" in df.columns
        else parsed
    )
    checker.df = df.with_columns(numeric.alias("lab_value_numeric"))
    checker.rows(
        pl.col("lab_value_numeric").is_nan() | pl.col("lab_value_numeric").is_infinite(),
        "lab_value_numeric",
        "nan",
        "lab value is NaN or infinite",
        "null",
    )


def read_site(
    path: str | Path, cfg: DictConfig, on_table: Callable[[str], None] | None = None
) -> Site:
    """Read, check and clean every CLIF table fedclif uses. Never raises for bad data.

    `on_table` is called with each table's name before it is read (progress display).
    """
    path = Path(path)
    report = SiteReport(path=str(path))
    tables: dict[str, pl.DataFrame] = {}
    site = Site(path, tables, report, cfg)
    if not path.is_dir():
        tr = TableReport(table="site", file=str(path))
        tr.problems.append(
            Problem(
                "fatal",
                "site",
                str(path),
                None,
                "missing-directory",
                f"site directory {path} does not exist or is not a directory",
            )
        )
        report.tables["site"] = tr
        return site
    tables_dir = path
    if is_meds(path):  # its events as CLIF tables, checked like any site's
        report.source = "meds"
        try:
            data = read_meds(path, cfg.meds)
        except FedclifError as e:
            tr = report.tables["site"] = TableReport(table="site", file=str(path))
            report.meds_codes = e.counts if isinstance(e, MedsError) else {}
            for message in e.problems if isinstance(e, MedsError) else [str(e)]:
                tr.problems.append(Problem("fatal", "site", str(path), None, "meds", message))
            return site
        report.meds_codes = data.counts
        tables_dir = write_clif(data, _scratch())
    version = report.clif_version = site_version(cfg.clif_version, tables_dir)
    schemas = load_schemas(version)
    for name, schema in schemas.items():
        if on_table:
            on_table(name)
        tr = report.tables[name] = TableReport(table=name, file=str(tables_dir / schema.file_name))
        df = _check_table(tables_dir, schema, tr, cfg, version)
        if df is not None:  # checked in the site's version, kept in the vocabulary's terms
            tables[name] = df if version == VOCABULARY_VERSION else to_vocabulary(name, df)
    known = {s.file_name for s in schemas.values()}
    others = sorted(p.name for p in tables_dir.glob("clif_*.parquet") if p.name not in known)
    if others:
        tr = report.tables.setdefault("site", TableReport(table="site", file=str(path)))
        tr.problems.append(
            Problem(
                "warning",
                "site",
                str(path),
                None,
                "unused-tables",
                f"tables fedclif does not use: {', '.join(others)}",
            )
        )
    if any(p.severity == "fatal" for p in report.problems):
        return site
    _cross_checks(site, schemas)
    return site


def _scratch() -> Path:
    """A directory for a MEDS site's CLIF tables, removed when the process ends."""
    d = Path(tempfile.mkdtemp(prefix="fedclif-meds-"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def _checker_for(site: Site, schemas: dict[str, TableSchema], name: str) -> _Checker:
    c = _Checker(schemas[name], site.report.tables[name], site.cfg, site.report.clif_version)
    c.df = site.tables[name]
    return c


def _cross_checks(site: Site, schemas: dict[str, TableSchema]) -> None:
    """Keys, references between tables and impossible values; the usable stays."""
    _unique_keys(site, schemas)
    if site.report.fatal:
        return
    patients = site.tables["patient"].get_column("patient_id").implode()
    h = _check_stays(site, schemas, patients)
    stays = site.tables["hospitalization"].get_column("hospitalization_id").implode()
    for name in list(site.tables):
        _check_rows(site, schemas, name, patients, stays)
    hours = float(site.cfg.min_stay_hours)
    long_enough = site.tables["hospitalization"].filter(
        pl.col("discharge_dttm") - pl.col("admission_dttm") >= pl.duration(minutes=60 * hours)
    )
    site.report.usable_stays = long_enough.height
    if long_enough.is_empty():
        h.add(
            "fatal",
            "discharge_dttm",
            "no-stays",
            f"no hospitalization lasts at least {hours:g} h: nothing to tokenize",
        )


def _unique_keys(site: Site, schemas: dict[str, TableSchema]) -> None:
    """Each table's primary key unique (a duplicate is fatal)."""
    for name, key in PRIMARY_KEYS.items():
        c = _checker_for(site, schemas, name)
        dup = c.df.filter(pl.col(key).is_duplicated())
        if dup.height:
            c.add(
                "fatal",
                key,
                "duplicate-id",
                f"{key!r} must be unique in {schemas[name].file_name}: "
                f"{dup.get_column(key).n_unique()} ids appear more than once",
                dup.height,
                [repr(v) for v in dup.get_column(key).unique().sort().head(int(site.cfg.examples))],
            )


def _check_stays(site: Site, schemas: dict[str, TableSchema], patients: pl.Series) -> _Checker:
    """Hospitalizations of known patients, discharged after admission, of a possible age."""
    h = _checker_for(site, schemas, "hospitalization")
    h.rows(
        ~pl.col("patient_id").is_in(patients),
        "patient_id",
        "orphan",
        "hospitalizations of patients not in clif_patient",
        "drop",
    )
    h.rows(
        pl.col("discharge_dttm") < pl.col("admission_dttm"),
        "discharge_dttm",
        "impossible",
        "discharge before admission",
        "drop",
    )
    h.rows(
        (pl.col("age_at_admission") < 0) | (pl.col("age_at_admission") > 120),
        "age_at_admission",
        "impossible",
        "age below 0 or above 120",
        "null",
    )
    site.tables["hospitalization"] = h.df
    return h


def _check_rows(
    site: Site, schemas: dict[str, TableSchema], name: str, patients: pl.Series, stays: pl.Series
) -> None:
    """Table `name`'s values in range, and its rows of known patients and stays."""
    df = site.tables[name]
    c = _checker_for(site, schemas, name)
    if name == "labs":
        _lab_values(c)
    if name == "vitals":
        _check_ranges(c, "vital_category", "vital_value")
    elif name == "labs":
        _check_ranges(c, "lab_category", "lab_value_numeric")
    if name == "adt" and "out_dttm" in c.df.columns:  # an optional column
        c.rows(
            pl.col("out_dttm") < pl.col("in_dttm"),
            "out_dttm",
            "impossible",
            "transfer out before transfer in",
            "keep",
        )
    if name == "code_status":
        c.rows(
            ~pl.col("patient_id").is_in(patients),
            "patient_id",
            "orphan",
            "rows for patients not in clif_patient",
            "drop",
        )
    elif name not in ("patient", "hospitalization") and "hospitalization_id" in df.columns:
        c.rows(
            ~pl.col("hospitalization_id").is_in(stays),
            "hospitalization_id",
            "orphan",
            "rows for hospitalizations not in clif_hospitalization",
            "drop",
        )
    site.tables[name] = c.df
    if "hospitalization_id" in c.df.columns:
        site.report.tables[name].hospitalizations = c.df.get_column("hospitalization_id").n_unique()


def load_site(
    path: str | Path, cfg: DictConfig, on_table: Callable[[str], None] | None = None
) -> Site:
    """Like `read_site`, but raise `SiteInvalid` when the site is not usable."""
    site = read_site(path, cfg, on_table)
    if site.report.fatal:
        raise SiteInvalid(site.report)
    return site
