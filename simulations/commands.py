"""The simulation floor's commands: `fedclif simulate` (the transfer study on Flower's
simulation engine, with progress, then its report and table), `fedclif synth` (synthetic
sites) and `fedclif run --sites` (any federated run, simulated on this machine)."""

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedclif.server.deploy import run_config, run_status
from fedclif.shared.artifact import write_json
from fedclif.shared.config import add_arguments, load_tree, write_resolved
from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import OPEN_KEYS, RUN_LAYERS, RUN_SECTIONS, load_federation
from fedclif.shared.protocol.flower import app_files
from fedclif.shared.ui import console, out, progress
from fedclif.simulations import synth
from fedclif.simulations.engine import SimulationEngine
from fedclif.simulations.sites import POOLED, site_roles, study_sites
from fedclif.simulations.truth import write_truth

CACHE = Path("runs/sim-cache")
# The study's own Flower app (simulations/app.py) and the run-config keys it reads.
STUDY_SERVERAPP = "fedclif.simulations.app:app"
STUDY_RUN_CONFIG = {"study": "", "out-dir": "runs/transfer", "sites": "", "work-root": ""}


STUDY_SECTIONS = ("study", *RUN_SECTIONS)
STUDY_LAYERS = (*RUN_LAYERS, "sim/transfer")


def load_study(path: str | None, profile: str, overrides: Sequence[str]) -> DictConfig:
    """The study's config tree: a federated run's (configs/federation/default.yaml) with
    configs/sim/transfer.yaml over it, then the user's file, the profile's overrides and
    the command line's."""
    base = load_tree(STUDY_SECTIONS, STUDY_LAYERS, path, open_keys=OPEN_KEYS)
    profiles = base.study.profiles
    if profile not in profiles:
        raise FedclifError(f"unknown profile {profile!r}; choose from {', '.join(profiles)}")
    settings = [*profiles[profile], *overrides]
    cfg = load_tree(STUDY_SECTIONS, STUDY_LAYERS, path, settings, OPEN_KEYS)
    s = cfg.study
    if not s.fractions or not all(0 < float(f) <= 1 for f in s.fractions):
        raise FedclifError(f"study.fractions must lie in (0, 1], got {list(s.fractions)}")
    if len(s.seeds) < 1:
        raise FedclifError("study.seeds must name at least one seed")
    return cfg


