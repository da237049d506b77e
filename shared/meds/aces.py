"""fedclif's tasks as ACES task configs (`fedclif export aces-tasks OUT`): run by `aces-cli`
on a `fedclif export meds` dataset they give the labels `fedclif export labels` writes,
stay for stay (tests/shared/test_aces.py runs ACES itself).

Each task triggers at a stay's admission; the input window is its first `input_hours`
(the stay must outlast it: no discharge after the admission inside; for ICU and
ventilation, no ICU stay or ventilation either: those would be read, not predicted), the
prediction time its end;
the target window runs to the stay's discharge. Death is an Expired discharge, and a
discharge of unknown outcome (`HOSPITAL_DISCHARGE//Missing`) leaves the stay out; a long
stay is a discharge whose value (the length of stay in days, shared/meds/export.py) is
over 7; readmission is an admission within 30 days after the discharge.
"""

from pathlib import Path

import yaml

from fedclif.shared.errors import FedclifError
from fedclif.shared.tokens.labels import TASKS

PREDICATES = {
    "admission": {"code": {"regex": "^HOSPITAL_ADMISSION//"}},
    "discharge": {"code": {"regex": "^HOSPITAL_DISCHARGE//"}},
    "expired": {"code": "HOSPITAL_DISCHARGE//Expired"},
    "outcome_unknown": {"code": "HOSPITAL_DISCHARGE//Missing"},
    "long_discharge": {
        "code": {"regex": "^HOSPITAL_DISCHARGE//"},
        "value_min": 7.0,
        "value_min_inclusive": False,
    },
    "icu": {"code": "ADT//icu"},
    "imv": {"code": "RESP//device//IMV"},
}
# Task -> (the target window's label, what the input window must not hold besides a
# discharge, what the target window must not hold).
DESIGN = {
    "death": ("expired", (), ("outcome_unknown",)),
    "long_los": ("long_discharge", (), ()),
    "icu": ("icu", ("icu",), ()),
    "imv": ("imv", ("imv",), ()),
    "readmission": ("admission", (), ()),
}


def aces_config(task: str, input_hours: float) -> dict:
    """The ACES task config of `task` with an input window of `input_hours`."""
    if task not in DESIGN:
        raise FedclifError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    label, not_in_input, not_in_target = DESIGN[task]
    hours = f"start + {input_hours:g}h"
    windows = {
        "input": {
            "start": "trigger",
            "end": hours,
            "start_inclusive": True,
            "end_inclusive": False,
            "has": {p: "(None, 0)" for p in not_in_input},
            "index_timestamp": "end",
        },
        # The stay outlasts the input window; a discharge at the admission's own time is
        # the previous stay's (a transfer: one ends as the next begins).
        "first_day": {
            "start": "trigger",
            "end": hours,
            "start_inclusive": False,
            "end_inclusive": False,
            "has": {"discharge": "(None, 0)"},
        },
        "target": {
            "start": "input.end",
            "end": "start -> discharge",
            "start_inclusive": True,
            "end_inclusive": True,
            "has": {p: "(None, 0)" for p in not_in_target},
        },
    }
    if task == "readmission":
        windows["after"] = {
            "start": "target.end",
            "end": "start + 720h",
            "start_inclusive": False,
            "end_inclusive": True,
            "label": label,
        }
    else:
        windows["target"]["label"] = label
    used = {label, "admission", "discharge", *not_in_input, *not_in_target}
    return {
        "predicates": {k: v for k, v in PREDICATES.items() if k in used},
        "trigger": "admission",
        "windows": windows,
    }


def write_aces_tasks(out: str | Path, tasks: list[str], input_hours: float) -> list[Path]:
    """One `<task>.yaml` per task in `out` (every task checked before any is written)."""
    configs = {task: aces_config(task, input_hours) for task in tasks}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task, config in configs.items():
        path = out / f"{task}.yaml"
        path.write_text(
            f"# fedclif task {task!r} as an ACES task config (shared/meds/aces.py)\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        written.append(path)
    return written
