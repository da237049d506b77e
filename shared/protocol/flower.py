"""Where fedclif meets Flower's own programs: its executables, found beside the running
interpreter (a daemon started by systemd or cron has no activated environment), and the
Flower app (FAB) that `flwr run` submits.

The app bundle is written here rather than kept in the repository's pyproject.toml: it
holds only its pyproject (components and run-config defaults), and the components name
the installed `fedclif.*` modules, so every process (SuperLink, SuperNodes, Ray actors)
runs the fedclif installed on its machine, never code that came with the bundle. Its
version is the installed fedclif's, so the bundle of a release is one FAB with one hash
(Flower builds FABs byte-reproducibly): the hash a site approves by default
(client/approval.py)."""

import hashlib
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import tomli_w
from flwr.cli.build import build_fab_from_files

from fedclif.shared.errors import FedclifError

APP_NAME, PUBLISHER = "fedclif", "fedclif"
CLIENTAPP = "fedclif.client.app:app"
# The coordinator's Flower app: its ServerApp and the run-config keys it reads.
SERVERAPP = "fedclif.server.app:app"
RUN_CONFIG = {
    "config": "",
    "out-dir": "runs/federation",
    "resume": False,
    "audit-dir": "",
    "sites": "",
    "work-root": "",
}


def executable(name: str) -> str:
    """A console script installed with fedclif (`flwr`, `flower-superlink`, ...): the one
    beside this interpreter first, else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedclifError(
            f"{name} not found beside {sys.executable} nor on PATH: install fedclif (it brings "
            "flwr) into this environment"
        )
    return found


def flower_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with this interpreter's bin directory first on
    PATH: Flower starts its own helpers (`flwr-serverapp`, `flwr-simulation`,
    `flwr-clientapp`) by name, and they must be this environment's."""
    env = dict(os.environ if env is None else env)
    here = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([here, *(p for p in env.get("PATH", "").split(os.pathsep) if p)])
    return env


def app_files(serverapp: str = SERVERAPP, config: dict = RUN_CONFIG) -> dict[str, bytes]:
    """The files of the Flower app whose ServerApp is `serverapp` (module:attr), with the
    ClientApp every site runs and `config` as its run-config defaults (the keys a run may
    set). Defaults: the coordinator's app of this release."""
    pyproject = {
        "build-system": {"requires": ["setuptools>=69"], "build-backend": "setuptools.build_meta"},
        "project": {"name": APP_NAME, "version": version("fedclif"), "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": serverapp, "clientapp": CLIENTAPP},
                    "config": config,
                }
            }
        },
    }
    return {"pyproject.toml": tomli_w.dumps(pyproject).encode()}


def write_app(root: Path, files: dict[str, bytes]) -> Path:
    """The app's files in the directory `root/fedclif` (what `flwr run` takes)."""
    app = Path(root) / APP_NAME
    for name, content in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_bytes(content)
    return app


def fab_hash(files: dict[str, bytes]) -> str:
    """The SHA-256 of the FAB `flwr run` builds from these files (Flower's FAB hash)."""
    return hashlib.sha256(build_fab_from_files(files)[0]).hexdigest()
