"""Where fedclif meets Flower's own programs: its executables, found beside the running
interpreter (a daemon started by systemd or cron has no activated environment), and the
Flower app (FAB) that `flwr run` submits.

The app bundle is written here rather than kept in the repository's pyproject.toml: it
holds only its pyproject (components and run-config defaults), and the components name
the installed `fedclif.*` modules, so every process (SuperLink, SuperNodes, Ray actors)
runs the fedclif installed on its machine, never code that came with the bundle."""

import os
import shutil
import sys
from pathlib import Path

import tomli_w

from fedclif.shared.errors import FedclifError

APP_NAME, PUBLISHER, VERSION = "fedclif", "fedclif", "1.0.0"
CLIENTAPP = "fedclif.client.app:app"


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


def write_app(root: Path, name: str, serverapp: str, config: dict) -> Path:
    """A Flower app directory in `root/name` whose ServerApp is `serverapp` (module:attr),
    with the ClientApp every site runs and `config` as its run-config defaults (the keys
    a run may set)."""
    app = Path(root) / name
    app.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["setuptools>=69"], "build-backend": "setuptools.build_meta"},
        "project": {"name": name, "version": VERSION, "dependencies": []},
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
    (app / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return app
