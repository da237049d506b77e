"""Federated runs on Flower's simulation engine (real SuperLink in simulation mode, Ray
virtual SuperNodes, the same ServerApp/ClientApp as deployment)."""

import contextlib
import json
import os
import signal
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest
import tomli_w
from conftest import quick_study
from safetensors.numpy import load_file

from fedclif.client.ledger import Ledger
from fedclif.server.deploy import run_config, wait_run
from fedclif.server.loopback import FEDCLIF
from fedclif.server.processes import wait_for
from fedclif.server.run import FederatedRun
from fedclif.shared.model.models import get_weights, load_model
from fedclif.shared.protocol.federation import load_federation
from fedclif.shared.protocol.flower import RUN_CONFIG, SERVERAPP, app_files
from fedclif.shared.tokens.tokenizer import Tokenizer
from fedclif.simulations.engine import SimulationEngine
from fedclif.simulations.synth import load_preset, write_site

pytestmark = pytest.mark.slow  # real processes throughout

RUN = [
    "federation.rounds.pretrain=3",
    "federation.rounds.finetune=1",
    "train.pretrain.context=64",
    "train.pretrain.batch_size=8",
    # Rounds long enough (~seconds) that the interruption lands inside pretraining (at 10
    # steps, a loaded machine saw all three rounds end before the engine stopped).
    "train.pretrain.max_steps=20",
    "train.finetune.context=64",
    "train.finetune.max_steps=2",
    "train.finetune.peft=lora",
    "train.finetune.n_boot=50",
    "federation.timeout_s=120",
]


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim-sites")
    out = []
    for i, preset in enumerate(("mimic-like", "ucmc-like")):
        out.append(root / preset)
        # Test splits large enough that the default policy lets long stay's metrics leave.
        write_site(load_preset(preset), 250, i + 1, out[-1])
    return out


