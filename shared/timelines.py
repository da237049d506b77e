"""Encode a site's stays as token timelines with a fitted tokenizer, plus their labels.

Output (one directory per site): `timelines.parquet` with one row per stay (token ids,
hours since admission and token types for the full stay and for the first `input_hours`),
`labels.parquet`, a copy of `tokenizer.json`, and `manifest.json` (tokenizer hash,
counts). Age and hospitalization index are per-stay columns: they are the same for every
token of a stay.
"""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from shared.clif.site import Site
from shared.errors import FedclifError
from shared.events import PRIO_END, PRIO_START, TOKEN_TYPES, stay_events, stays, type_id
from shared.labels import outcome_labels
from shared.tokenizer import END, START, TIME_BUCKETS, Tokenizer, bin_token

TIMELINES, LABELS, MANIFEST, TOKENIZER = (
    "timelines.parquet",
    "labels.parquet",
    "manifest.json",
    "tokenizer.json",
)
_TIME_TYPE = TOKEN_TYPES.index("time")


def _code_ids(codes: pl.Series, tok: Tokenizer) -> tuple[dict[str, int], dict[str, int]]:
    # Few distinct codes per site: resolve them once in Python, then map vectorised.
    ids = {c: tok.id(c) for c in codes.to_list()}
    return ids, {c: type_id(c) for c in codes.to_list()}


def _bins(events: pl.DataFrame, tok: Tokenizer) -> pl.DataFrame:
    """Attach `bin` (quantile bin index, null when not binned) to every event."""
    rows = []
    for code, cuts in tok.cuts.items():
        rows.append((code, -np.inf, 0))
        rows += [(code, c, i + 1) for i, c in enumerate(cuts)]
    table = pl.DataFrame(
        rows, schema={"code": pl.String, "cut": pl.Float64, "bin": pl.Int32}, orient="row"
    ).sort("cut")
    numeric = events.filter(pl.col("value").is_not_null() & pl.col("code").is_in(list(tok.cuts)))
    binned = numeric.sort("value").join_asof(
        table,
        left_on="value",
        right_on="cut",
        by="code",
        strategy="backward",
        check_sortedness=False,
    )
    return events.join(binned.select("eid", "bin"), on="eid", how="left")


