"""Encode a site's stays as token timelines with a fitted tokenizer, plus their labels.

Output (one directory per site): `timelines.parquet` with one row per stay (token ids,
hours since admission and token types for the full stay and for the first `input_hours`;
with a tokenizer that has admission-code targets, `codes`: their indices, never tokens),
`labels.parquet`, a copy of `tokenizer.json`, and `manifest.json` (tokenizer hash,
counts). Age and hospitalization index are per-stay columns: they are the same for every
token of a stay.
"""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fedclif.shared.clif.site import Site
from fedclif.shared.errors import FedclifError
from fedclif.shared.tokens.codes import admission_codes, target_lists
from fedclif.shared.tokens.events import (
    PRIO_END,
    PRIO_START,
    TOKEN_TYPES,
    stay_chunks,
    stay_events,
    stays,
    type_id,
)
from fedclif.shared.tokens.labels import outcome_labels
from fedclif.shared.tokens.timeseries import TIMESERIES, hourly_grid, variables
from fedclif.shared.tokens.tokenizer import END, START, TIME_BUCKETS, Tokenizer, bin_token

TIMELINES, LABELS, MANIFEST, TOKENIZER = (
    "timelines.parquet",
    "labels.parquet",
    "manifest.json",
    "tokenizer.json",
)
_TIME_TYPE = TOKEN_TYPES.index("time")


