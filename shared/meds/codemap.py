"""A site's map from its own MEDS codes to CLIF tables and categories
(`site.meds.code_map`), and the survey of a dataset's codes that starts one
(`fedclif site meds-codes DIR`).

A map is a CSV (`code,table,category,unit,scale,offset`) or a YAML list of the same
keys. `code` is a code of the dataset (`HR`) or a prefix ending in `*`
(`LAB//50983//*`); `table` is a CLIF table whose events have one category column
(`vitals`, `labs`, `adt`, ...), a CLIF column of the patient, the stay or respiratory
support (`patient.sex_category`, `hospitalization.discharge_category`,
`respiratory_support.device_category`), or `drop` (read, and left out on purpose);
`category` is that column's CLIF value (`heart_rate`), checked against CLIF's
permissible values; `unit` is optional (CLIF's unit, after any conversion); `scale` and
`offset` (optional, default 1 and 0) convert the dataset's values to CLIF's unit as
`value * scale + offset` (degrees Fahrenheit to `temp_c`: 0.5555556 and -17.777778). A
mapped code is rewritten to the code `fedclif export meds` writes (`VITAL//heart_rate`),
which the reader knows. An exact code wins over a prefix, a longer prefix over a shorter
one.
"""

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from fedclif.shared.clif.schema import RESP_SETTINGS, load_schemas
from fedclif.shared.clif.versions import VOCABULARY_VERSION
from fedclif.shared.errors import FedclifError

DROP = "drop"
COLUMNS = ["code", "table", "category", "unit", "scale", "offset"]
# Map `table` -> (MEDS namespace fedclif reads, the CLIF table and column its category is).
TARGETS: dict[str, tuple[str, str, str]] = {
    "vitals": ("VITAL", "vitals", "vital_category"),
    "labs": ("LAB", "labs", "lab_category"),
    "adt": ("ADT", "adt", "location_category"),
    "medication_admin_continuous": ("MED_CONT", "medication_admin_continuous", "med_category"),
    "medication_admin_intermittent": (
        "MED_INT",
        "medication_admin_intermittent",
        "med_category",
    ),
    "patient_assessments": ("ASSESSMENT", "patient_assessments", "assessment_category"),
    "position": ("POSITION", "position", "position_category"),
    "code_status": ("CODE_STATUS", "code_status", "code_status_category"),
    "crrt_therapy": ("CRRT", "crrt_therapy", "crrt_mode_category"),
    "patient.sex_category": ("GENDER", "patient", "sex_category"),
    "patient.race_category": ("RACE", "patient", "race_category"),
    "patient.ethnicity_category": ("ETHNICITY", "patient", "ethnicity_category"),
    "hospitalization.admission_type_category": (
        "HOSPITAL_ADMISSION",
        "hospitalization",
        "admission_type_category",
    ),
    "hospitalization.discharge_category": (
        "HOSPITAL_DISCHARGE",
        "hospitalization",
        "discharge_category",
    ),
    "respiratory_support.device_category": (
        "RESP//device",
        "respiratory_support",
        "device_category",
    ),
    "respiratory_support.mode_category": ("RESP//mode", "respiratory_support", "mode_category"),
    # A setting's name is its category (`fio2_set`), the reading its value.
    "respiratory_support": ("RESP//setting", "respiratory_support", ""),
}


@dataclass(frozen=True)
class Rule:
    """One row of a map: `code` (a prefix when `prefix`) becomes `to` (None: dropped), its
    values `value * scale + offset`."""

    code: str
    prefix: bool
    to: str | None
    scale: float = 1.0
    offset: float = 0.0


def permissible(table: str, column: str) -> tuple[str, ...] | None:
    """CLIF's permissible values of `table.column` (respiratory settings: their names)."""
    if not column:
        return RESP_SETTINGS
    return load_schemas(VOCABULARY_VERSION)[table].columns[column].permissible