def _leftovers(root) -> list[str]:
    """Processes still running whose command line names this test's directory (the
    SuperLink, the ServerApp process, Ray's workers)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if str(root) in line]


# MedHMP's two stages (with LLM4EHR's alignment) over four pretraining rounds (rounds 1-2
# stay level, 3-4 admission level): the objectives' heads travel and aggregate.
STAGED = [
    "train.pretrain.stages=[{objectives: {next_token: 1, stay_recon: 1, ts_align: 1}, share: 0.5},"
    "{objectives: {next_token: 1, masked_codes: 1, code_contrast: 1}, share: 0.5}]",
    # Two 5-hour patches a stay: enough to align, and the series pass stays short.
    "train.pretrain.ts.hours=10",
    "train.pretrain.ts.stay_hours=10",
]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(sites, tmp_path):
    fed = load_federation(None, RUN)
    # The uninterrupted run is compared by its weights alone: no evaluation round.
    fed_whole = load_federation(None, [*RUN, "federation.evaluate=false"])
    whole, cut = tmp_path / "whole", tmp_path / "cut"

    def checkpointed(n: int) -> bool:
        state = cut / "checkpoint" / "state.json"
        return state.is_file() and json.loads(state.read_text())["round"] >= n

    # The interrupted run's coordinator dies right after round 1's checkpoint
    # (tests/simulations/interrupt_app.py): the same point on a fast machine as on a slow one.
    files = app_files("interrupt_app:app", {**RUN_CONFIG, "die-after-round": 0})
    files["interrupt_app.py"] = (Path(__file__).parent / "interrupt_app.py").read_bytes()
    with SimulationEngine(tmp_path / "engine-1", len(sites)) as engine:
        ok, why = engine.run(run_config(fed_whole, whole, False), sites, tmp_path / "work")
        assert ok, why
        dying = {**run_config(fed, cut, False), "die-after-round": 1}
        engine.submit(dying, sites, tmp_path / "work", files)
        wait_for(lambda: checkpointed(1), 300, "round 1 of the run to interrupt")
    # The engine (SuperLink, ServerApp process, Ray) is gone mid-run.
    assert not _leftovers(tmp_path / "engine-1")
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert (state["phase"], state["round"]) == ("pretrain", 1)
    round_one = state["history"][0]["ended"]
    # What a kill between a checkpoint's two renames leaves: the newest round complete
    # under its temporary name, no `checkpoint` (server/checkpoint.py; every crash point
    # is in test_server_site.py). The resumed run starts from there.
    (cut / "checkpoint").rename(cut / "checkpoint.tmp")
    with SimulationEngine(tmp_path / "engine-2", len(sites)) as engine:
        ok, why = engine.run(run_config(fed, cut, True), sites, tmp_path / "work")
        assert ok, why

    # Pretraining, then LoRA finetuning on its result: both phases end where the
    # uninterrupted run's did.
    for f in ("weights", "base"):
        a = load_file(str(whole / "checkpoint" / f"{f}.safetensors"))
        b = load_file(str(cut / "checkpoint" / f"{f}.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
    r = json.loads((cut / "results.json").read_text())
    assert [(x["phase"], x["round"]) for x in r["rounds"]] == [
        ("pretrain", 1),
        ("pretrain", 2),
        ("pretrain", 3),
        ("finetune", 1),
    ]
    assert r["rounds"][0]["ended"] == round_one  # resumed, not run again from the start
    # LoRA rounds move adapters and the head only: a small fraction of the full weights.
    assert r["rounds"][3]["bytes_received"] < r["rounds"][0]["bytes_received"] / 5
    assert set(r["evaluation"]["sites"]) == {s.name for s in sites}
    assert 0 <= r["evaluation"]["weighted"]["long_los_auroc"] <= 1
    # The global model is a checkpoint any site can finetune or probe (LoRA: on its base).
    model, meta = load_model(cut / "model")
    assert meta["stage"] == "finetune" and meta["base"] == str((cut / "model-base").resolve())
    assert model.tokenizer_hash == r["tokenizer_hash"]
    # Not trivially equal: pretraining moved the weights away from the seeded model.
    a = load_file(str(whole / "checkpoint" / "base.safetensors"))
    init = get_weights(
        FederatedRun(None, fed, tmp_path / "init").model(
            Tokenizer.load(whole / "tokenizer.json"), "pretrain", None, None
        )
    )
    assert not all(np.allclose(init[k], a[k]) for k in a)


DP_RUN = [
    "federation.rounds.pretrain=0",
    "federation.rounds.finetune=1",
    "federation.evaluate=false",
    "federation.timeout_s=120",
    "train.finetune.context=64",
    "train.finetune.max_steps=2",
    "train.dp.epsilon=6",
    "train.dp.delta=1e-5",
]


def test_the_dp_ledger_outlives_a_run(sites, tmp_path):
    """DP-SGD finetuning charges each site's lifetime ledger; a second run that would pass
    the policy's lifetime budget (10 by default) is refused by every site, whatever the
    coordinator asks, and its rounds leave the ledger as they found it."""
    fed = load_federation(None, DP_RUN)
    work = tmp_path / "work"
    with SimulationEngine(tmp_path / "engine", len(sites)) as engine:
        ok, why = engine.run(run_config(fed, tmp_path / "first", False), sites, work)
        assert ok, why
        spent = {s.name: Ledger(work / s.name).entries() for s in sites}
        assert all(len(e) == 1 and e[0]["status"] == "spent" for e in spent.values())
        assert all(0 < e[0]["epsilon"] <= 6 for e in spent.values())
        # Under DP-SGD the reply carries the epsilon spent and no un-noised training loss.
        (r,) = json.loads((tmp_path / "first" / "results.json").read_text())["rounds"]
        assert set(r["sites"]) == {s.name for s in sites}
        assert all("epsilon" in m and "train_loss" not in m for m in r["sites"].values())
        # The same run again, its vocabulary given (no statistics round: what it tests is
        # the training round the ledger refuses).
        tok = f"federation.tokenizer={tmp_path / 'first' / 'tokenizer.json'}"
        again = load_federation(None, [*DP_RUN, "federation.statistics=false", tok])
        ok, why = engine.run(run_config(again, tmp_path / "second", False), sites, work)
        # The ServerApp's error, read from its log: no site could train.
        assert not ok and "FedclifError: finetune round 1: 0 valid replies" in why, why
    for s in sites:
        assert Ledger(work / s.name).entries() == spent[s.name]
        assert "dp.max_epsilon_lifetime" in (work / s.name / "errors.log").read_text()


ROGUE_KINDS = {  # what the rogue sends in training round r, and the rule that rejects it
    "no-arrays": "missing_arrays",
    "float64": "dtype float64 != float32",
    "nan": "non-finite values",
    "huge-examples": "num-examples 1e+09 outside",
}


def test_a_rogue_site_neither_stops_nor_steers_the_run(sites, tmp_path):
    """One site runs a ClientApp that poisons its statistics and sends a different bad
    reply each round (tests/simulations/rogue_app.py, in the run's app bundle): its statistics are
    left out of the tokenizer, each reply is rejected by its rule, the run completes, and
    the global model is the honest site's update, as in a run without the rogue. The run
    pretrains with MedHMP's two stages and LLM4EHR's alignment: their heads travel too."""
    fed = load_federation(
        None,
        [
            "federation.rounds.pretrain=4",
            "federation.evaluate=false",
            "federation.min_sites=1",
            "train.pretrain.context=64",
            "train.pretrain.batch_size=8",
            "train.pretrain.max_steps=2",
            "federation.timeout_s=120",
            *STAGED,
        ],
    )
    files = app_files(SERVERAPP, {**RUN_CONFIG, "rogue-node": -1, "rogue-kinds": ""})
    pyproject = tomllib.loads(files["pyproject.toml"].decode())
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "rogue_app:app"
    files["pyproject.toml"] = tomli_w.dumps(pyproject).encode()
    files["rogue_app.py"] = (Path(__file__).parent / "rogue_app.py").read_bytes()
    out, audit = tmp_path / "run", tmp_path / "audit"
    config = {
        **run_config(fed, out, False, audit),
        "rogue-node": 1,
        "rogue-kinds": ",".join(ROGUE_KINDS),
    }
    with SimulationEngine(tmp_path / "engine", len(sites)) as engine:
        run_id = engine.submit(config, sites, tmp_path / "work", files)
        assert wait_run(run_id, engine.env), engine.save_log(run_id)
    honest, rogue = (s.name for s in sites)
    r = json.loads((out / "results.json").read_text())
    assert r["strategy"] == {"name": "fedavg", "streaming": True}
    (left,) = r["statistics"]["left_out"]
    assert left["site"] == rogue and "code counts must be non-negative" in left["reason"]
    assert r["statistics"]["sites"] == [honest]
    for x, rule in zip(r["rounds"], ROGUE_KINDS.values(), strict=True):
        assert list(x["sites"]) == [honest]
        (rejected,) = x["rejected"]
        assert rejected["site"] == rogue and rejected["reason"].startswith(rule), rejected
    # The last round's honest update (read from the audit) is the global model.
    last = sorted(audit.glob("*-pretrain_round_4.json"))
    (mine,) = [
        f
        for f in last
        if json.loads(f.read_text())["records"]["metrics"]["metrics"]["num-examples"] < 10**9
    ]
    sent = np.load(str(mine).replace(".json", "-arrays.npz"))
    final = load_file(str(out / "checkpoint" / "weights.safetensors"))
    assert final.keys() == set(sent.files)
    # The objectives' heads, both stages', are in the global model like every other array.
    assert {k.split(".")[1] for k in final if k.startswith("pretrain_heads.")} >= {
        "proj_ts",
        "stay_out",
        "code_out",
        "code_proj",
    }
    for k in final:
        np.testing.assert_array_equal(final[k], sent[k], err_msg=k)


def test_sigterm_stops_what_a_simulation_started(tmp_path):
    """`kill` (SIGTERM) on `fedclif simulate` unwinds like Ctrl-C: the command exits 130 and
    the SuperLink, ServerApp process and Ray it started are gone, not orphaned."""
    out = tmp_path / "out"
    small = [
        "study.sites.source.stays=100",
        "study.sites.target.stays=100",
        "study.sites.third=null",
        "study.seeds=[0]",
    ]
    p = subprocess.Popen(
        [*FEDCLIF, *quick_study(out, tmp_path / "cache", *small)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (out / "progress.json").is_file(), 180, "the study to start")
        started = psutil.Process(p.pid).children(recursive=True)
        assert any("superlink" in " ".join(c.cmdline()) for c in started)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 130
        psutil.wait_procs(started, timeout=30)
        alive = [c for c in started if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [c.cmdline()[:2] for c in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