def _lookups(tok: Tokenizer) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Cut points by code id, and the fused-token table lut[code id, bin]."""
    cuts = {tok.index[c]: np.asarray(v, dtype=np.float64) for c, v in tok.cuts.items()}
    width = max((len(v) + 1 for v in cuts.values()), default=1)
    lut = np.full((len(tok.vocab), width), -1, dtype=np.int32)
    if tok.fused:
        for c, v in tok.cuts.items():
            lut[tok.index[c], : len(v) + 1] = [
                tok.index[bin_token(c, b)] for b in range(len(v) + 1)
            ]
    return cuts, lut


def _bins(code_id: np.ndarray, value: np.ndarray, cuts: dict[int, np.ndarray]) -> np.ndarray:
    """Quantile bin of every event (-1: not binned). A value equal to a cut goes above it.

    Hand-written because no library bins by per-group cut points: events are grouped by
    code with one radix argsort, then each group is a single `np.searchsorted`.
    """
    out = np.full(code_id.size, -1, dtype=np.int32)
    order = np.argsort(
        code_id.astype(np.uint16 if code_id.max(initial=0) < 65536 else np.int64), kind="stable"
    )
    ends = np.cumsum(np.bincount(code_id, minlength=max(cuts, default=0) + 1))
    for c, cut in cuts.items():
        lo, hi = (ends[c - 1] if c else 0), ends[c]
        if lo == hi:
            continue
        rows = order[lo:hi]
        v = value[rows]
        ok = ~np.isnan(v)
        out[rows[ok]] = np.searchsorted(cut, v[ok], side="right")
    return out


def _lists(values: np.ndarray, offsets: np.ndarray) -> pl.Series:
    arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    return pl.Series(arr)


def _ordered_events(
    site: Site, tok: Tokenizer, st: pl.DataFrame, events: pl.DataFrame | None = None
) -> dict[str, np.ndarray]:
    """The stays' events (`stay_events`, unless already collected), bracketed by
    TL_START/TL_END, in timeline order, as arrays: stay (0-based within `st`), hours,
    code_id, type, value (NaN when none)."""
    lf = st.lazy()
    none = pl.lit(None, pl.Float64).alias("value")
    end_hours = (pl.col("discharge_dttm") - pl.col("admission_dttm")).dt.total_microseconds()
    brackets = pl.concat(
        [
            lf.select(
                "stay",
                pl.lit(0.0).alias("hours"),
                pl.lit(START).alias("code"),
                none,
                pl.lit(PRIO_START, pl.Int8).alias("prio"),
            ),
            lf.select(
                "stay",
                (end_hours / 3.6e9).alias("hours"),
                pl.lit(END).alias("code"),
                none,
                pl.lit(PRIO_END, pl.Int8).alias("prio"),
            ),
        ]
    )
    found = stay_events(site, st) if events is None else events.lazy()
    events = pl.concat([found, brackets]).collect()
    codes = events.get_column("code").unique().sort().to_list()
    # Few distinct codes per site: resolve them once in Python; an Enum cast then gives
    # each event its code's position, which indexes the id and type tables.
    code_ids = np.array([tok.id(c) for c in codes], dtype=np.int32)
    code_types = np.array([type_id(c) for c in codes], dtype=np.int8)
    # Order: stay, time, then prio and code at equal times. Times are taken to the
    # millisecond so that stay and time pack into one integer key: sorting on two integer
    # columns is several times faster than on the float and string columns.
    ms = (pl.col("hours") * 3.6e6).round().cast(pl.Int64)
    events = (
        events.with_columns(
            pl.col("code").cast(pl.Enum(codes)).to_physical().alias("code_pos"),
            (ms / 3.6e6).alias("hours"),
            (pl.col("stay").cast(pl.Int64) * (1 << 40) + ms).alias("_when"),
        )
        .with_columns(
            (pl.col("prio").cast(pl.Int64) * (1 << 32) + pl.col("code_pos")).alias("_what")
        )
        .sort("_when", "_what", maintain_order=True)
    )
    events = _ties_by_value(events)
    code_pos = events.get_column("code_pos").to_numpy()
    return {
        # Stays of a chunk are a contiguous run of ids; count from 0 within it.
        "stay": events.get_column("stay").to_numpy() - int(st.get_column("stay").min() or 0),
        "hours": events.get_column("hours").to_numpy(),
        "code_id": code_ids[code_pos],
        "type": code_types[code_pos],
        "value": events.get_column("value").fill_null(np.nan).to_numpy(),
    }


def _ties_by_value(events: pl.DataFrame) -> pl.DataFrame:
    """Readings of one code at one time (sorted events), ordered by value: the timeline
    then does not depend on the order of the source table's rows (a MEDS export read back
    gives the same). Only the ties are reordered (a third sort key costs the whole sort
    a third more)."""
    when, what = events.get_column("_when").to_numpy(), events.get_column("_what").to_numpy()
    tie = np.flatnonzero((when[1:] == when[:-1]) & (what[1:] == what[:-1]))
    if tie.size == 0:
        return events
    rows = np.union1d(tie, tie + 1)  # every row of a tie group, in order
    group = np.cumsum(np.r_[True, ~np.isin(rows[1:] - 1, tie)])  # a row not tied to the last
    value = events.get_column("value").fill_null(np.inf).to_numpy()[rows]
    order = rows[np.lexsort((value, group))]
    perm = np.arange(events.height)
    perm[rows] = order
    return events[perm]


def encode(
    site: Site, tok: Tokenizer, st: pl.DataFrame, events: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Timelines of the stays in `st`, one row per stay, in `st` order.

    One sort orders the events; the token arrays are then laid out with numpy (each event
    writes its optional time token, its token, and in split mode its bin token at offsets
    from a cumulative sum), which avoids sorting the larger token stream again.
    """
    ev = _ordered_events(site, tok, st, events)
    stay, hours, code_id, etype = ev["stay"], ev["hours"], ev["code_id"], ev["type"]
    cuts, lut = _lookups(tok)
    b = _bins(code_id, ev["value"], cuts)
    has_bin = b >= 0
    main = code_id.copy()
    if tok.fused:
        main[has_bin] = lut[code_id[has_bin], b[has_bin]]
        extra = np.zeros_like(has_bin)
    else:
        extra = has_bin
    same_stay = np.r_[False, stay[1:] == stay[:-1]]
    gap = np.where(same_stay, np.diff(hours, prepend=0.0) * 60.0, 0.0)
    bucket = np.searchsorted([m for m, _ in TIME_BUCKETS], gap, side="right") - 1
    has_gap = bucket >= 0
    time_ids = np.array([tok.index[t] for _, t in TIME_BUCKETS], dtype=np.int32)

    k = 1 + has_gap + extra
    start = np.cumsum(k) - k
    n = int(k.sum())
    token = np.empty(n, np.int32)
    t_hours = np.repeat(hours, k).astype(np.float32)
    t_type = np.repeat(etype, k)
    t_type[start[has_gap]] = _TIME_TYPE
    token[start[has_gap]] = time_ids[bucket[has_gap]]
    pos = start + has_gap
    token[pos] = main
    if extra.any():
        q_ids = np.array([tok.index[f"Q{i}"] for i in range(int(tok.config["n_bins"]))], np.int32)
        token[pos[extra] + 1] = q_ids[b[extra]]

    n_stays = st.height
    t_stay = np.repeat(stay, k)
    per_stay = np.bincount(t_stay, minlength=n_stays)
    offsets = np.r_[0, np.cumsum(per_stay)]
    in_window = t_hours < float(site.cfg.input_hours)
    n24 = np.bincount(t_stay[in_window], minlength=n_stays)
    # Hours are sorted within a stay, so the input window is a prefix of each timeline.
    head = np.arange(n) - offsets[t_stay] < n24[t_stay]
    off24 = np.r_[0, np.cumsum(n24)]
    return st.select(
        "hospitalization_id",
        "patient_id",
        "admission_dttm",
        pl.col("age_at_admission").alias("age"),
        "hosp_index",
    ).with_columns(
        _lists(token, offsets).alias("tokens"),
        _lists(t_hours, offsets).alias("hours"),
        _lists(t_type, offsets).alias("types"),
        pl.Series("n_tokens", per_stay, pl.Int32),
        pl.Series("n_tokens_24h", n24, pl.Int32),
        _lists(token[head], off24).alias("tokens_24h"),
        _lists(t_hours[head], off24).alias("hours_24h"),
        _lists(t_type[head], off24).alias("types_24h"),
    )