def run_study(cfg: DictConfig, out_dir: Path, cache: Path = CACHE) -> dict:
    """Generate (or reuse) the sites, run the study on the simulation engine with one
    virtual site each, and return its results (also in out_dir/results.json)."""
    sites, work = study_sites(cfg.study, cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("results.json", "progress.json"):
        (out_dir / f).unlink(missing_ok=True)
    write_resolved(cfg, out_dir)
    e = cfg.study.engine
    engine = SimulationEngine(
        out_dir / "engine", len(sites), int(e.cpus_per_site), float(e.gpus_per_site), e.ray_address
    )
    config = {"study": OmegaConf.to_yaml(cfg), "out-dir": str(out_dir.resolve())}
    with engine, progress() as bar:
        run_id = engine.submit(config, sites, work, app_files(STUDY_SERVERAPP, STUDY_RUN_CONFIG))
        task = bar.add_task("starting the simulation engine", total=None)
        while (status := run_status(run_id, engine.env)).startswith(
            ("pending", "starting", "running")
        ):
            p = out_dir / "progress.json"
            if p.is_file():
                prog = json.loads(p.read_text())
                bar.update(
                    task, completed=prog["done"], total=prog["total"], description=prog["what"]
                )
            time.sleep(1)
        if not status.endswith("completed") or not (out_dir / "results.json").is_file():
            raise FedclifError(
                f"the study's run ended {status}: {engine.save_log(run_id)}; the sites' "
                f"errors: {work}/<site>/errors.log"
            )
    results = json.loads((out_dir / "results.json").read_text())
    from fedclif.simulations.reference_arms import ceiling_rows, gbm_rows  # scikit-learn

    t0 = time.monotonic()
    tok = results["tokenizers"]["source"]
    with console.status("fitting the gradient-boosting baseline at the source and target"):
        results["rows"] += gbm_rows(cfg, work, tok)
    results["phase_seconds"]["gradient-boosting baseline"] = time.monotonic() - t0
    real = {r: d for r, d in zip(site_roles(cfg.study), sites, strict=True) if r != POOLED}
    results["rows"] += ceiling_rows(cfg, real, work, tok)
    write_json(results, out_dir / "results.json")
    return results


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedclif.simulations.report import console_table, write_report

    cfg = load_study(args.config, args.profile, args.overrides)
    out_dir = Path(args.out or f"runs/{cfg.study.name}-{args.profile}")
    t0 = time.perf_counter()
    targets = list(cfg.study.targets or [])
    studies = {p: _with_target(cfg, p) for p in targets} or {None: cfg}
    summaries = {}
    for preset, c in studies.items():
        where = out_dir / preset if preset else out_dir
        if preset:
            console.print(f"target {preset} ({len(summaries) + 1} of {len(studies)})")
        results = run_study(c, where, Path(args.cache))
        summaries[preset] = write_report(where, results)
        out.print(console_table(summaries[preset], OmegaConf.to_container(cfg.study.paper)))
    report = out_dir / "report.md"
    if targets:
        from fedclif.simulations.shifts import write_shifts

        out.print(write_shifts(out_dir, summaries, cfg))
        report = out_dir / "shifts.md"
    console.print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; report: {report}")
    return 0


def _with_target(cfg: DictConfig, preset: str) -> DictConfig:
    """The study `cfg` with `preset` as its target (one study of `study.targets`)."""
    if preset not in synth.preset_names():
        raise FedclifError(
            f"study.targets: unknown preset {preset!r}; choose from "
            f"{', '.join(synth.preset_names())}"
        )
    c = cfg.copy()
    c.study.sites.target.preset = preset
    c.study.targets = None
    return c


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic site, or (`synth compare DIR`) compare one with a reference."""
    words = [w for w in args.words if "=" not in w]
    if words and words[0] == "compare":
        if len(words) != 2 or not args.reference:
            raise FedclifError("usage: fedclif synth compare DIR --reference DEMO_DIR [--png F]")
        from fedclif.simulations.compare import compare_sites  # matplotlib: only here

        png = Path(args.png) if args.png else Path(words[1]) / "compare.png"
        site = load_tree(("site",), (), args.config, [w for w in args.words if "=" in w]).site
        table = compare_sites(Path(words[1]), Path(args.reference), png, site)
        out.print(table)
        out.print(f"value distributions: {png}")
        return 0
    if not args.preset or not args.out:
        raise FedclifError(
            "fedclif synth needs --preset NAME and --out DIR "
            f"(presets: {', '.join(synth.preset_names())})"
        )
    if words:
        raise FedclifError(f"unexpected {words}: overrides look like synth.key=value")
    bad = [w for w in args.words if not w.startswith("synth.")]
    if bad:
        raise FedclifError(f"{bad}: the generator's overrides look like synth.key=value")
    cfg = synth.load_preset(args.preset, [w.removeprefix("synth.") for w in args.words])
    t0 = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"generating {cfg.name}", total=args.stays)
        rows = synth.write_site(
            cfg,
            args.stays,
            args.seed,
            args.out,
            on_chunk=lambda d, n: bar.update(task, completed=d),
        )
    truth = write_truth(cfg, args.stays, args.seed, args.out)
    sec = time.perf_counter() - t0
    out.print(
        f"wrote {cfg.name} ({args.stays:,} stays, seed {args.seed}) to {args.out} in "
        f"{sec:.1f} s: " + ", ".join(f"{k} {v:,}" for k, v in rows.items())
    )
    out.print(f"each stay's ceiling (for studies; no site code reads it): {truth}")
    return 0


def cmd_run_simulated(args: argparse.Namespace) -> int:
    """`fedclif run --sites A,B`: the run on this machine, one virtual site per CLIF dir."""
    fed = load_federation(args.config, args.overrides)
    out_dir = Path(args.out)
    config = run_config(fed, out_dir, args.resume, Path(args.audit) if args.audit else None)
    sites = [Path(s) for s in args.sites.split(",") if s]
    with SimulationEngine(out_dir / "engine", len(sites)) as engine:
        ok, why = engine.run(config, sites, out_dir / "sites")
    if not ok:
        out.print(
            f"simulated run failed: {why}\nthe sites' errors: {out_dir}/sites/<site>/errors.log"
        )
        return 1
    out.print(f"simulated run completed; files in {out_dir}")
    return 0


def register(sub, groups: dict, add: Callable) -> None:
    """`simulate`, `synth`, and `--sites` on the coordinator's `run` (simulated)."""
    run = groups["run"]
    deployed = run.get_default("fn")
    run.add_argument(
        "--sites",
        help="comma-separated CLIF directories: simulate the run on this machine, one "
        "virtual site each (instead of --superlink/--ca)",
    )
    run.set_defaults(fn=lambda a: cmd_run_simulated(a) if a.sites else deployed(a))
    p = add(sub, "simulate", cmd_simulate, "the cross-site transfer study, simulated")
    p.add_argument("--profile", default="default", help="quick | default | large")
    p.add_argument("--out", help="output directory (default: runs/<name>-<profile>)")
    p.add_argument("--cache", default=str(CACHE), help="where generated sites are kept")
    add_arguments(p, STUDY_SECTIONS, "study.seeds=[0,1] train.finetune.lr=5e-4 model.arch=mamba2")
    p = add(sub, "synth", cmd_synth, "write a synthetic CLIF site (or: synth compare DIR)")
    p.add_argument(
        "words",
        nargs="*",
        metavar="synth.key=value | compare DIR",
        help="generator overrides (synth.policy.icu_threshold=0.5), or `compare DIR` "
        "(site.key=value)",
    )
    p.add_argument("--config", help="with compare: a YAML with a site section")
    p.add_argument("--preset", help="a preset in configs/sim/sites/")
    p.add_argument("--stays", type=int, default=1000, help="hospitalizations to generate")
    p.add_argument("--seed", type=int, default=0, help="same seed and config, same bytes")
    p.add_argument("--out", help="output CLIF directory")
    p.add_argument("--reference", help="with compare: the CLIF directory to compare against")
    p.add_argument("--png", help="with compare: where to save the distributions plot")
