"""Flower's simulation engine on this machine: `flower-superlink --simulation` on a free
loopback port with one virtual SuperNode per site, and the fedclif app submitted to it
with `flwr run` — the same ServerApp and ClientApp a deployment runs. Virtual node k
reads the k-th CLIF directory of the run config's `sites` (client/app.py)."""

import os
from pathlib import Path

from fedclif.server.deploy import CONNECTION, connect, flwr, save_run_log, submit, wait_run
from fedclif.server.processes import Processes, free_port, wait_for
from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.flower import executable, flower_env


class SimulationEngine(Processes):
    """A simulation SuperLink in `root` (logs, FLWR_HOME), stopped with everything it
    started (the ServerApp process, Ray) on exit. `cpus`/`gpus` are the resources of
    each ClientApp (Ray packs as many as fit); `ray_address` joins an existing Ray
    cluster instead of starting one here."""

    def __init__(
        self,
        root: Path,
        n_sites: int,
        cpus: int = 1,
        gpus: float = 0.0,
        ray_address: str | None = None,
    ):
        env = flower_env({**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"})
        # ray.init() joins the cluster RAY_ADDRESS names; without it, it would join any Ray
        # cluster running on this machine (it looks for one): "local" starts our own.
        env["RAY_ADDRESS"] = ray_address or "local"
        super().__init__(root, env)
        self.n_sites, self.cpus, self.gpus = n_sites, cpus, gpus
        self.link = f"127.0.0.1:{free_port()}"

    def __enter__(self) -> "SimulationEngine":
        exe = executable("flower-superlink")
        host, port = self.link.split(":")
        self.start(
            "superlink",
            [
                exe,
                "--simulation",
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                host,
                "--port",
                port,
            ],
        )
        wait_for(lambda: "Uvicorn running" in self.log("superlink"), 60, "the SuperLink")
        self.env = connect(self.link, None, self.root / "flwr")
        # flwr 1.41 ignores num-supernodes in config.toml: set it on the SuperLink.
        flwr(
            [
                "federation",
                "simulation-config",
                "@none/default",
                CONNECTION,
                "--num-supernodes",
                str(self.n_sites),
                "--client-resources-num-cpus",
                str(self.cpus),
                "--client-resources-num-gpus",
                str(self.gpus),
            ],
            self.env,
        )
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def submit(
        self,
        config: dict,
        sites: list[Path],
        work_root: Path,
        files: dict[str, bytes] | None = None,
    ) -> int:
        """Start a run of the app made of `files` (the coordinator's by default); virtual
        site k keeps its derived files in work_root/<its dir name>."""
        if len(sites) != self.n_sites:
            raise FedclifError(f"{len(sites)} sites given to an engine of {self.n_sites}")
        for s in sites:
            if not Path(s).is_dir():
                raise FedclifError(f"site directory {s} not found")
        names = [Path(s).name for s in sites]
        if len(set(names)) != len(names):
            raise FedclifError(f"site directories need distinct names, got {names}")
        return submit(
            {
                **config,
                "sites": ",".join(str(Path(s).resolve()) for s in sites),
                "work-root": str(Path(work_root).resolve()),
            },
            self.env,
            files,
        )

    def run(self, config: dict, sites: list[Path], work_root: Path) -> tuple[bool, str]:
        """Submit and wait: (whether the run completed, the error that ended it)."""
        run_id = self.submit(config, sites, work_root)
        if wait_run(run_id, self.env):
            return True, ""
        return False, self.save_log(run_id)

    def save_log(self, run_id: int) -> str:
        """The run's ServerApp output (kept by the SuperLink, gone with the engine) in
        `root/run-<id>.log`; returns the error that ended it, and where the log is."""
        path = self.root / f"run-{run_id}.log"
        error = save_run_log(run_id, self.env, path) or "no error in the log"
        return f"{error}; the ServerApp's whole log: {path}"
