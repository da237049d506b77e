"""Scale of the simulation engine: a federated pretraining run of the tiny model with 2, 8
and 32 virtual sites (Flower's simulation engine, Ray, one ClientApp per site), printing
per round the wall time and the peak memory of everything the engine runs (SuperLink,
ServerApp process, Ray and its ClientApp actors: the RSS of the whole process tree,
sampled every 0.2 s), beside the 2-site run as the baseline.

    python -m bench.simulate                       # 2, 8, 32 sites, 3 rounds
    python -m bench.simulate --sites 2 --rounds 1  # quick
"""

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
from rich.table import Table

from fedclif.shared.ui import console, out


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def run_sites(root: Path, n: int, rounds: int, steps: int, stays: int) -> list[dict]:
    """One federated run over n synthetic sites; per round: seconds and peak MiB."""
    from fedclif.server.deploy import run_config
    from fedclif.shared.federation import load_federation
    from fedclif.simulations.engine import SimulationEngine
    from fedclif.simulations.synth import load_preset, write_site

    presets = ["mimic-like", "ucmc-like", "shift-none", "shift-case-mix"]
    sites = []
    for i in range(n):
        d = root / "sites" / f"site{i:02d}"
        if not d.is_dir():
            write_site(load_preset(presets[i % len(presets)]), stays, i, d)
        sites.append(d)
    fed = load_federation(
        None,
        [
            f"federation.rounds.pretrain={rounds}",
            f"federation.min_sites={n}",
            "federation.statistics=true",
            "federation.evaluate=false",
            "train.pretrain.context=128",
            "train.pretrain.batch_size=8",
            f"train.pretrain.max_steps={steps}",
            "federation.timeout_s=1800",
        ],
    )
    run_out = root / f"run-{n}"
    samples: list[tuple[float, int]] = []
    with SimulationEngine(root / f"engine-{n}", n) as engine:
        pid = engine.procs["superlink"][0].pid
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.time(), _tree_rss(pid)))
                time.sleep(0.2)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            ok, why = engine.run(run_config(fed, run_out, False), sites, root / f"work-{n}")
        finally:
            stop.set()
            t.join()
    if not ok:
        raise RuntimeError(f"the {n}-site run failed: {why}")
    res = json.loads((run_out / "results.json").read_text())
    rows = []
    for x in res["rounds"]:
        a, b = x["ended"] - x["seconds"], x["ended"]
        peak = max((m for ts, m in samples if a <= ts <= b), default=0)
        rows.append(
            {"sites": n, "round": x["round"], "seconds": x["seconds"], "peak_mib": peak / 2**20}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="local steps per round")
    ap.add_argument("--stays", type=int, default=40, help="stays per synthetic site")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for n in args.sites:
            console.print(f"{n} virtual sites…")
            rows += run_sites(Path(tmp), n, args.rounds, args.steps, args.stays)
    base = {r["round"]: r for r in rows if r["sites"] == args.sites[0]}
    t = Table(
        title=f"simulation engine, tiny model, {args.steps} local steps per round",
        title_justify="left",
    )
    for c in (
        "sites",
        "round",
        "wall s",
        f"x {args.sites[0]} sites",
        "peak MiB",
        f"x {args.sites[0]} sites",
    ):
        t.add_column(c, justify="right")
    for r in rows:
        b = base[r["round"]]
        t.add_row(
            str(r["sites"]),
            str(r["round"]),
            f"{r['seconds']:.1f}",
            f"{r['seconds'] / b['seconds']:.2f}",
            f"{r['peak_mib']:.0f}",
            f"{r['peak_mib'] / max(b['peak_mib'], 1):.2f}",
        )
    out.print(t)
    for n in args.sites:
        sel = [r for r in rows if r["sites"] == n]
        out.print(
            f"{n} sites: median round {statistics.median(r['seconds'] for r in sel):.1f} s, "
            f"peak {max(r['peak_mib'] for r in sel):.0f} MiB"
        )


if __name__ == "__main__":
    main()
