"""`fedclif coordinator init|start`, `fedclif site register`, `fedclif run`,
`fedclif status`: shells over server/deploy.py and server/pki.py."""

import argparse
from collections.abc import Callable
from pathlib import Path

from fedclif.server import deploy
from fedclif.server.deploy import (
    connect,
    run_config,
    save_run_log,
    submit,
    wait_run,
)
from fedclif.server.pki import init_pki
from fedclif.shared.config import add_arguments
from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import RUN_SECTIONS, load_federation
from fedclif.shared.ui import console, out


def cmd_init(args: argparse.Namespace) -> int:
    dev = [s.strip() for s in (args.dev_site_keys or "").split(",") if s.strip()]
    paths = init_pki(args.out, args.hosts.split(","), dev)
    out.print(f"wrote a development CA and server certificate to {args.out}")
    for s, d in paths.items():
        out.print(f"  test site {s}: {d / 'site.key'} (a coordinator-made key: tests only)")
    out.print(
        f"next: give {Path(args.out) / 'ca.crt'} to every site; each runs `fedclif site "
        "keygen` and sends you its site.pub; then fedclif coordinator start --dir DIR --host "
        "HOST and, on this host, fedclif site register --key site.pub --name <name> "
        "--superlink 127.0.0.1:9095 ..."
    )
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    console.print(
        f"sites connect to {args.host}:{args.port} (the Fleet API alone, TLS, registered keys); "
        f"fedclif run/status/site register use 127.0.0.1:{args.control_port} on this host"
    )
    # The SuperLink's status: negative when this command stopped it on a signal.
    status = deploy.coordinator(Path(args.dir), args.host, args.port, args.control_port)
    return 0 if status <= 0 else 1


def _connect(args: argparse.Namespace) -> dict[str, str]:
    return connect(args.superlink, Path(args.ca))


def cmd_register(args: argparse.Namespace) -> int:
    out.print(deploy.register(Path(args.key), args.name, _connect(args)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    fed = load_federation(args.config, args.overrides)
    out_dir = Path(args.out)
    config = run_config(fed, out_dir, args.resume, Path(args.audit) if args.audit else None)
    if not (args.superlink and args.ca):
        raise FedclifError("fedclif run needs --superlink and --ca (or --sites to simulate)")
    env = _connect(args)
    run_id = submit(config, env)
    out.print(f"run {run_id} started; coordinator files in {args.out}")
    if args.detach:
        return 0
    with console.status(f"run {run_id}: waiting for it to finish"):
        ok = wait_run(run_id, env)
    if not ok:
        log = out_dir / f"run-{run_id}.log"
        error = save_run_log(run_id, env, log) or "no error in the log"
        out.print(f"run {run_id} failed: {error}\nthe ServerApp's whole log: {log}", soft_wrap=True)
        return 1
    out.print(f"run {run_id}: completed")
    if (out_dir / "results.json").is_file():
        out.print(f"results: {out_dir / 'results.json'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The SuperLink's runs, one line each (plain lines: a table would truncate run ids
    in a narrow terminal): id, status, app bundle, when it started and finished."""
    runs = deploy.list_runs(_connect(args))
    out.print(f"{len(runs)} run(s) at {args.superlink}")
    for run_id, r in sorted(runs.items()):
        out.print(
            f"{run_id}  {deploy.status_text(r)}  app {r.fab_hash[:12]}  "
            f"started {(r.running_at or r.pending_at)[:19]}  finished {r.finished_at[:19] or '-'}",
            soft_wrap=True,
        )
    return 0


def register(sub, groups: dict, add: Callable) -> None:
    """Add the coordinator's commands to the `fedclif` parser; `groups["run"]` becomes
    the `run` parser (simulations/ adds `--sites` to it)."""

    def link(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--superlink", required=required, help="HOST:PORT of the SuperLink")
        p.add_argument(
            "--ca", required=required, help="CA certificate the SuperLink's is signed by"
        )

    co = add(sub, "coordinator", None, "run the federation's SuperLink")
    csub = co.add_subparsers(dest="coordinator_command", required=True)
    p = add(csub, "init", cmd_init, "development CA and server certificate")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--dev-site-keys",
        metavar="NAMES",
        help="local tests only: also make these sites' key pairs here (a coordinator that "
        "holds a site's private key can impersonate it; real sites run `site keygen`)",
    )
    p.add_argument("--hosts", default="localhost,127.0.0.1", help="names the server cert covers")
    p = add(csub, "start", cmd_start, "the SuperLink (TLS, site authentication, a database)")
    p.add_argument("--dir", required=True, help="the coordinator init directory")
    p.add_argument(
        "--host", required=True, help="the address the sites reach (only the Fleet API answers)"
    )
    p.add_argument("--port", type=int, default=9093, help="the sites' port")
    p.add_argument(
        "--control-port",
        type=int,
        default=9095,
        help="the SuperLink itself, on 127.0.0.1 only: fedclif run, status, site register",
    )
    p = add(
        groups["site"], "register", cmd_register, "allow a site's key to join (coordinator side)"
    )
    p.add_argument("--key", required=True, help="the site's public key (site.pub)")
    p.add_argument("--name", required=True)
    link(p)
    p = groups["run"] = add(sub, "run", cmd_run, "launch a federated run and follow it")
    p.add_argument("--out", default="runs/federation", help="coordinator-side outputs")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument("--detach", action="store_true", help="submit and return")
    p.add_argument("--audit", help="write every site reply's records here, to inspect")
    add_arguments(p, RUN_SECTIONS, "federation.rounds.pretrain=3 train.pretrain.max_steps=50")
    link(p, required=False)
    p = add(sub, "status", cmd_status, "runs on the SuperLink and their state")
    link(p)
