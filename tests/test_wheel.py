"""fedclif as a user installs it: the wheel (no editable install) in a fresh virtual
environment, run from an empty directory elsewhere with no activated environment (PATH
without the venv's bin, as under systemd or cron): the site's chain on the embedded demo,
a short pretraining, and a federated round simulated on two synthetic sites."""

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the source tree holds besides the package (kept out of the build's copy).
SKIP = shutil.ignore_patterns(
    ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__"
)

pytestmark = pytest.mark.slow  # real processes throughout


def _run(args: list, cwd: Path, env: dict | None = None) -> str:
    r = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, f"{' '.join(map(str, args))}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_wheel_installs_and_runs_unactivated(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path / "dist",
            src,
        ],
        tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("fedclif-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # One namespace in site-packages, configs shipped as package data.
    dist_info = wheel.name.split("-py3")[0] + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"fedclif", dist_info}
    assert "fedclif/configs/train.yaml" in names and "fedclif/cli.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path)
    py, bin_ = venv / "bin" / "python", venv / "bin"
    # The dependencies are those of the environment running the tests: a venv made from a
    # venv's interpreter sees the base interpreter's packages alone, so name the running
    # environment's too (after the new venv's own: the wheel's fedclif comes first).
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_run([py, "-c", ask], tmp_path).strip())
    (purelib / "dev-environment.pth").write_text("\n".join(site.getsitepackages()))
    # The dependencies come from the dev environment; flwr again, so that its console
    # scripts (and the Flower processes they start) are this environment's.
    _run(
        [
            py,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--ignore-installed",
            f"flwr=={_version('flwr')}",
            wheel,
        ],
        tmp_path,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    for var in ("VIRTUAL_ENV", "PYTHONPATH"):  # a fresh user's shell has neither
        env.pop(var, None)
    assert shutil.which("flwr-simulation", path=env["PATH"]) is None
    where = _run([py, "-c", "import fedclif; print(fedclif.__file__)"], work, env)
    assert where.startswith(str(venv)), where

    fedclif = bin_ / "fedclif"
    _run([fedclif, "demo-data", "demo"], work, env)
    _run([fedclif, "site", "validate", "demo"], work, env)
    _run([fedclif, "tokenizer", "fit", "--data", "demo", "--out", "tokenizer.json"], work, env)
    _run(
        [fedclif, "site", "tokenize", "demo", "--tokenizer", "tokenizer.json", "--out", "tokens"],
        work,
        env,
    )
    _run(
        [
            fedclif,
            "train",
            "pretrain",
            "--data",
            "tokens",
            "--out",
            "model",
            "train.pretrain.max_steps=5",
            "train.pretrain.context=64",
        ],
        work,
        env,
    )
    assert json.loads((work / "model" / "metrics.json").read_text())["steps"] == 5

    for name, preset, seed in (("a", "mimic-like", 1), ("b", "ucmc-like", 2)):
        _run(
            [fedclif, "synth", "--preset", preset, "--stays", "120", "--seed", seed, "--out", name],
            work,
            env,
        )
    _run(
        [
            fedclif,
            "run",
            "--sites",
            "a,b",
            "--out",
            "fed",
            "federation.rounds.pretrain=1",
            "federation.evaluate=false",
            "train.pretrain.max_steps=2",
            "train.pretrain.context=64",
        ],
        work,
        env,
    )
    r = json.loads((work / "fed" / "results.json").read_text())
    assert [h["round"] for h in r["rounds"]] == [1] and set(r["rounds"][0]["sites"]) == {"a", "b"}
    assert (work / "fed" / "model" / "config.json").is_file()
    assert "pretrain: 1" in (work / "fed" / "resolved.yaml").read_text()


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)
