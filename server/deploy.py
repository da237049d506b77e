"""Deployment around Flower's own processes: the command lines of `flower-superlink` and
`flower-supernode`, and the `flwr` CLI (register, run, ls) pointed at one SuperLink
through a connection named `fedclif` in $FLWR_HOME/config.toml (default
~/.fedclif/flwr)."""

import hashlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import httpx
import tomli_w
from omegaconf import DictConfig, OmegaConf

from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.flower import (
    app_files,
    executable,
    flower_env,
    write_app,
)

CONNECTION = "fedclif"
# Where the coordinator's own commands reach the SuperLink (`coordinator start`).
CONTROL_HINT = (
    "the SuperLink's Control API answers on the coordinator's host alone: run this there "
    "with --superlink 127.0.0.1:<its --control-port> (default 9095), or through an SSH tunnel "
    "(ssh -L 9095:127.0.0.1:9095 coordinator)"
)


def superlink_command(pki: Path, host: str, port: int) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication, a persistent database, and
    no dependency installation at run time."""
    for f in ("ca.crt", "server.crt", "server.key"):
        if not (pki / f).is_file():
            raise FedclifError(f"{pki / f} missing: run `fedclif coordinator init` first")
    return [
        executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(pki / "ca.crt"),
        "--ssl-certfile",
        str(pki / "server.crt"),
        "--ssl-keyfile",
        str(pki / "server.key"),
        "--enable-supernode-auth",
        "--database",
        str(pki / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]


def coordinator(pki: Path, host: str, port: int, control_port: int) -> int:
    """The coordinator's processes: the SuperLink on loopback (`control_port`: Control,
    Runtime and Fleet APIs, for this host alone) and, in this process, the front on
    host:port (server/front.py: the Fleet API alone, for the sites). Either ending ends
    both; returns the SuperLink's exit status."""
    from fedclif.server.front import serve_front  # uvicorn and httpx: this command only

    cmd = superlink_command(pki, "127.0.0.1", control_port)
    superlink = subprocess.Popen(cmd, env=flower_env())

    def watch() -> None:  # a SuperLink that dies takes the front down with it
        superlink.wait()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    try:
        serve_front(host, port, f"127.0.0.1:{control_port}", pki)
    finally:
        if superlink.poll() is None:
            superlink.terminate()
            try:
                superlink.wait(timeout=10)
            except subprocess.TimeoutExpired:
                superlink.kill()
    return superlink.wait()


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".fedclif" / "flwr")


