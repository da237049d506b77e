"""A study on a real Ray cluster: `ray start --head` on loopback, the study pointed at it
with `study.engine.ray_address`, the same results as Flower's embedded Ray."""

import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from conftest import quick_study

from fedclif.cli import main
from fedclif.server.processes import Processes, free_port, wait_for

pytestmark = pytest.mark.slow  # real processes throughout

# The smallest study with every arm: one seed, one task, one share, a handful of steps.
TINY = [
    "study.sites.source.stays=300",
    "study.sites.target.stays=300",
    "study.sites.third=null",
    "study.seeds=[0]",
    "study.tasks=[long_los]",
    "study.fractions=[1.0]",
    "study.pretrain.rounds=1",
    "study.pretrain.steps_per_round=2",
    "study.finetune_steps=2",
    "train.finetune.n_boot=20",
    "train.probe.n_boot=20",
    "study.objectives=[{name: next_token, objectives: {next_token: 1.0}}]",
]


def test_a_study_on_a_ray_cluster_equals_the_embedded_engine(tmp_path):
    """`study.engine.ray_address` on a real Ray head (`ray start --head` on loopback, its
    own ports and temp dir, stopped afterwards): the same rows as Flower's embedded Ray,
    which does not join the head although it runs on this machine."""
    ports = {k: free_port() for k in ("gcs", "client", "dashboard", "agent")}
    # Ray's sockets live under its temp dir, and a socket path has at most 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    ray = Processes(tmp_path / "ray", dict(os.environ))
    head = ray.start(
        "head",
        [
            shutil.which("ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(ports["gcs"]),
            "--ray-client-server-port",
            str(ports["client"]),
            "--dashboard-port",
            str(ports["dashboard"]),
            "--dashboard-agent-listen-port",
            str(ports["agent"]),
            "--include-dashboard",
            "false",
            "--num-cpus",
            "2",
            "--temp-dir",
            str(ray_tmp),
            "--disable-usage-stats",
        ],
    )
    try:
        wait_for(
            lambda: "block forever" in ray.log("head") or head.poll() is not None,
            120,
            "the Ray head",
        )
        assert head.poll() is None, ray.log("head")
        rows = {}
        for engine, extra in (
            ("embedded", []),
            ("cluster", [f"study.engine.ray_address=127.0.0.1:{ports['gcs']}"]),
        ):
            out = tmp_path / engine
            assert main(quick_study(out, tmp_path / "cache", *TINY, *extra)) == 0
            rows[engine] = json.loads((out / "results.json").read_text())["rows"]
            # Which Ray the run used: a driver that joins the head leaves its log there. (The
            # embedded engine sets RAY_ADDRESS=local: a head started with Ray's default temp
            # dir would otherwise be found and joined; this one has its own temp dir.)
            drivers = list(ray_tmp.glob("session_*/logs/python-core-driver-*"))
            assert bool(drivers) is (engine == "cluster"), (engine, drivers)
    finally:
        ray.stop_all()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything the head left in its group
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rows["cluster"] == rows["embedded"]
    assert {(r["arm"], r["setting"]) for r in rows["cluster"]} >= {
        ("source_only", "in_distribution"),
        ("federated_finetuned", "local_finetune"),
        ("pooled", "pooled"),
        ("gbm", "zero_shot"),
    }
