"""Mergeable site statistics: what a site may share so that a tokenizer can be fitted.

A site's statistics are code counts and, per numeric code, counts on a fixed grid (values
rounded to `sig_figs` significant digits). The grid is the same at every site and does
not depend on the data, so histograms merge by adding counts, and quantiles of the
merged histogram match quantiles of the pooled values to within one grid cell. Nothing
stands on fewer than `min_cell_count` patients: a code's count is its patients, and codes
under it are dropped; cells held by fewer patients are rolled up to coarser rounding and
finally dropped (so no single value leaves the site); the dropped totals are sent only
when that many patients stand behind them; the number of stays is rounded down to a
multiple of it. Free-text answers leave only when the site's policy names them
(`policy.stats.allow_open`, deny by default) and `min_open_code_count` patients gave them.
"""

import re
import secrets
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from omegaconf import DictConfig, OmegaConf

from fedclif.shared.artifact import read_json, write_json
from fedclif.shared.clif.site import Site
from fedclif.shared.clif.versions import VOCABULARY_VERSION
from fedclif.shared.errors import FedclifError
from fedclif.shared.tokens.codes import admission_codes
from fedclif.shared.tokens.events import OPEN_SEP, stay_chunks, stay_events

FORMAT = "fedclif-site-stats"
VERSION = 1
# What a reviewer is warned of in a free-text answer (`fedclif site policy review`): text
# that reads like a person, a date or a record, not a category (the CLIF consortium scans
# free text with patterns like these). The guard is the policy's allow-list; the screen
# helps the reviewer fill it.
MAX_OPEN_LENGTH = 60
_MONTH = r"(?i:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
# US state codes after a capitalised word: Chicago IL.
_STATES = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|"
    "NJ|NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|DC"
)
_STREET = r"(?i:st|street|ave|avenue|rd|road|blvd|ln|lane|dr|drive|way|ct)"
IDENTIFYING = {
    "digits": r"\d{3,}",  # record, phone and account numbers, years
    "digit groups": r"\d{2,}(?:[\s.-]+\d{2,}){2,}",  # 55 12 34 56
    # 14/02, 2/14, 2184-03-17; 12 Feb, 14th February, Feb 12.
    "date": r"\b\d{1,4}[/.-]\d{1,2}(?:[/.-]\d{1,4})?\b"
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}|\b{_MONTH}\s+\d",
    "e-mail": r"[\w.+-]+\s*(?:@|[(\[]at[)\]])\s*[\w-]+\s*(?:\.|[(\[]dot[)\]])\s*\w",
    # A title and a name: Dr. Alvarez, Dr.Smith, Pt. Garcia, Nurse Kelly. Bare names are
    # not caught: a pattern for "two capitalised words" also takes real answers (Braden's
    # "Very Limited"); the count threshold and the policy's allow-list are the other guards.
    "title": r"\b(?i:mr|mrs|ms|miss|dr|prof|pt|patient|nurse|rn|md)(?:\.\s*|\s+)[A-Z]",
    "identifier": r"\b(?i:mrn|ssn|dob|id|acct|account)\b",
    "address": rf"\b\d+\s+[A-Za-z]+\s+{_STREET}\b",  # 42 Elm St
    "place": rf"\b[A-Z][a-z]+,?\s+(?:{_STATES})\b",
}
_IDENTIFYING = {name: re.compile(p) for name, p in IDENTIFYING.items()}


def screen_rule(answer: str) -> str | None:
    """Why a free-text answer may identify someone (the first IDENTIFYING pattern it
    matches, or its length), or None for one that reads like a category."""
    if len(answer) > MAX_OPEN_LENGTH:
        return f"longer than {MAX_OPEN_LENGTH}"
    return next((name for name, rx in _IDENTIFYING.items() if rx.search(answer)), None)


def _noisy(counts: pl.Expr, rng: np.random.Generator, n: int, scale: float) -> pl.Expr:
    if scale <= 0:
        return counts
    noise = pl.Series(rng.laplace(0.0, scale, n))
    return (counts + noise).round(0).clip(lower_bound=0).cast(pl.Int64)