def encode(site: Site, tok: Tokenizer, st: pl.DataFrame) -> pl.DataFrame:
    """Timelines of the stays in `st`, one row per stay, in `st` order."""
    ends = st.lazy().select(
        "stay",
        (
            (pl.col("discharge_dttm") - pl.col("admission_dttm")).dt.total_microseconds() / 3.6e9
        ).alias("hours"),
    )
    brackets = pl.concat(
        [
            st.lazy().select(
                "stay",
                pl.lit(0.0).alias("hours"),
                pl.lit(START).alias("code"),
                pl.lit(None, pl.Float64).alias("value"),
                pl.lit(PRIO_START, pl.Int8).alias("prio"),
            ),
            ends.select(
                "stay",
                "hours",
                pl.lit(END).alias("code"),
                pl.lit(None, pl.Float64).alias("value"),
                pl.lit(PRIO_END, pl.Int8).alias("prio"),
            ),
        ]
    )
    events = (
        pl.concat([stay_events(site, st), brackets])
        .sort("stay", "hours", "prio", "code", "value", nulls_last=True)
        .with_row_index("eid")
        .collect()
    )
    ids, types = _code_ids(events.get_column("code").unique(), tok)
    events = (
        _bins(events, tok)
        .sort("eid")
        .with_columns(
            pl.col("code").replace_strict(ids, return_dtype=pl.Int32).alias("code_id"),
            pl.col("code").replace_strict(types, return_dtype=pl.Int8).alias("type"),
        )
    )
    # Binned events: fused -> one `code_Qb` token; split -> `code` then `Qb`.
    if tok.fused:
        fused = {
            bin_token(c, b): tok.index[bin_token(c, b)]
            for c, cuts in tok.cuts.items()
            for b in range(len(cuts) + 1)
        }
        main = (
            pl.when(pl.col("bin").is_null())
            .then(pl.col("code_id"))
            .otherwise(
                (pl.col("code") + "_Q" + pl.col("bin").cast(pl.String)).replace_strict(
                    fused, default=None, return_dtype=pl.Int32
                )
            )
        )
        extra = None
    else:
        main = pl.col("code_id")
        extra = pl.col("bin").replace_strict(
            {b: tok.index[f"Q{b}"] for b in range(int(tok.config["n_bins"]))},
            default=None,
            return_dtype=pl.Int32,
        )
    gap_min = (pl.col("hours") - pl.col("hours").shift().over("stay")) * 60.0
    events = events.with_columns(main.alias("main"), gap_min.fill_null(0.0).alias("gap"))
    bounds = np.array([b for b, _ in TIME_BUCKETS])
    time_ids = np.array([tok.index[t] for _, t in TIME_BUCKETS], dtype=np.int32)
    bucket = np.searchsorted(bounds, events.get_column("gap").to_numpy(), side="right") - 1
    events = events.with_columns(
        pl.Series("gap_token", np.where(bucket >= 0, time_ids[np.maximum(bucket, 0)], -1))
    )
    cols = ("stay", "eid", "sub", "token", "hours", "type")
    parts = [
        events.filter(pl.col("gap_token") >= 0).select(
            "stay",
            "eid",
            pl.lit(0, pl.Int8).alias("sub"),
            pl.col("gap_token").alias("token"),
            "hours",
            pl.lit(_TIME_TYPE, pl.Int8).alias("type"),
        ),
        events.select(
            "stay",
            "eid",
            pl.lit(1, pl.Int8).alias("sub"),
            pl.col("main").alias("token"),
            "hours",
            "type",
        ),
    ]
    if extra is not None:
        parts.append(
            events.filter(pl.col("bin").is_not_null()).select(
                "stay",
                "eid",
                pl.lit(2, pl.Int8).alias("sub"),
                extra.alias("token"),
                "hours",
                "type",
            )
        )
    tokens = pl.concat([p.select(cols) for p in parts]).sort("eid", "sub")
    in_window = pl.col("hours") < float(site.cfg.input_hours)
    grouped = tokens.group_by("stay", maintain_order=True).agg(
        pl.col("token").cast(pl.Int32).alias("tokens"),
        pl.col("hours").cast(pl.Float32),
        pl.col("type").alias("types"),
        in_window.sum().cast(pl.Int32).alias("n_tokens_24h"),
    )
    head = pl.col("n_tokens_24h")
    return (
        st.select(
            "stay",
            "hospitalization_id",
            "patient_id",
            "admission_dttm",
            pl.col("age_at_admission").alias("age"),
            "hosp_index",
        )
        .join(grouped, on="stay", how="left")
        .with_columns(
            pl.col("tokens").list.len().cast(pl.Int32).alias("n_tokens"),
            pl.col("tokens").list.head(head).alias("tokens_24h"),
            pl.col("hours").list.head(head).alias("hours_24h"),
            pl.col("types").list.head(head).alias("types_24h"),
        )
        .drop("stay")
    )


def tokenize_site(site: Site, tok: Tokenizer, out: str | Path) -> dict:
    """Write timelines, labels, the tokenizer and a manifest to `out`; return the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = stays(site)
    timelines = encode(site, tok, st)
    labels = outcome_labels(site, st)
    table = timelines.to_arrow()
    meta = {**(table.schema.metadata or {}), b"fedclif_tokenizer_hash": tok.hash.encode()}
    pq.write_table(table.replace_schema_metadata(meta), out / TIMELINES)
    labels.write_parquet(out / LABELS)
    tok.save(out / TOKENIZER)
    flat = timelines.get_column("tokens").explode()
    unk_ids = [i for t, i in tok.index.items() if t.endswith("_UNK")]
    manifest = {
        "tokenizer_hash": tok.hash,
        "stays": timelines.height,
        "tokens": int(flat.len()),
        "tokens_24h": int(timelines.get_column("n_tokens_24h").sum()),
        "unknown_token_share": float(flat.is_in(unk_ids).mean() or 0.0),
        "labels": {
            c: int(labels.get_column(c).sum()) for c in labels.columns if c != "hospitalization_id"
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_timelines(path: str | Path) -> tuple[pl.DataFrame, Tokenizer]:
    """A tokenized site directory and its tokenizer, checked to belong together."""
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
    return pl.read_parquet(path / TIMELINES), tok
