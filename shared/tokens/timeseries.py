"""A stay as numbers: the hourly grid of its numeric vitals and a set of labs, the view
time-series objectives read (LLM4EHR's alignment, MedHMP's stay reconstruction).

Each value is the mean of the stay's readings in that hour since admission, normalised
with the federation's own statistics: location and scale come from the tokenizer's merged
quantile cut points (the median, and the spread of the outer cuts over the normal's), so
no site sends anything new for it. An hour without a reading has no value: the grid is
stored long (stay, hour, variable, value) and a missing cell stays missing (the mask),
never imputed. Written by `site tokenize` beside the timelines."""

from pathlib import Path
from statistics import NormalDist

import numpy as np
import polars as pl

from fedclif.shared.tokens.tokenizer import Tokenizer

TIMESERIES = "timeseries.parquet"


def variables(tok: Tokenizer) -> list[str]:
    """The grid's columns: every vital with cut points, then the configured labs that
    have them (`tokenizer.timeseries.labs`), in a fixed order."""
    labs = [f"LAB_{lab}" for lab in tok.config.get("timeseries", {}).get("labs", [])]
    vitals = sorted(c for c in tok.cuts if c.startswith("VTL_"))
    return vitals + [c for c in labs if c in tok.cuts]


def location_scale(cuts: tuple[float, ...]) -> tuple[float, float]:
    """Median and a robust standard deviation from quantile cut points at i/(n+1),
    i = 1..n (deciles: 10%..90%): the outer cuts' spread over the normal's."""
    n = len(cuts)
    levels = np.arange(1, n + 1) / (n + 1)
    loc = float(np.interp(0.5, levels, cuts))
    # The standard library's normal quantile: scipy.stats costs ~0.5 s at import, in every
    # process that tokenizes (ClientApps included).
    spread = NormalDist().inv_cdf(levels[-1]) - NormalDist().inv_cdf(levels[0])
    scale = (cuts[-1] - cuts[0]) / spread if n > 1 else 0.0
    return loc, float(scale) if scale > 0 else 1.0


def hourly_grid(events: pl.DataFrame, st: pl.DataFrame, tok: Tokenizer) -> pl.DataFrame:
    """Long grid of the stays in `st` from their events (shared/tokens/events.py `stay_events`,
    collected): hospitalization_id, hour (since admission), variable, value (normalised).
    Stays of a chunk are a contiguous run of `stay` ids in `st` order (as `encode` reads
    them), so a stay's id is a gather, and sorting stays on integers."""
    names = variables(tok)
    loc, scale = (
        zip(*(location_scale(tok.cuts[v]) for v in names), strict=True) if names else ((), ())
    )
    code = pl.col("code").cast(pl.Enum(names))
    g = (
        events.lazy()
        .filter(pl.col("code").is_in(names) & pl.col("value").is_not_null())
        .with_columns(
            code.alias("variable"),
            pl.col("hours").floor().cast(pl.Int32).alias("hour"),
        )
        .with_columns(
            (
                pl.col("value")
                - pl.col("variable").replace_strict(names, loc, return_dtype=pl.Float64)
            )
            / pl.col("variable").replace_strict(names, scale, return_dtype=pl.Float64)
        )
        .group_by("stay", "hour", "variable")
        .agg(pl.col("value").mean().cast(pl.Float32))
        .sort("stay", "hour", "variable")
        .collect()
    )
    first = int(st.get_column("stay").min() or 0)
    ids = st.get_column("hospitalization_id").gather(g.get_column("stay") - first)
    return g.select(ids.alias("hospitalization_id"), "hour", "variable", "value")


def read_grid(
    path: str | Path, ids: list[str], hours: int, tok: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """(values, mask) of stays `ids` in their first `hours` hours, [len(ids), hours,
    variables]: 0 where the mask is False (no reading that hour)."""
    names = variables(tok)
    g = pl.read_parquet(Path(path) / TIMESERIES).filter(
        pl.col("hospitalization_id").is_in(ids) & (pl.col("hour") < hours)
    )
    row = {h: i for i, h in enumerate(ids)}
    values = np.zeros((len(ids), hours, len(names)), np.float32)
    mask = np.zeros(values.shape, bool)
    r = g.get_column("hospitalization_id").replace_strict(row, return_dtype=pl.Int64).to_numpy()
    h = g.get_column("hour").to_numpy()
    v = g.get_column("variable").to_physical().to_numpy()
    values[r, h, v] = g.get_column("value").to_numpy()
    mask[r, h, v] = True
    return values, mask
