"""Scale of the simulation engine: a federated pretraining run with 2, 8 and 32 virtual
sites (Flower's simulation engine, Ray, one ClientApp per site), for each aggregation:
fedclif's streaming weighted mean and Flower's FedAvg holding every reply
(`federation.strategy.streaming=false`), measured in the same run. Per run: the median
round's wall time, the reply checks' share of it (server/checks.py), the ServerApp
process's peak memory (its own VmHWM, in results.json) and that of everything the engine
runs (SuperLink, ServerApp, Ray and its actors: the RSS of the process tree sampled every
0.2 s), each beside the first site count's as the baseline.

The default model is bench/federation.py's ~80 MB Mamba-2 (`--model tiny`: ~1 MB), so
that N replies held at once show against the ServerApp's ~0.5 GB of imports. In
simulation the ServerApp runs in the process of Flower's simulation engine, which queues
every virtual site's instruction, each with its copy of the weights, at once
(flwr/server/superlink/fleet/vce/vce_api.py): that part grows with the sites in both
arms; the difference between the arms is the replies Flower's FedAvg holds.

    python -m bench.simulate                                   # 2, 8, 32 sites, 2 rounds
    python -m bench.simulate --sites 2 --rounds 1 --model tiny  # quick
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


def run_sites(root: Path, n: int, streaming: bool, args) -> dict:
    """One federated run over n synthetic sites: median round seconds, checks' seconds
    per round, ServerApp peak MiB, engine process-tree peak MiB."""
    from bench.federation import BIG_MODEL
    from fedclif.server.deploy import run_config
    from fedclif.shared.protocol.federation import load_federation
    from fedclif.simulations.engine import SimulationEngine
    from fedclif.simulations.synth import load_preset, write_site

    presets = ["mimic-like", "ucmc-like", "shift-none", "shift-case-mix"]
    sites = []
    for i in range(n):
        d = root / "sites" / f"site{i:02d}"
        if not d.is_dir():
            write_site(load_preset(presets[i % len(presets)]), args.stays, i, d)
        sites.append(d)
    fed = load_federation(
        None,
        [
            *(BIG_MODEL if args.model == "big" else []),
            f"federation.rounds.pretrain={args.rounds}",
            f"federation.min_sites={n}",
            f"federation.strategy.streaming={str(streaming).lower()}",
            "federation.evaluate=false",
            "train.pretrain.context=64",
            "train.pretrain.batch_size=4",
            f"train.pretrain.max_steps={args.steps}",
            "federation.timeout_s=3600",
        ],
    )
    name = f"{n}-{'streaming' if streaming else 'flower'}"
    run_out = root / f"run-{name}"
    samples: list[int] = []
    with SimulationEngine(root / f"engine-{name}", n) as engine:
        pid = engine.procs["superlink"][0].pid
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(_tree_rss(pid))
                time.sleep(0.2)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            ok, why = engine.run(run_config(fed, run_out, False), sites, root / "work")
        finally:
            stop.set()
            t.join()
    if not ok:
        raise RuntimeError(f"the {name} run failed: {why}")
    res = json.loads((run_out / "results.json").read_text())
    assert res["strategy"]["streaming"] is streaming, res["strategy"]
    rounds = res["rounds"]
    return {
        "sites": n,
        "streaming": streaming,
        "seconds": statistics.median(x["seconds"] for x in rounds),
        "checks": statistics.median(x["checks_seconds"] for x in rounds),
        "server_mib": max(x["server_peak_mib"] for x in rounds),
        "tree_mib": max(samples, default=0) / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="local steps per round")
    ap.add_argument("--stays", type=int, default=40, help="stays per synthetic site")
    ap.add_argument("--model", choices=("big", "tiny"), default="big")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sites:
            for streaming in (False, True):
                console.print(f"{n} virtual sites, {'streaming' if streaming else 'Flower'}…")
                rows.append(run_sites(Path(tmp), n, streaming, args))
    first = {r["streaming"]: r for r in rows if r["sites"] == args.sites[0]}
    t = Table(
        title=f"simulation engine, {args.model} model, {args.steps} local step(s) per round",
        title_justify="left",
    )
    for c in (
        "sites",
        "aggregation",
        "round s",
        "checks",
        "ServerApp MiB",
        f"x {args.sites[0]} sites",
        "engine MiB",
        f"x {args.sites[0]} sites",
    ):
        t.add_column(c, justify="right")
    for r in rows:
        b = first[r["streaming"]]
        t.add_row(
            str(r["sites"]),
            "streaming" if r["streaming"] else "Flower FedAvg",
            f"{r['seconds']:.1f}",
            f"{100 * r['checks'] / r['seconds']:.1f}%",
            f"{r['server_mib']:.0f}",
            f"{r['server_mib'] / b['server_mib']:.2f}",
            f"{r['tree_mib']:.0f}",
            f"{r['tree_mib'] / max(b['tree_mib'], 1):.2f}",
        )
    out.print(t)


if __name__ == "__main__":
    main()
