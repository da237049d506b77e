"""CLIF versions: which one a site speaks, and the crosswalk that gives all sites one
vocabulary.

fedclif's codes are written in CLIF 2.1 terms (`RESP_device_IMV`, `DSCG_Expired`): every
tokenizer and model trained so far speaks them. A CLIF 3.0 site is checked against the
3.0 schemas, then its category values are put in 2.1 terms by inverting clifpy's 2.1 ->
3.0 crosswalk, so the same event is the same token at a 2.1 and a 3.0 site. Values 3.0
added (no 2.1 term: `LAB_bnp`, `RESP_device_t_piece`) keep their 3.0 name and are codes
of their own; 3.0's concentration splits (`albumin_5`, `albumin_25`) fold back into the
2.1 term they split.
"""

import logging
import re
from functools import cache
from pathlib import Path

import polars as pl
import yaml

from fedclif.shared.clif.schema import OPTIONAL_TABLES, REQUIRED_TABLES, clifpy_root, load_schemas
from fedclif.shared.errors import FedclifError

VOCABULARY_VERSION = "2.1"
VERSIONS = ("2.1", "3.0")
log = logging.getLogger(__name__)

# Category columns whose values tell the versions apart (2.1 `Male`, `Home`, `Non-Hispanic`;
# 3.0 `male`, `home`, `non_hispanic`) and that every site has.
_TELLING = {
    "patient": ("sex_category", "race_category", "ethnicity_category"),
    "hospitalization": ("discharge_category", "admission_type_category"),
}


def _clifpy_crosswalk():
    # clifpy's package import logs a polars-version warning that is not ours to show.
    logging.getLogger("clifpy").setLevel(logging.ERROR)
    from clifpy.utils import crosswalk

    return crosswalk


@cache
def _crosswalk() -> dict:
    """clifpy's 2.1 -> 3.0 value crosswalk (`renames`, `unresolved`), read from its YAML:
    importing clifpy costs every process that reads a site ~0.5 s and ~80 MB (pandas)."""
    path = clifpy_root() / "schemas" / "crosswalks" / "clif_2.1_to_3.0.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    return {"renames": raw.get("renames") or {}, "unresolved": raw.get("unresolved") or {}}


_RUNS = re.compile(r"_+")


def normalize_category_value(value: str) -> str:
    """clifpy's CLIF 3.0 spelling of a category value (`Heart Rate` -> `heart_rate`,
    `DNR/DNI` -> `dnr_or_dni`): `clifpy.utils.crosswalk.normalize_category_value`, restated
    to spare its import (tests hold the two equal on every permissible value)."""
    s = value.strip().lower().replace("&", "_and_").replace("/", "_or_")
    for ch in " -,()":
        s = s.replace(ch, "_")
    return _RUNS.sub("_", s).strip("_")


def site_version(setting: str, tables_dir: Path) -> str:
    """The CLIF version to check a site against: `site.clif_version`, or detected from
    the data when it is `auto` (the version whose permissible values more of the site's
    demographic and discharge values are; 2.1 on a tie)."""
    setting = str(setting)
    if setting in VERSIONS:
        return setting
    if setting != "auto":
        raise FedclifError(
            f"site.clif_version={setting!r}: expected auto or one of {', '.join(VERSIONS)}"
        )
    hits = dict.fromkeys(VERSIONS, 0)
    for table, columns in _TELLING.items():
        file = tables_dir / f"clif_{table}.parquet"
        try:
            found = pl.read_parquet_schema(file)
            df = pl.read_parquet(file, columns=[c for c in columns if c in found])
        except Exception:  # unreadable or missing: the check of that table reports it
            continue
        for c in df.columns:
            values = df.get_column(c).cast(pl.String, strict=False).drop_nulls().unique()
            for v in VERSIONS:
                allowed = load_schemas(v)[table].columns[c].permissible or ()
                hits[v] += int(values.is_in(list(allowed)).sum())
    return "3.0" if hits["3.0"] > hits["2.1"] else "2.1"


@cache
def _to_vocabulary(table: str, column: str) -> dict[str, str]:
    """3.0 value -> its 2.1 term, for the values whose terms differ."""
    col = load_schemas(VOCABULARY_VERSION)[table].columns.get(column)  # 3.0 adds columns
    terms = col.permissible or () if col else ()
    renames = _crosswalk()["renames"].get(table, {}).get(column, {})
    splits = _crosswalk()["unresolved"].get(table, {}).get(column, {})
    out: dict[str, str] = {}
    for term in terms:
        if term in splits:
            for new in splits[term].get("candidates") or ():
                out[new] = term
        else:
            out.setdefault(renames.get(term, normalize_category_value(term)), term)
    return {new: old for new, old in out.items() if new != old}


@cache
def vocabulary_terms(table: str, column: str) -> frozenset[str] | None:
    """The values of a category column that are codes of their own: the 2.1 permissible
    values and the 3.0 values with no 2.1 term. None for an open column."""
    old = load_schemas(VOCABULARY_VERSION)[table].columns.get(column)
    if old is None or old.permissible is None:
        return None
    new = load_schemas("3.0")[table].columns.get(column)
    added = set(new.permissible or ()) - set(_to_vocabulary(table, column)) if new else set()
    return frozenset(old.permissible) | added


def to_vocabulary(table: str, df: pl.DataFrame) -> pl.DataFrame:
    """A 3.0 table's category values in 2.1 terms (other values unchanged)."""
    schema = load_schemas("3.0")[table]
    fixes = {
        c: _to_vocabulary(table, c)
        for c in df.columns
        if c in schema.columns and schema.columns[c].permissible
    }
    return df.with_columns(pl.col(c).replace(m) for c, m in fixes.items() if m)


def write_clif_3(src: Path, dst: Path) -> dict[str, list[str]]:
    """Copy a CLIF 2.1 directory as CLIF 3.0 with clifpy's crosswalk; returns the values
    per table it could not map (1 -> many splits such as `albumin`, left as they are)."""
    cw = _clifpy_crosswalk()
    dst.mkdir(parents=True, exist_ok=True)
    unresolved: dict[str, list[str]] = {}
    for table in REQUIRED_TABLES + OPTIONAL_TABLES:
        file = src / f"clif_{table}.parquet"
        if not file.exists():
            continue
        df, report = cw.crosswalk_table_2_1_to_3_0(pl.read_parquet(file), table)
        left = [
            str(x["original"])
            for col in report["columns"].values()
            for x in (*col["ambiguous"], *col["unresolved"])
        ]
        if left:
            unresolved[table] = left
            log.warning("%s: left as in 2.1 (no single 3.0 value): %s", table, ", ".join(left))
        df.write_parquet(dst / file.name)
    return unresolved
