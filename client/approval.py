"""Approved code only: a site runs the ClientApp of a Flower app bundle (FAB) only when
the bundle's hash is one it approved, and checks that before any of the bundle's code is
installed or imported.

Approved by default: the bundle of the fedclif release installed here (shared/flower.py
`app_files`), so sites and a coordinator on one release work without a step. `fedclif
site approve FAB_OR_HASH` adds another after review (APPROVED_FILE in the work directory).

How it is enforced: Flower 1.41 can verify signed bundles (`--trusted-entities`) only
with a licensed SuperLink, and `flwr-clientapp` has no hook to vet a bundle. So `site
serve` puts a `flwr-clientapp` of ours first on the SuperNode's PATH (Flower's SuperExec
starts it by that name): it runs Flower's own `flwr-clientapp` with its bundle
installation and app loading wrapped, and an unapproved bundle is neither installed nor
imported; its message is answered with the error category `unapproved_app`."""

import hashlib
import json
import logging
import stat
import sys
import time
from pathlib import Path

from flwr.app import Error, Message

from fedclif.shared.errors import FedclifError
from fedclif.shared.federation import ERROR_CODE
from fedclif.shared.flower import app_files, fab_hash

APPROVED_FILE = "approved-apps.json"
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


def write_clientapp_shim(work: Path) -> Path:
    """work/bin/flwr-clientapp: this interpreter running `gated_clientapp` with the
    site's work directory. Returns the directory, to put first on the SuperNode's PATH."""
    bin_dir = Path(work) / SHIM_DIR
    bin_dir.mkdir(mode=0o700, exist_ok=True)
    shim = bin_dir / "flwr-clientapp"
    shim.write_text(
        f"#!{sys.executable}\n"
        "from fedclif.client.approval import gated_clientapp\n"
        f"gated_clientapp({str(Path(work).resolve())!r})\n"
    )
    shim.chmod(stat.S_IRWXU)
    return bin_dir


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
            log.error("refused app bundle %s: not approved at this site (approved: %s); "
                      "after review, `fedclif site approve %s`", h, ", ".join(ok), h)  # fmt: skip
            with open(work / "errors.log", "a") as f:
                f.write(f"--- unapproved_app\nrefused app bundle {h}\n")
            return None
        return install(content, *args, **kwargs)

    def checked_loader(*args, **kwargs):
        if refused:
            return _refusal(refused[0])
        return loader(*args, **kwargs)

    runtime.install_from_fab = checked_install
    runtime.get_load_client_app_fn = checked_loader
    flwr_clientapp()


def _refusal(h: str):
    """A stand-in for the refused bundle's app loader: its ClientApp answers every message
    with `unapproved_app`."""

    def refuse(message: Message, context) -> Message:
        reason = f"unapproved_app: bundle {h[:16]} is not approved at this site"
        return Message(Error(code=ERROR_CODE["unapproved_app"], reason=reason), reply_to=message)

    return lambda *args, **kwargs: refuse
