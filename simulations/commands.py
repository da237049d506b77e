"""`fedclif simulate`: the transfer study on Flower's simulation engine, with progress,
then its report and table."""

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from shared.config import load_config
from shared.errors import FedclifError
from shared.ui import console, out, progress

CACHE = Path("runs/sim-cache")


def load_study(path: str | None, profile: str, overrides: list[str]) -> DictConfig:
    """configs/sim/transfer.yaml (or a file), then the profile's overrides, then the
    user's; `train` overrides are checked against configs/train.yaml."""
    base = load_config("sim/transfer", path, open_sections=["train"])
    if profile not in base.profiles:
        raise FedclifError(f"unknown profile {profile!r}; choose from {', '.join(base.profiles)}")
    cfg = load_config("sim/transfer", path, [*base.profiles[profile], *overrides], ["train"])
    from shared.federation import train_config

    train_config(OmegaConf.create({"train": cfg.train}))
    if not cfg.fractions or not all(0 < float(f) <= 1 for f in cfg.fractions):
        raise FedclifError(f"fractions must lie in (0, 1], got {list(cfg.fractions)}")
    if len(cfg.seeds) < 1:
        raise FedclifError("seeds must name at least one seed")
    return cfg


def run_study(cfg: DictConfig, out_dir: Path, cache: Path = CACHE) -> dict:
    """Generate (or reuse) the sites, run the study on the simulation engine with one
    virtual site each, and return its results (also in out_dir/results.json)."""
    from server.deploy import run_status
    from simulations.engine import SimulationEngine
    from simulations.sites import study_sites

    sites = study_sites(cfg, cache)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("results.json", "progress.json"):
        (out_dir / f).unlink(missing_ok=True)
    e = cfg.engine
    engine = SimulationEngine(out_dir / "engine", len(sites), int(e.cpus_per_site),
                              float(e.gpus_per_site), e.ray_address)  # fmt: skip
    config = {"study": OmegaConf.to_yaml(cfg), "out-dir": str(out_dir.resolve())}
    with engine, progress() as bar:
        run_id = engine.submit(config, sites, sites[0].parent / "work")
        task = bar.add_task("starting the simulation engine", total=None)
        while (status := run_status(run_id, engine.env)).startswith(
            ("pending", "starting", "running")
        ):
            p = out_dir / "progress.json"
            if p.is_file():
                prog = json.loads(p.read_text())
                bar.update(task, completed=prog["done"], total=prog["total"],
                           description=prog["what"])  # fmt: skip
            time.sleep(1)
        if not status.endswith("completed") or not (out_dir / "results.json").is_file():
            log = engine.save_log(run_id)
            raise FedclifError(
                f"the study's run ended {status}; the ServerApp's log: {log}; the sites' "
                f"errors: {sites[0].parent / 'work'}/<site>/errors.log"
            )
    return json.loads((out_dir / "results.json").read_text())


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.report import console_table, write_report

    cfg = load_study(args.config, args.profile, args.overrides)
    out_dir = Path(args.out or f"runs/{cfg.name}-{args.profile}")
    t0 = time.perf_counter()
    results = run_study(cfg, out_dir, Path(args.cache))
    summary = write_report(out_dir, results)
    out.print(console_table(summary, OmegaConf.to_container(cfg.paper)))
    console.print(
        f"{len(results['rows'])} results in {(time.perf_counter() - t0) / 60:.1f} min; "
        f"report: {out_dir / 'report.md'}"
    )
    return 0


def register(sub, add: Callable) -> None:
    p = add(sub, "simulate", cmd_simulate, "the cross-site transfer study, simulated")
    p.add_argument("--config", help="study YAML (default: configs/sim/transfer.yaml)")
    p.add_argument("--profile", default="default", help="quick | default | large")
    p.add_argument("--out", help="output directory (default: runs/<name>-<profile>)")
    p.add_argument("--cache", default=str(CACHE), help="where generated sites are kept")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="seeds=[0,1] ...")