def _is_yaml(path: Path) -> bool:
    """A map file's format by its name: YAML, else CSV (anything else is refused)."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml"):
        raise FedclifError(f"{path}: a code map is a .csv or .yaml file")
    return suffix != ".csv"


def load_code_map(path: str | Path) -> list[Rule]:
    """The rules of map file `path`, each row checked (which row, what was expected)."""
    path = Path(path)
    if not path.is_file():
        raise FedclifError(f"site.meds.code_map={path}: no such file")
    if _is_yaml(path):
        rows = yaml.safe_load(path.read_text()) or []
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise FedclifError(f"{path}: expected a YAML list of {{code, table, category}}")
    else:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    rules = [_rule(path, i, row) for i, row in enumerate(rows, start=1)]
    seen: dict[tuple[str, bool], int] = {}
    for i, r in enumerate(rules, start=1):
        if (r.code, r.prefix) in seen:
            raise FedclifError(
                f"{path} row {i}: code {r.code!r} already mapped in row {seen[r.code, r.prefix]}"
            )
        seen[r.code, r.prefix] = i
    return rules


def _rule(path: Path, i: int, row: dict) -> Rule:
    def get(key: str) -> str:
        v = row.get(key)
        return "" if v is None else str(v).strip()

    code, table, category, unit = get("code"), get("table"), get("category"), get("unit")
    where = f"{path} row {i}"
    if not code:
        raise FedclifError(f"{where}: no code (a code of the dataset, or a prefix ending in *)")
    prefix = code.endswith("*")
    code = code.removesuffix("*")
    if table == DROP:
        return Rule(code, prefix, None)
    if table not in TARGETS:
        raise FedclifError(
            f"{where}: table {table!r} for code {code!r}; expected one of "
            f"{', '.join([*TARGETS, DROP])}"
        )
    space, clif_table, column = TARGETS[table]
    allowed = permissible(clif_table, column)
    if allowed is not None and category not in allowed:
        name = f"{clif_table}.{column}" if column else "respiratory support setting"
        raise FedclifError(
            f"{where}: category {category!r} for code {code!r} is not a CLIF {name} "
            f"(one of {', '.join(allowed)})"
        )
    if not category:
        raise FedclifError(f"{where}: no category for code {code!r} (table {table})")
    to = f"{space}//{category}" + (f"//{unit}" if unit else "")
    return Rule(
        code,
        prefix,
        to,
        _number(where, "scale", get("scale"), 1.0),
        _number(where, "offset", get("offset"), 0.0),
    )


def _number(where: str, key: str, text: str, default: float) -> float:
    """A map row's `scale` or `offset`: a finite number (a scale not 0), blank the default."""
    if not text:
        return default
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or (key == "scale" and x == 0):
        expected = "a finite number other than 0" if key == "scale" else "a finite number"
        raise FedclifError(f"{where}: {key} {text!r} is not {expected} (blank: {default:g})")
    return x


def apply_code_map(events: pl.DataFrame, rules: list[Rule]) -> pl.DataFrame:
    """`events` with each mapped code rewritten (`code`) and its values converted
    (`numeric_value`), its own code kept (`source_code`) and `mapped` set: True
    (rewritten), False (a `drop` rule), null (no rule)."""
    codes = events.select(pl.col("code").unique()).get_column("code").to_list()
    exact = {r.code: r for r in rules if not r.prefix}
    prefixes = sorted((r for r in rules if r.prefix), key=lambda r: -len(r.code))
    rows = []
    for c in codes:
        r = exact.get(c) or next((p for p in prefixes if c.startswith(p.code)), None)
        if r is not None:
            rows.append((c, r.to, r.to is not None, r.scale, r.offset))
    schema = {"code": pl.String, "to": pl.String, "mapped": pl.Boolean}
    schema |= {"scale": pl.Float64, "offset": pl.Float64}
    table = pl.DataFrame(rows, schema=schema, orient="row")
    scale, offset = pl.col("scale").fill_null(1.0), pl.col("offset").fill_null(0.0)
    return (
        events.rename({"code": "source_code"})
        .join(
            table.rename({"code": "source_code"}),
            on="source_code",
            how="left",
            maintain_order="left",
        )
        .with_columns(
            pl.coalesce("to", "source_code").alias("code"),
            (pl.col("numeric_value") * scale + offset).cast(pl.Float32).alias("numeric_value"),
        )
        .drop("to", "scale", "offset")
    )


def write_starting_map(codes: pl.DataFrame, path: str | Path) -> int:
    """Codes (`survey` rows) as a code map at `path` (.csv or .yaml): each a `drop` row,
    so the map as written changes nothing until a row is edited. Returns the rows."""
    path = Path(path)
    rows = [
        dict.fromkeys(COLUMNS, "") | {"code": c, "table": DROP}
        for c in codes.get_column("code").to_list()
    ]
    if _is_yaml(path):
        path.write_text(yaml.safe_dump(rows, sort_keys=False))
    else:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return len(rows)