def tokenize_site(
    site: Site, tok: Tokenizer, out: str | Path, on_chunk: Callable[[int, int], None] | None = None
) -> dict:
    """Write timelines, their hourly time-series view (shared/tokens/timeseries.py), labels, the
    tokenizer and a manifest to `out`; return the manifest.

    Stays are encoded `site.cfg.chunk_stays` at a time and written as one parquet row
    group each, so memory grows with the chunk, not the site. `on_chunk(done, total)`
    reports progress in stays.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unk_ids = [i for t, i in tok.index.items() if t.endswith("_UNK")]
    tokens = tokens_24h = unknown = done = 0
    st = stays(site)
    writer = grid_writer = None
    try:
        for sub, part in stay_chunks(site, st):
            events = stay_events(sub, part).collect()  # once, for both views
            timelines = encode(sub, tok, part, events)
            if tok.targets:  # targets, kept apart from every token column
                pairs = admission_codes(sub, part, tok.config["codes"], events)
                timelines = timelines.with_columns(target_lists(pairs, part, tok.targets))
            grid = hourly_grid(events, part, tok).to_arrow()
            if grid_writer is None:
                grid_writer = pq.ParquetWriter(out / TIMESERIES, grid.schema)
            grid_writer.write_table(grid.cast(grid_writer.schema))
            flat = timelines.get_column("tokens").explode()
            tokens += flat.len()
            unknown += int(flat.is_in(unk_ids).sum())
            tokens_24h += int(timelines.get_column("n_tokens_24h").sum())
            table = timelines.to_arrow()
            if writer is None:
                meta = {
                    **(table.schema.metadata or {}),
                    b"fedclif_tokenizer_hash": tok.hash.encode(),
                }
                writer = pq.ParquetWriter(out / TIMELINES, table.schema.with_metadata(meta))
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
            done += part.height
            if on_chunk:
                on_chunk(done, st.height)
    finally:
        for w in (writer, grid_writer):
            if w is not None:
                w.close()
    labels = outcome_labels(site, st)
    labels.write_parquet(out / LABELS)
    tok.save(out / TOKENIZER)
    manifest = {
        "tokenizer_hash": tok.hash,
        "stays": st.height,
        "tokens": tokens,
        "tokens_24h": tokens_24h,
        "unknown_token_share": unknown / max(tokens, 1),
        "timeseries_variables": variables(tok),
        "labels": {
            c: int(labels.get_column(c).sum()) for c in labels.columns if c != "hospitalization_id"
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_timelines(
    path: str | Path, columns: list[str] | None = None, where: pl.Expr | None = None
) -> tuple[pl.DataFrame, Tokenizer]:
    """A tokenized site directory (optionally only some columns, only rows matching
    `where`) and its tokenizer, checked to belong together."""
    path = Path(path)
    if not (path / TIMELINES).is_file():
        raise FedclifError(f"{path} holds no {TIMELINES}: run `fedclif site tokenize` first")
    tok = Tokenizer.load(path / TOKENIZER)
    meta = pq.read_schema(path / TIMELINES).metadata or {}
    found = meta.get(b"fedclif_tokenizer_hash", b"").decode()
    if found != tok.hash:
        raise FedclifError(
            f"{path / TIMELINES} was made with tokenizer {found[:12] or '?'}, "
            f"but {path / TOKENIZER} is {tok.hash[:12]}; tokenize again"
        )
    lf = pl.scan_parquet(path / TIMELINES)
    if where is not None:
        lf = lf.filter(where)
    return lf.select(columns or pl.all()).collect(), tok
