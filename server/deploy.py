"""Deployment around Flower's own processes: the command lines of `flower-superlink` and
`flower-supernode`, and the `flwr` CLI (register, run, ls) pointed at one SuperLink
through a connection named `fedclif` in $FLWR_HOME/config.toml (default
~/.fedclif/flwr)."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import tomli
import tomli_w
from omegaconf import DictConfig, OmegaConf

from shared.errors import FedclifError

CONNECTION = "fedclif"
# The Flower app (pyproject.toml [tool.flwr.app]) is this checkout.
APP_DIR = Path(__file__).resolve().parent.parent


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise FedclifError(f"{name} not found on PATH: install fedclif (it brings flwr)")
    return path


def superlink_command(pki: Path, host: str, port: int) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication, a persistent database, and
    no dependency installation at run time."""
    for f in ("ca.crt", "server.crt", "server.key"):
        if not (pki / f).is_file():
            raise FedclifError(f"{pki / f} missing: run `fedclif coordinator init` first")
    return [
        _exe("flower-superlink"),
        "--ssl-ca-certfile", str(pki / "ca.crt"),
        "--ssl-certfile", str(pki / "server.crt"),
        "--ssl-keyfile", str(pki / "server.key"),
        "--enable-supernode-auth",
        "--database", str(pki / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip


def supernode_command(
    data: Path,
    superlink: str,
    ca: Path,
    key: Path,
    name: str,
    work_dir: Path | None,
    port: int,
    dp_budget: float | None,
) -> list[str]:
    """`flower-supernode` for one site: TLS to the SuperLink, its authentication key, and
    the site's data path in its node config."""
    for f, what in ((data, "CLIF directory"), (ca, "CA certificate"), (key, "site key")):
        if not f.exists():
            raise FedclifError(f"{what} {f} not found")
    cfg = {"data-path": str(data.resolve()), "site-name": name}
    if work_dir is not None:
        cfg["work-dir"] = str(work_dir.resolve())
    if dp_budget is not None:
        cfg["dp-budget"] = dp_budget
    node_config = " ".join(
        f"{k}={v}" if isinstance(v, float) else f'{k}="{v}"' for k, v in cfg.items()
    )
    return [
        _exe("flower-supernode"),
        "--root-certificates", str(ca),
        "--superlink", superlink,
        "--auth-supernode-private-key", str(key),
        "--node-config", node_config,
        "--port", str(port),
    ]  # fmt: skip


def flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".fedclif" / "flwr")


def connect(superlink: str, ca: Path) -> dict[str, str]:
    """Point the `fedclif` connection at this SuperLink; returns the environment for
    `flwr` commands."""
    if not ca.is_file():
        raise FedclifError(f"CA certificate {ca} not found")
    home = flwr_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    conf = tomli.loads(path.read_text()) if path.is_file() else {}
    conf.setdefault("superlink", {})["default"] = CONNECTION
    conf["superlink"][CONNECTION] = {
        "address": superlink,
        "root-certificates": str(ca.resolve()),
    }
    path.write_text(tomli_w.dumps(conf))
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flwr(args: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([_exe("flwr"), *args], env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise FedclifError(f"`flwr {' '.join(args)}` failed:\n{(r.stdout + r.stderr).strip()}")
    return r


def register(public_key: Path, name: str, env: dict[str, str]) -> str:
    if not public_key.is_file():
        raise FedclifError(f"public key {public_key} not found")
    r = flwr(["supernode", "register", str(public_key), CONNECTION, "--name", name], env)
    return r.stdout.strip()


def start_run(
    fed: DictConfig, out: Path, resume: bool, env: dict[str, str], audit: Path | None = None
) -> str:
    """Submit a run of the fedclif app; returns `flwr run`'s output (with the run id)."""
    run_config = {
        "federation": OmegaConf.to_yaml(fed),
        "out-dir": str(out.resolve()),
        "resume": resume,
        "audit-dir": str(audit.resolve()) if audit else "",
    }
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(tomli_w.dumps(run_config))
    try:
        r = flwr(["run", str(APP_DIR), CONNECTION, "--run-config", f.name], env)
    finally:
        os.unlink(f.name)
    return r.stdout.strip()