def connect(superlink: str, ca: Path | None, home: Path | None = None) -> dict[str, str]:
    """Point the `fedclif` connection at this SuperLink (TLS with `ca`; None: plaintext,
    only for the local simulation engine); returns the environment for `flwr` commands."""
    if ca is not None and not ca.is_file():
        raise FedclifError(f"CA certificate {ca} not found")
    home = home or flwr_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    conf = tomllib.loads(path.read_text()) if path.is_file() else {}
    conf.setdefault("superlink", {})["default"] = CONNECTION
    conf["superlink"][CONNECTION] = {"address": superlink} | (
        {"root-certificates": str(ca.resolve())} if ca is not None else {"insecure": True}
    )
    path.write_text(tomli_w.dumps(conf))
    return flower_env({**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"})


def flwr(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([executable("flwr"), *args], env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        said = (r.stdout + r.stderr).strip()
        hint = f"\n{CONTROL_HINT}" if "404 Not Found" in said else ""
        raise FedclifError(f"`flwr {' '.join(args)}` failed:\n{said}{hint}")
    return r


SITES_FILE = "sites.json"


def register(public_key: Path, name: str, env: dict[str, str]) -> str:
    """Let a site's key join under `name`. Names are unique per SuperLink (the run's
    records are kept by site name): kept, with each key's fingerprint, in
    $FLWR_HOME/sites.json, since Flower does not list the names it was given."""
    if not public_key.is_file():
        raise FedclifError(f"public key {public_key} not found")
    registry = Path(env["FLWR_HOME"]) / SITES_FILE
    link = tomllib.loads((Path(env["FLWR_HOME"]) / "config.toml").read_text())
    address = link["superlink"][CONNECTION]["address"]
    known = json.loads(registry.read_text()) if registry.is_file() else {}
    names = known.setdefault(address, {})
    key = hashlib.sha256(public_key.read_bytes()).hexdigest()[:16]
    if name in names and names[name] != key:
        raise FedclifError(
            f"site name {name!r} is already registered at {address} with another key "
            f"({names[name]}): choose another --name"
        )
    r = flwr(["supernode", "register", str(public_key), CONNECTION, "--name", name], env)
    names[name] = key
    registry.write_text(json.dumps(known, indent=1))
    return r.stdout.strip()


def run_config(config: DictConfig, out: Path, resume: bool, audit: Path | None = None) -> dict:
    """The ServerApp's run config for a federated run (server/app.py)."""
    return {
        "config": OmegaConf.to_yaml(config),
        "out-dir": str(out.resolve()),
        "resume": resume,
        "audit-dir": str(audit.resolve()) if audit else "",
    }


def submit(config: dict, env: dict[str, str], files: dict[str, bytes] | None = None) -> int:
    """Start a run of the Flower app made of `files` (default: the coordinator's app of
    this release, shared/protocol/flower.py `app_files`) with this run config; its run id."""
    with tempfile.TemporaryDirectory(prefix="fedclif-app-") as tmp:
        app = write_app(Path(tmp), files or app_files())
        conf = Path(tmp) / "run-config.toml"
        conf.write_text(tomli_w.dumps(config))
        text = flwr(["run", str(app), CONNECTION, "--run-config", str(conf)], env).stdout
    m = re.search(r"run (\d+)", text)
    if not m:
        raise FedclifError(f"could not read the run id from `flwr run`:\n{text}")
    return int(m.group(1))


def list_runs(env: dict[str, str], run_id: int | None = None) -> dict:
    """The SuperLink's runs (or only `run_id`), by id: Flower's Run records. Asked in this
    process over the Control API, as `flwr ls` asks it: a `flwr` subprocess costs ~1.7 s
    of CPU a call, too much to poll with."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.proto.control_pb2 import ListRunsRequest
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    conf = tomllib.loads((Path(env["FLWR_HOME"]) / "config.toml").read_text())
    link = conf["superlink"][CONNECTION]
    client = ControlHttpClient.from_server_address(
        server_address=link["address"],
        insecure=bool(link.get("insecure", False)),
        root_certificates=link.get("root-certificates"),
        interceptors=[
            CliClientHttpInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
        ],
    )
    try:
        request = ListRunsRequest() if run_id is None else ListRunsRequest(run_id=run_id)
        return dict(client.ListRuns(request).run_dict)
    except httpx.HTTPStatusError as e:
        if e.response.status_code != 404:
            raise
        raise FedclifError(
            f"{link['address']} does not answer the Control API: {CONTROL_HINT}"
        ) from e
    finally:
        client.close()


def status_text(run) -> str:
    """A run's status as `flwr ls` words it: pending | starting | running | finished:<result>."""
    s = run.status
    return f"{s.status}:{s.sub_status}" if s.sub_status else s.status


def run_status(run_id: int, env: dict[str, str]) -> str:
    """The status of one run (`status_text`), or "unknown"."""
    runs = list_runs(env, run_id)
    return status_text(runs[run_id]) if run_id in runs else "unknown"


def save_run_log(run_id: int, env: dict[str, str], path: Path) -> str:
    """The run's ServerApp log (kept by the SuperLink) into `path`; returns its last error
    line (the exception that ended the run), or "" when it shows none."""
    r = flwr(["log", str(run_id), CONNECTION, "--show"], env, check=False)
    text = r.stdout + r.stderr
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    errors = re.findall(r"^\s*((?:[\w.]+\.)?\w*(?:Error|Exception)\b: .+)$", text, re.MULTILINE)
    return errors[-1].strip() if errors else ""


def wait_run(run_id: int, env: dict[str, str], poll_s: float = 2.0) -> bool:
    """Block until the run ends; True when it completed."""
    while run_status(run_id, env).startswith(("pending", "starting", "running")):
        time.sleep(poll_s)
    return run_status(run_id, env).endswith("completed")