def _roll_up(
    cells: pl.DataFrame, sig_figs: int, min_cell: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Roll cells held by fewer than `min_cell` patients up to coarser rounding, then drop
    the rest. `cells` holds (code, value, patient, n): readings of one patient in one cell.
    Returns the kept cells' readings (code, value, n) and, per code, the readings dropped
    (with the patients behind them, `patients`)."""

    def held(rows: pl.DataFrame) -> pl.DataFrame:  # each cell's distinct patients
        return rows.with_columns(pl.col("patient").n_unique().over("code", "value").alias("p"))

    rows = held(cells)
    for digits in range(sig_figs - 1, 0, -1):
        small = pl.col("p") < min_cell
        coarse = rows.filter(small).with_columns(pl.col("value").round_sig_figs(digits))
        rows = held(pl.concat([rows.filter(~small), coarse]))
    dropped = (
        rows.filter(pl.col("p") < min_cell)
        .group_by("code")
        .agg(pl.col("n").sum(), pl.col("patient").n_unique().alias("patients"))
    )
    kept = rows.filter(pl.col("p") >= min_cell).group_by("code", "value").agg(pl.col("n").sum())
    return kept.sort("code", "value"), dropped


def _patients(frame: pl.DataFrame, part: pl.DataFrame) -> pl.DataFrame:
    """`frame` (by stay) with each stay's patient."""
    return frame.join(part.select("stay", pl.col("patient_id").alias("patient")), on="stay")


def _patient_counts(
    site: Site, cfg: DictConfig, cells: bool = True
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Per code its patients (code, n), and (with `cells`) per code, value (rounded to the
    statistics' significant digits) and patient that patient's readings (code, value,
    patient, n). Counted chunk by chunk of stays: memory follows the chunk size, and what
    is kept per chunk is one row per patient, code and cell."""
    sig = int(cfg.stats.sig_figs)
    code_parts, cell_parts = [], []
    for sub, part in stay_chunks(site):
        ev = stay_events(sub, part).select("stay", "code", "value").collect()
        # Admission codes are a stay's (diagnoses, drugs given), counted like events.
        pairs = pl.concat([ev.select("stay", "code"), admission_codes(sub, part, cfg.codes, ev)])
        code_parts.append(_patients(pairs, part).select("code", "patient").unique())
        if not cells:
            continue
        cell_parts.append(
            _patients(ev.filter(pl.col("value").is_not_null()), part)
            .group_by("code", pl.col("value").round_sig_figs(sig), "patient")
            .agg(pl.len().cast(pl.Int64).alias("n"))
        )
    # A patient's stays may fall in two chunks: distinct again over the whole site.
    codes = pl.concat(code_parts).unique().group_by("code").agg(pl.len().cast(pl.Int64).alias("n"))
    if not cells:
        return codes, None
    per_cell = pl.concat(cell_parts).group_by("code", "value", "patient").agg(pl.col("n").sum())
    return codes, per_cell


def _open_answer() -> pl.Expr:
    """A code's free-text answer (ASMT_cam_total=Positive: Positive), null for others."""
    return pl.col("code").str.splitn(OPEN_SEP, 2).struct.field("field_1")


def open_floor(stats: DictConfig) -> int:
    """The fewest patients a free-text answer needs to leave: the minimum cell, and its
    own count rule (`stats` of the tokenizer's config or the site's policy)."""
    return max(int(stats.min_cell_count), int(stats.min_open_code_count))


def open_answers(site: Site, cfg: DictConfig) -> pl.DataFrame:
    """The site's free-text answers (code, answer, patients), most patients first: what a
    reviewer chooses the policy's allow-list from. Stays at the site."""
    codes, _ = _patient_counts(site, cfg, cells=False)
    return (
        codes.filter(_open_answer().is_not_null())
        .select("code", _open_answer().alias("answer"), pl.col("n").alias("patients"))
        .sort("patients", "code", descending=[True, False])
    )


def site_stats(site: Site, cfg: DictConfig, allow_open: Collection[str] = ()) -> dict:
    """Statistics of one site, ready to be written as JSON and sent to the server.

    Every count is of patients, or stands on them: a code's count is its patients (one
    stay charting an answer twelve times is one patient, under the floor), and a
    histogram cell (whose count is of readings, the distribution the tokenizer's
    quantiles come from) leaves only when at least `min_cell_count` patients stand behind
    it, as does a code's suppressed total. Suppression and noise apply to the site
    totals. A free-text answer leaves only when `allow_open` (the site's policy) names it
    exactly and `min_open_code_count` patients gave it: deny by default, whatever it reads
    like.
    """
    s = cfg.stats
    sig = int(s.sig_figs)
    codes, cells = _patient_counts(site, cfg)
    answer = _open_answer()
    min_cell = int(s.min_cell_count)
    # A code's floor: the minimum cell; a free-text answer's own count rule too.
    floor = pl.when(answer.is_null()).then(min_cell).otherwise(open_floor(s))
    codes = codes.filter(
        (pl.col("n") >= floor) & (answer.is_null() | answer.is_in(sorted(allow_open)))
    )
    cells, dropped = _roll_up(cells, sig, min_cell)
    dropped = dropped.filter(pl.col("patients") >= min_cell)
    rng = np.random.default_rng(secrets.randbits(128) if s.seed is None else int(s.seed))
    scale = float(s.noise_scale)
    # Noise is added to counts that passed the floor, and the floor applies again after
    # it: noise never lets a count under the minimum cell leave.
    codes = (
        codes.sort("code")
        .with_columns(_noisy(pl.col("n"), rng, codes.height, scale))
        .filter(pl.col("n") >= floor)
    )
    cells = cells.with_columns(_noisy(pl.col("n"), rng, cells.height, scale)).filter(
        pl.col("n") >= min_cell
    )
    suppressed = dict(zip(dropped["code"].to_list(), dropped["n"].to_list(), strict=True))
    numeric = {
        code: {
            "values": g["value"].to_list(),
            "counts": g["n"].to_list(),
            "suppressed": int(suppressed.get(code, 0)),
        }
        for (code,), g in cells.group_by("code", maintain_order=True)
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        # The CLIF terms its codes are in (a 3.0 site's are crosswalked), not the site's version.
        "clif_version": VOCABULARY_VERSION,
        "config": OmegaConf.to_container(s),
        "n_stays": site.report.usable_stays // min_cell * min_cell if scale <= 0 else None,
        "codes": dict(zip(codes["code"].to_list(), codes["n"].to_list(), strict=True)),
        "numeric": numeric,
    }


def write_stats(stats: dict, path: str | Path) -> None:
    write_json(stats, path)


def read_stats(path: str | Path) -> dict:
    return read_json(path, FORMAT, VERSION, "site statistics")


def merge_stats(all_stats: Sequence[dict]) -> dict:
    """Add up code counts and histogram cells of any number of sites."""
    if not all_stats:
        raise FedclifError("no statistics to merge")
    versions = {s["clif_version"] for s in all_stats}
    if len(versions) > 1:
        raise FedclifError(f"sites use different CLIF versions: {sorted(versions)}")
    codes: dict[str, int] = {}
    for s in all_stats:
        for code, n in s["codes"].items():
            codes[code] = codes.get(code, 0) + int(n)
    frames = [
        pl.DataFrame(
            {"code": code, "value": h["values"], "n": h["counts"]},
            schema={"code": pl.String, "value": pl.Float64, "n": pl.Int64},
        )
        for s in all_stats
        for code, h in s["numeric"].items()
    ]
    numeric: dict[str, dict] = {}
    if frames:
        merged = (
            pl.concat(frames).group_by("code", "value").agg(pl.col("n").sum()).sort("code", "value")
        )
        for (code,), g in merged.group_by("code", maintain_order=True):
            numeric[code] = {"values": g["value"].to_list(), "counts": g["n"].to_list()}
    n_stays = [s.get("n_stays") for s in all_stats]
    return {
        "clif_version": versions.pop(),
        "sites": len(all_stats),
        "n_stays": None if None in n_stays else sum(n_stays),
        "codes": codes,
        "numeric": numeric,
    }


def quantile_cuts(values: Sequence[float], counts: Sequence[int], n_bins: int) -> list[float]:
    """Cut points splitting a histogram into `n_bins` equal-mass bins.

    Cut i is the smallest value whose cumulative share reaches i/n_bins (the inverted-CDF
    quantile); repeated cuts (a value holding more than one bin's mass) collapse, so a
    heavily discrete variable gets fewer bins.
    """
    cum = np.cumsum(np.asarray(counts, dtype=np.float64))
    if cum.size == 0 or cum[-1] <= 0:
        return []
    targets = np.arange(1, n_bins) / n_bins * cum[-1]
    idx = np.searchsorted(cum, targets - 1e-9 * cum[-1], side="left")
    vals = np.asarray(values, dtype=np.float64)[np.minimum(idx, len(values) - 1)]
    # A cut at the smallest value would leave bin 0 empty.
    return [float(v) for v in np.unique(vals) if v > values[0]]
