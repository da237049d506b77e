"""A whole deployment on this machine's loopback: a SuperLink with TLS and site
authentication and one SuperNode per site, all real Flower processes started through
`fedclif` commands. For tests, benchmarks and trying fedclif out; every process is
started in its own session and `stop_all` ends each group."""

import os
import re
import subprocess
import sys
from pathlib import Path

from fedclif.server.processes import Processes, free_port, wait_for

FEDCLIF = [sys.executable, "-m", "fedclif.cli"]


class Loopback(Processes):
    """PKI in `root/pki`, logs in `root/<process>.log`, FLWR_HOME in `root/flwr`."""

    def __init__(self, root: Path, sites: list[str]):
        env = {
            **os.environ,
            "FLWR_HOME": str(Path(root) / "flwr"),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        super().__init__(root, env)
        self.sites = list(sites)
        # The sites' door (the front: Fleet API alone) and the coordinator's own side
        # (the SuperLink: Control and Runtime APIs), two endpoints as in a deployment.
        self.port, self.control_port = free_port(), free_port()
        self.link = f"127.0.0.1:{self.port}"
        self.control = f"127.0.0.1:{self.control_port}"
        self.ca = str(self.root / "pki" / "ca.crt")

    def fedclif(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [*FEDCLIF, *args], env=self.env, capture_output=True, text=True, timeout=1800
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"fedclif {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
        return r

    def init(self, extra_sites: list[str] = ()) -> None:
        """The coordinator's PKI, and what each site makes for itself in root/site-<name>:
        its key pair (`site keygen`) and its policy (`site policy init`, the defaults
        with its work directory root/work-<name>)."""
        self.fedclif("coordinator", "init", "--out", str(self.root / "pki"))
        for s in [*self.sites, *extra_sites]:
            self.fedclif("site", "keygen", "--out", str(self.site_dir(s)))
            self.fedclif(
                "site",
                "policy",
                "init",
                str(self.site_dir(s)),
                f"policy.work_dir={self.root / f'work-{s}'}",
            )

    def site_dir(self, site: str) -> Path:
        return self.root / f"site-{site}"

    def start_superlink(self, name: str = "superlink") -> None:
        pki = str(self.root / "pki")
        ports = ["--port", str(self.port), "--control-port", str(self.control_port)]
        self.start(
            name, [*FEDCLIF, "coordinator", "start", "--dir", pki, "--host", "127.0.0.1", *ports]
        )
        for what, address in (("the SuperLink", self.control), ("the front", self.link)):
            up = f"Uvicorn running on https://{address}"
            wait_for(lambda up=up: up in self.log(name), 60, what)

    def register(self, site: str) -> None:
        key = str(self.site_dir(site) / "site.pub")
        self.fedclif(
            "site",
            "register",
            "--key",
            key,
            "--name",
            site,
            "--superlink",
            self.control,
            "--ca",
            self.ca,
        )

    def serve(self, site: str, data: Path, wait: bool = True) -> subprocess.Popen:
        p = self.start(
            f"node-{site}",
            [
                *FEDCLIF,
                "site",
                "serve",
                "--data",
                str(data),
                "--superlink",
                self.link,
                "--ca",
                self.ca,
                "--key",
                str(self.site_dir(site) / "site.key"),
                "--policy",
                str(self.site_dir(site) / "policy.yaml"),
                "--port",
                str(free_port()),
            ],
        )
        if wait:
            wait_for(lambda: "SuperNode ID" in self.log(f"node-{site}"), 60, f"site {site}")
        return p

    def up(self, data: dict[str, Path]) -> None:
        """PKI, SuperLink, every site registered and connected."""
        self.init()
        self.start_superlink()
        for s in self.sites:
            self.register(s)
        for s in self.sites:
            self.serve(s, data[s])

    def wait_run(self, run_id: int, timeout: float = 600) -> None:
        """Until the SuperLink logs that the run's ServerApp finished (read from its log:
        polling `flwr ls` costs seconds of CPU a call)."""
        wait_for(
            lambda: re.search(rf"Finished task \d+ of run {run_id}\b", self.log("superlink")),
            timeout,
            f"run {run_id} to finish",
        )

    def run(self, out: Path, *overrides: str, extra: tuple[str, ...] = ()) -> None:
        self.fedclif(
            "run",
            "--superlink",
            self.control,
            "--ca",
            self.ca,
            "--out",
            str(out),
            *extra,
            *overrides,
        )
