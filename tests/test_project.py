"""Project-level checks: lint, and that the benchmark still runs (quick profile)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_tokenize_bench_quick_profile():
    r = subprocess.run(
        [sys.executable, "-m", "bench.tokenize", "--copies", "2", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    lines = {line.split("  ")[0]: line for line in r.stdout.splitlines()}
    assert "tokenize (read+check+encode+write)" in lines and "scan (floor)" in lines
    assert "544 stays of >= 24 h" in r.stdout  # 2 copies x 272


def test_synth_bench_quick_profile():
    r = subprocess.run(
        [sys.executable, "-m", "bench.synth", "--sizes", "300", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "stays/s" in r.stdout and "    300 " in r.stdout
