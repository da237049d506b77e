"""Long-running Flower processes started from Python (tests, benchmarks, the local
simulation engine): each in its own session with its log in a file, so that stopping it
ends everything it started."""

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], bool], seconds: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > seconds:
            raise TimeoutError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.5)


class Processes:
    """Named processes with logs in `root/<name>.log`, all started with `env`."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = Path(root), env
        self.root.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, tuple[subprocess.Popen, object]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        p = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = (p, log)
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def stop(self, name: str) -> None:
        """SIGTERM the process's group, SIGKILL what is left after 10 s; then SIGKILL every
        process it had started that is still alive, in its group or not (Ray puts its
        agents in a session of their own, and they outlive a driver killed mid-run)."""
        p, log = self.procs.pop(name)
        try:
            tree = psutil.Process(p.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        for child in tree:
            with contextlib.suppress(psutil.Error):
                child.kill()
        log.close()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)
