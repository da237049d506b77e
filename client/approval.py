"""Approved code only: a site runs the ClientApp of a Flower app bundle (FAB) only when
the bundle's hash is one it approved, and checks that before any of the bundle's code is
installed or imported.

Approved by default: the bundle of the fedclif release installed here (shared/protocol/flower.py
`app_files`), so sites and a coordinator on one release work without a step. `fedclif
site approve FAB_OR_HASH` adds another after review (APPROVED_FILE in the work directory).

How it is enforced: Flower 1.41 can verify signed bundles (`--trusted-entities`) only
with a licensed SuperLink, and `flwr-clientapp` has no hook to vet a bundle. So `site
serve` puts two launchers of ours first on the SuperNode's PATH, under the names Flower
starts them by:
- `flower-superexec` (the SuperNode starts it; it starts a process per task): Flower's
  own, launching client apps only. A task of any other type (an agent app, a model, a
  connector, whatever Flower adds next) is refused and logged with its bundle's hash:
  an allow-list, since each type is a launcher that installs and runs a bundle's code.
- `flwr-clientapp`: Flower's own with its bundle installation and app loading wrapped,
  so an unapproved bundle is neither installed nor imported; its message is answered
  with the error category `unapproved_app`."""

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from flwr.app import Error, Message

from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import ERROR_CODE
from fedclif.shared.protocol.flower import app_files, fab_hash

APPROVED_FILE = "approved-apps.json"
# How `client_apps_only` hands a client app its task token.
TOKEN_STDIN = "--token-stdin"
SHIM_DIR = "bin"
log = logging.getLogger(__name__)


def release_hash() -> str:
    """The hash of the coordinator's bundle of the installed fedclif release."""
    return fab_hash(app_files())


def approved(work: Path) -> dict[str, str]:
    """Hash -> why it is approved: this release's bundle, then those the site added."""
    return {release_hash(): "the installed fedclif release"} | {
        a["hash"]: a["note"] for a in _added(work)
    }


def _added(work: Path) -> list[dict]:
    """The bundles the site approved itself (APPROVED_FILE)."""
    path = Path(work) / APPROVED_FILE
    return json.loads(path.read_text())["approved"] if path.is_file() else []


def approve(work: Path, fab_or_hash: str, note: str) -> str:
    """Add a bundle (a .fab file, or its SHA-256) to the site's approved set; its hash."""
    path = Path(fab_or_hash)
    if path.is_file():
        h = hashlib.sha256(path.read_bytes()).hexdigest()
    elif len(fab_or_hash) == 64 and all(c in "0123456789abcdef" for c in fab_or_hash.lower()):
        h = fab_or_hash.lower()
    else:
        raise FedclifError(f"{fab_or_hash} is neither a .fab file nor a SHA-256 hash (64 hex)")
    added = _added(work)
    if h not in {a["hash"] for a in added}:
        added.append({"hash": h, "note": note, "time": time.time()})
        tmp = Path(work) / f"{APPROVED_FILE}.tmp"
        tmp.write_text(json.dumps({"approved": added}, indent=1))
        tmp.replace(Path(work) / APPROVED_FILE)
    return h


def write_shims(work: Path) -> Path:
    """work/bin/flower-superexec and work/bin/flwr-clientapp: this interpreter running
    `gated_superexec` and `gated_clientapp` with the site's work directory. Returns the
    directory, to put first on the SuperNode's PATH."""
    bin_dir = Path(work) / SHIM_DIR
    bin_dir.mkdir(mode=0o700, exist_ok=True)
    shims = {"flower-superexec": "gated_superexec", "flwr-clientapp": "gated_clientapp"}
    for name, fn in shims.items():
        shim = bin_dir / name
        shim.write_text(
            f"#!{sys.executable}\n"
            f"from fedclif.client.approval import {fn}\n"
            f"{fn}({str(Path(work).resolve())!r})\n"
        )
        shim.chmod(stat.S_IRWXU)
    return bin_dir


def _record(work: Path, category: str, line: str) -> None:
    """A refusal in the site's log (stderr, which the SuperNode's log receives) and in
    its work directory's errors.log."""
    log.error(line)
    with open(Path(work) / "errors.log", "a") as f:
        f.write(f"--- {category}\n{line}\n")


def client_apps_only(work: Path):
    """Flower's SuperExec plugin, launching client apps only (see the module's doc)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    class ClientAppsOnly(AutoExecPlugin):
        def launch_task(self, token: str, task) -> LaunchResult:
            if task.type != TaskType.CLIENT_APP:
                bundle = task.fab_hash or "(none)"
                why = f"refused a {task.type} task of app bundle {bundle}: client apps only"
                _record(work, "unapproved_launcher", why)
                return LaunchResult.failed(f"{task.type} is not run at this site")
            # Flower's SubprocessExecutor, but for the token: on the client app's standard
            # input (read by `gated_clientapp`), not its command line, which `ps` shows
            # to every account on the machine.
            command = TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP]
            args = [command, "--runtime-api-address", self.runtime_api_address, TOKEN_STDIN]
            args += ["--parent-pid", str(os.getpid())]
            if self.insecure:
                args.append("--insecure")
            elif self.root_certificates_path is not None:
                args += ["--root-certificates", self.root_certificates_path]
            if self.runtime_dependency_install:
                args.append("--allow-runtime-dependency-installation")
            p = subprocess.Popen(args, stdin=subprocess.PIPE)
            p.stdin.write(f"{token}\n".encode())
            p.stdin.close()
            return LaunchResult.accepted()

    return ClientAppsOnly


def gated_superexec(work: str) -> None:
    """Flower's `flower-superexec` with `client_apps_only` as its plugin."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec

    run_superexec.AutoExecPlugin = client_apps_only(Path(work))
    flower_superexec()


def gated_clientapp(work: str) -> None:
    """Flower's `flwr-clientapp`, refusing bundles the site (work directory `work`) did
    not approve. The approved set is read for every message: an approval needs no
    restart."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    work = Path(work)
    ok = approved(work)
    install, loader = runtime.install_from_fab, runtime.get_load_client_app_fn
    refused: list[str] = []

    def checked_install(content: bytes, *args, **kwargs):
        h = hashlib.sha256(content).hexdigest()
        if h not in ok:
            refused.append(h)
            why = (
                f"refused app bundle {h}: not approved at this site (approved: "
                f"{', '.join(ok)}); after review, `fedclif site approve {h}`"
            )
            _record(work, "unapproved_app", why)
            return None
        return install(content, *args, **kwargs)

    def checked_loader(*args, **kwargs):
        if refused:
            return _refusal(refused[0])
        return loader(*args, **kwargs)

    runtime.install_from_fab = checked_install
    runtime.get_load_client_app_fn = checked_loader
    if TOKEN_STDIN in sys.argv:  # from `client_apps_only`: the token, off the command line
        i = sys.argv.index(TOKEN_STDIN)
        sys.argv[i : i + 1] = ["--token", sys.stdin.readline().strip()]  # this process only
    flwr_clientapp()


def _refusal(h: str):
    """A stand-in for the refused bundle's app loader: its ClientApp answers every message
    with `unapproved_app`."""

    def refuse(message: Message, context) -> Message:
        reason = f"unapproved_app: bundle {h[:16]} is not approved at this site"
        return Message(Error(code=ERROR_CODE["unapproved_app"], reason=reason), reply_to=message)

    return lambda *args, **kwargs: refuse
