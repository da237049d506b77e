"""Project-level checks: the benchmarks still run (quick profiles, each its own process).
Lint and format are `.ci/run`'s."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_module(*args: str) -> str:
    """`python -m ARGS` from the repository root; its stdout, after checking it succeeded."""
    r = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow
def test_tokenize_bench_quick_profile():
    out = run_module("bench.tokenize", "--copies", "2", "--repeats", "1")
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "tokenize (read+check+encode+write)" in lines and "scan (floor)" in lines
    assert "MEDS export (read+check+export)" in lines and "MEDS as a site (read+map+check)" in lines
    assert "544 stays of >= 24 h" in out  # 2 copies x 272


@pytest.mark.slow
def test_synth_bench_quick_profile():
    out = run_module("bench.synth", "--sizes", "300", "--repeats", "1")
    assert "stays/s" in out and "    300 " in out


@pytest.mark.slow
def test_train_bench_quick_profile():
    out = run_module(
        "bench.train",
        "--size",
        "tiny",
        "--contexts",
        "64",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--step-tokens",
        "1024",
        "--objectives",
        "ts_align",
    )
    assert "overhead" in out and "tokens/s" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("64 "))
    assert len(row) == 6 and float(row[3]) > 0  # context, two rates, ratio, two peaks
    # Each pretraining objective's rate beside next-token alone's.
    for name in ("next_token (packed blocks)", "next_token (stay views)", "+ ts_align"):
        (line,) = [x for x in out.splitlines() if x.strip().startswith(name)]
        assert float(line.split()[-3].replace(",", "")) > 0, line
    assert "+ ts_recon" not in out  # only the objectives asked for


@pytest.mark.slow
def test_federation_bench_quick_profile():
    out = run_module("bench.federation", "--sites", "0", "--replies", "2", "--reps", "3", "--quick")
    assert "tiny lora+head" in out and "small full" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("N=")]
    assert len(rows) == 1 and "Flower FedAvg" in rows[0] and "streaming" in rows[0]
    assert "per reply of that model: checks" in out
    assert "train          all checks" in out  # the site's checks per message
