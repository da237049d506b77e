"""fedclif's tasks as ACES task configs (shared/meds/aces.py): on the demo's MEDS export,
ACES itself (`es-aces`, in a virtual environment of its own, as MEDS-Tab's is) extracts
exactly the labels `fedclif export labels` writes, task by task."""

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from fedclif.cli import main
from fedclif.shared.tokens.labels import TASKS

ROOT = Path(__file__).resolve().parents[2]
ACES = "es-aces==0.7.3"


def test_every_task_has_a_config_with_its_input_window(tmp_path, capsys):
    out = tmp_path / "aces"
    assert main(["export", "aces-tasks", "--out", str(out), "site.input_hours=12"]) == 0
    assert sorted(p.stem for p in out.glob("*.yaml")) == sorted(TASKS)
    for task in TASKS:
        cfg = yaml.safe_load((out / f"{task}.yaml").read_text())
        windows = cfg["windows"]
        assert windows["input"]["end"] == "start + 12h"
        assert windows["input"]["index_timestamp"] == "end"
        assert windows["first_day"]["has"] == {"discharge": "(None, 0)"}
        # Every predicate a window names is defined.
        named = {p for w in windows.values() for p in w.get("has", {})}
        named |= {w["label"] for w in windows.values() if "label" in w} | {cfg["trigger"]}
        assert named == set(cfg["predicates"]), task
    death = yaml.safe_load((out / "death.yaml").read_text())["windows"]["target"]
    assert death["label"] == "expired" and death["has"] == {"outcome_unknown": "(None, 0)"}
    assert main(["export", "aces-tasks", "--out", str(tmp_path / "x"), "--tasks", "sepsis"]) == 1
    assert "unknown task 'sepsis'" in capsys.readouterr().err


@pytest.fixture(scope="session")
def aces_cli() -> Path:
    """`aces-cli` from `.venv-aces` at the repository root, made once."""
    venv = ROOT / ".venv-aces"
    cli = venv / "bin" / "aces-cli"
    if not cli.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", ACES], capture_output=True, text=True
        )
        if pip.returncode != 0:
            pytest.skip(f"{ACES} does not install here: {pip.stderr.strip()[-300:]}")
    return cli


@pytest.mark.slow  # a virtual environment of its own, and ACES once per task
def test_aces_extracts_exactly_our_labels_from_our_export(demo_dir, tmp_path, aces_cli):
    meds_dir, labels, configs = tmp_path / "meds", tmp_path / "labels", tmp_path / "aces"
    assert main(["export", "meds", str(demo_dir), "--out", str(meds_dir)]) == 0
    assert main(["export", "labels", str(demo_dir), "--out", str(labels)]) == 0
    assert main(["export", "aces-tasks", "--out", str(configs)]) == 0
    (shard,) = (meds_dir / "data").glob("*.parquet")  # the demo is one shard
    for task in TASKS:
        run = subprocess.run(
            [
                str(aces_cli),
                "data.standard=meds",
                "data=single_file",
                f"data.path={shard}",
                f"cohort_dir={configs}",
                f"cohort_name={task}",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        key = ["subject_id", "prediction_time"]
        got = pl.read_parquet(configs / f"{task}.parquet").select(*key, "boolean_value")
        want = pl.read_parquet(labels / task / "0.parquet")
        assert want.get_column("boolean_value").sum() > 10, task  # positives to agree on
        assert got.sort(key).equals(want.select(*key, "boolean_value").sort(key)), task
