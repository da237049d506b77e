"""Federation on real Flower processes: a SuperLink with TLS and site authentication and
two SuperNodes on loopback, each with its own small synthetic site (a in CLIF 2.1, b in
CLIF 3.0); plus the server's checks. Every process started here is stopped (process
groups), FLWR_HOME is temporary."""

import contextlib
import json
import re
import shutil
import ssl
import tomllib
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import psutil
import pytest
import tomli_w
from conftest import decile_error
from fastapi.routing import iter_route_contexts
from flwr.superlink.main import create_app
from omegaconf import OmegaConf
from safetensors.numpy import load_file

import fedclif
from fedclif.client.approval import APPROVED_FILE
from fedclif.client.ledger import LEDGER_FILE, Ledger
from fedclif.client.policy import load_policy
from fedclif.server.deploy import CONNECTION, connect, flwr, run_config, submit
from fedclif.server.front import FLEET_PATHS
from fedclif.server.loopback import Loopback
from fedclif.server.processes import wait_for
from fedclif.shared.clif.site import load_site
from fedclif.shared.clif.versions import write_clif_3
from fedclif.shared.config import load_config
from fedclif.shared.model.models import count_parameters, load_model
from fedclif.shared.protocol.federation import ERROR_CODE, ERRORS, load_federation
from fedclif.shared.protocol.flower import RUN_CONFIG, app_files, fab_hash, write_app
from fedclif.shared.tokens.events import stay_events
from fedclif.shared.tokens.labels import TASKS
from fedclif.shared.tokens.stats import merge_stats, site_stats
from fedclif.shared.tokens.tokenizer import Tokenizer, fit_tokenizer
from fedclif.simulations.synth import load_preset, write_site

pytestmark = pytest.mark.slow  # real processes throughout

# Tiny local rounds: the test is about the protocol, not the model.
RUN = [
    "train.pretrain.context=64",
    "train.pretrain.batch_size=8",
    "train.pretrain.max_steps=2",
    "federation.timeout_s=120",
]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Two sites with their own data, a coordinator with TLS and site authentication, and
    both sites' daemons connected (site c has keys but is never registered). Site b's
    tables are CLIF 3.0 (its 2.1 original is kept in data/b-2.1): a mixed federation."""
    root = tmp_path_factory.mktemp("federation")
    data = {}
    for i, (name, preset) in enumerate((("a", "mimic-like"), ("b-2.1", "ucmc-like"))):
        # Large enough that every histogram cell the pooled fit uses also clears the
        # per-site minimum cell count (tiny sites lose cells to privacy roll-up).
        data[name] = root / "data" / name
        write_site(load_preset(preset), 600, i + 1, data[name])
    data["b"] = root / "data" / "b"
    write_clif_3(data["b-2.1"], data["b"])
    lb = Loopback(root, ["a", "b"])
    try:
        lb.init(extra_sites=["c"])
        lb.start_superlink()
        for s in ("a", "b"):
            lb.register(s)
            lb.serve(s, data[s])
        yield lb
    finally:
        lb.stop_all()


@pytest.fixture(scope="module")
def finished_run(federation):
    out, audit = federation.root / "run", federation.root / "audit"
    federation.run(out, "federation.rounds.pretrain=2", *RUN, extra=("--audit", str(audit)))
    return out, audit


def test_statistics_two_pretraining_rounds_and_evaluation(finished_run):
    out, _ = finished_run
    r = json.loads((out / "results.json").read_text())
    assert set(r["sites"]) == {"a", "b"} and all(s["stays"] > 0 for s in r["sites"].values())
    assert [(x["phase"], x["round"]) for x in r["rounds"]] == [("pretrain", 1), ("pretrain", 2)]
    for x in r["rounds"]:
        assert set(x["sites"]) == {"a", "b"} and not x["failed"] and not x["rejected"]
        assert x["bytes_sent"] > 0 and x["bytes_received"] > 0
    assert set(r["evaluation"]["sites"]) == {"a", "b"}
    assert r["evaluation"]["weighted"]["loss"] > 0  # each site's held-out next-token loss
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["phase"], state["round"]) == ("pretrain", 2)
    assert state["tokenizer_hash"] == r["tokenizer_hash"]
    assert Tokenizer.load(out / "tokenizer.json").hash == r["tokenizer_hash"]
    model, meta = load_model(out / "model")
    assert meta["stage"] == "pretrain" and model.tokenizer_hash == r["tokenizer_hash"]


def test_server_tokenizer_equals_the_pooled_fit(federation, finished_run, tmp_path):
    """The tokenizer fitted at the server from two sites' statistics, one site in CLIF 2.1
    and one in 3.0, is the one fitted on the two sites' data pooled in one place (in 2.1:
    the crosswalk puts both in one vocabulary)."""
    out, _ = finished_run
    data = federation.root / "data"
    pooled = tmp_path / "pooled"
    pooled.mkdir()
    for f in sorted((data / "a").glob("clif_*.parquet")):
        pl.concat(
            [pl.read_parquet(f), pl.read_parquet(data / "b-2.1" / f.name)], how="diagonal_relaxed"
        ).write_parquet(pooled / f.name)
    tok_cfg = load_config("tokenizer")
    allowed = list(load_policy().policy.stats.allow_open)  # the sites' (default) policy
    pooled_tok = fit_tokenizer(
        merge_stats([site_stats(load_site(pooled, load_config("site")), tok_cfg, allowed)]),
        tok_cfg,
    )
    fed_tok = Tokenizer.load(out / "tokenizer.json")
    # The same vocabulary, but for what no site may release: a code seen fewer than
    # min_cell_count times at every site (each site's raw counts, computed here).
    raw_cfg = load_config("tokenizer", overrides=["stats.min_cell_count=1"])
    sites = [load_site(data / s, load_config("site")) for s in "ab"]
    assert [s.report.clif_version for s in sites] == ["2.1", "3.0"]
    raw = [site_stats(s, raw_cfg)["codes"] for s in sites]
    missing = [t for t in pooled_tok.vocab if t not in set(fed_tok.vocab)]
    assert set(fed_tok.vocab) <= set(pooled_tok.vocab)
    assert all(max(r.get(t, 0) for r in raw) < tok_cfg.stats.min_cell_count for t in missing)
    # A few at these 600-stay sites (measured: 3 since ucmc-like records no hospice deaths,
    # which made DSCG_Hospice rare there; 2 before).
    assert len(missing) <= 3, missing
    assert fed_tok.cuts.keys() == pooled_tok.cuts.keys()
    # The bins: each site's histogram cells stand on at least 10 of its own patients, so a
    # site rolls a value seen in fewer up to coarser rounding where the pooled data would
    # not. At these 600-stay sites that costs a few percentile points at most (measured:
    # age, 5.3 against the pooled fit's 1.2); at 2,000 stays under 1 (test_policy.py).
    values = pl.concat(stay_events(s).select("code", "value").collect() for s in sites)
    values = values.drop_nulls("value").partition_by("code", as_dict=True)
    for k in fed_tok.cuts:
        x = np.sort(values[(k,)]["value"].to_numpy())
        fed, pooled = decile_error(fed_tok.cuts[k], x), decile_error(pooled_tok.cuts[k], x)
        assert fed <= pooled + 0.05, (k, fed, pooled)


def test_site_messages_carry_no_identifier_or_raw_value(federation, finished_run):
    _, audit = finished_run
    data = federation.root / "data"
    ids = set()
    for s in ("a", "b"):
        h = pl.read_parquet(data / s / "clif_hospitalization.parquet")
        ids |= set(h["hospitalization_id"].cast(str)) | set(h["patient_id"].cast(str))
    texts = [p.read_text() for p in audit.glob("*.json")]
    assert len(texts) >= 2 * 5  # stats, tokenize, 2 rounds, evaluation, from two sites
    blob = "\n".join(texts)
    for i in ids:
        assert f'"{i}"' not in blob and f"={i}" not in blob
    assert "dttm" not in blob and "T00:" not in blob  # no timestamps
    evaluations = 0
    for t in texts:
        rec = json.loads(t)["records"]
        # Only aggregate metrics, statistics, arrays and (when a site's policy withheld a
        # task's metrics) the task and the rule leave a site.
        assert set(rec["config"]) <= {"stats", "config", "withheld"}
        assert set(rec["metrics"]) <= {"metrics"}
        metrics = rec["metrics"].get("metrics", {})
        if "loss" in metrics:  # an evaluation reply
            evaluations += 1
            # This run pretrains: the evaluation is the next-token loss alone, no task's
            # metrics and nothing withheld (a reply that withholds and rounds:
            # tests/client/test_doors.py::test_an_evaluation_reply_withholds_and_rounds).
            assert not any(k.startswith(tuple(TASKS)) for k in metrics)
            assert "withheld" not in rec["config"]
        # Sizes (stays, tokens, training examples) leave as multiples of the minimum cell.
        sizes = {
            k: v
            for k, v in rec["metrics"].get("metrics", {}).items()
            if k in ("stays", "tokens", "num-examples", "num_examples")
        }
        assert all(v % 10 == 0 for v in sizes.values()), sizes
    assert evaluations == 2  # one from each site
    stats = [
        json.loads(json.loads(t)["records"]["config"]["stats"]["json"])
        for t in texts
        if "stats" in json.loads(t)["records"]["config"]
    ]
    assert len(stats) == 2  # the per-site statistics, every count on the shared grid
    for st in stats:  # values only as shared-grid cells holding at least 10 values each
        assert st["numeric"] and all(
            min(h["counts"]) >= 10 and all(float(f"{v:.3g}") == v for v in h["values"])
            for h in st["numeric"].values()
        )
        assert min(st["codes"].values()) >= 10 and st["n_stays"] % 10 == 0


def test_strangers_reach_the_fleet_api_alone(federation):
    """The sites' endpoint, as a stranger holding only the public CA reaches it: every
    route of Flower's SuperLink but the SuperNode's Fleet calls (the Control API: list,
    start and stop runs, register and unregister keys; the Runtime API: take a run's
    task and its token; the docs) gets 404 from the front and never reaches Flower, and a
    Fleet call without a registered key gets Flower's 401. The coordinator's own side
    answers on loopback, and its processes listen nowhere else."""
    lb = federation
    routes = {c.route.path for c in iter_route_contexts(create_app().routes)}
    client = httpx.Client(verify=ssl.create_default_context(cafile=lb.ca), timeout=30)
    headers = {"content-type": "application/protobuf"}
    for path in sorted(routes):
        r = client.post(f"https://{lb.link}{path}", content=b"", headers=headers)
        assert r.status_code == (401 if path in FLEET_PATHS else 404), path
    assert client.get(f"https://{lb.link}/docs").status_code == 404
    said = lb.log("superlink")
    assert "front: refused POST /v1/runtime/acquire-task from 127.0.0.1" in said
    assert '"POST /v1/runtime/acquire-task' not in said  # Flower never saw it
    ok = client.post(f"https://{lb.control}/v1/control/list-runs", content=b"", headers=headers)
    assert ok.status_code == 200
    for cmd in (
        ["status"],
        ["site", "register", "--key", str(lb.site_dir("c") / "site.pub"), "--name", "stranger"],
    ):
        r = lb.fedclif(*cmd, "--superlink", lb.link, "--ca", lb.ca, check=False)
        assert r.returncode == 1 and "answers on the coordinator's host alone" in r.stderr
    tree = psutil.Process(lb.procs["superlink"][0].pid)
    listening = {
        (c.laddr.ip, c.laddr.port)
        for p in [tree, *tree.children(recursive=True)]
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.1", lb.port), ("127.0.0.1", lb.control_port)}


def test_each_site_launches_through_its_own_gate(federation):
    """A site daemon's SuperExec is fedclif's (client apps only, client/approval.py), not
    Flower's own found on PATH."""
    for s in "ab":
        node = psutil.Process(federation.procs[f"node-{s}"][0].pid)
        cmds = []
        for p in node.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # finished ClientApps: zombies
                cmds.append(" ".join(p.cmdline()))
        shim = federation.root / f"work-{s}" / "bin" / "flower-superexec"
        assert any(str(shim.resolve()) in c for c in cmds), cmds


def test_a_taken_site_name_is_refused_at_registration(federation):
    r = federation.fedclif(
        "site",
        "register",
        "--key",
        str(federation.site_dir("c") / "site.pub"),
        "--name",
        "a",
        "--superlink",
        federation.control,
        "--ca",
        federation.ca,
        check=False,
    )
    assert r.returncode == 1
    assert "site name 'a' is already registered" in " ".join(r.stderr.split())


def test_unregistered_site_is_refused(federation):
    p = federation.serve("c", federation.root / "data" / "a", wait=False)
    try:
        wait_for(
            lambda: p.poll() is not None or "SuperNode ID" in federation.log("node-c"),
            60,
            "site c to be refused",
        )
        assert "SuperNode ID" not in federation.log("node-c")
        assert p.poll() not in (None, 0)
    finally:
        federation.stop("node-c")


def _run_refused(lb, out: Path, *settings: str):
    """`fedclif run` from the coordinator's host with `settings`, which the sites refuse:
    its completed process (exit status and output)."""
    return lb.fedclif(
        "run",
        "--superlink",
        lb.control,
        "--ca",
        lb.ca,
        "--out",
        str(out),
        *settings,
        "federation.timeout_s=120",
        check=False,
    )


def test_a_run_asking_for_finer_statistics_is_refused_by_every_site(federation):
    """A hostile coordinator asks for every distinct value (cells of one, 15 digits):
    each site's policy refuses before reading its data, and says which rule."""
    lb = federation
    before = {s: sorted(p.name for p in (lb.root / f"work-{s}").iterdir()) for s in "ab"}
    out = lb.root / "hostile"
    r = _run_refused(lb, out, "tokenizer.stats.min_cell_count=1", "tokenizer.stats.sig_figs=15")
    assert r.returncode == 1
    # The coordinator is told why, and where the ServerApp's whole log is.
    said = " ".join(r.stdout.split())  # as printed, unwrapped
    assert "failed: fedclif.shared.errors.FedclifError: query.stats: 0 valid replies" in said
    (log,) = out.glob("run-*.log")
    assert f"the ServerApp's whole log: {log}" in said
    for s in "ab":
        log = (lb.root / f"work-{s}" / "errors.log").read_text()
        assert "SiteRefusal: policy: min_cell_count: asked < 10" in log
        after = sorted(p.name for p in (lb.root / f"work-{s}").iterdir())
        assert after == sorted({*before[s], "errors.log"})  # nothing else written
    assert not (out / "results.json").exists() and not (out / "tokenizer.json").exists()


def test_a_site_answers_statistics_once_per_export(federation, finished_run):
    """After the run's statistics round, each site keeps its answer (the one the audit
    saw); a coordinator asking again on a coarser grid (whose difference from the first
    answer would give the cells each suppressed) is refused by both, by the rule."""
    lb, (_, audit) = federation, finished_run
    sent = [
        json.loads(t)["records"]["config"]["stats"]
        for t in (p.read_text() for p in sorted(audit.glob("*.json")))
        if "stats" in json.loads(t)["records"]["config"]
    ]
    for s in "ab":
        kept = json.loads((lb.root / f"work-{s}" / "stats-answer.json").read_text())
        assert kept["answer"] in [x["json"] for x in sent if x["site"] == s]
    out = lb.root / "coarser"
    r = _run_refused(lb, out, "tokenizer.stats.sig_figs=2")
    assert r.returncode == 1
    for s in "ab":
        log = (lb.root / f"work-{s}" / "errors.log").read_text()
        assert "SiteRefusal: policy: stats.one_answer: " in log


# What a hostile coordinator asks and the exact refusal in the site's log (after
# "SiteRefusal: ") and at the server (the category; a policy refusal also names its rule
# there), under one site policy (HOSTILE_POLICY). The statistics' refusals (finer cells,
# a noise seed) share one path, shown on these processes by the test above; each rule's
# exact refusal is tests/client/test_policy.py's.
HOSTILE = {
    "tiny test split": (
        ["train.split.test=0.001"],
        "policy: splits.min_test: asked < 0.1",
        "policy",
    ),
    "no DP where required": (
        ["train.dp.epsilon=0"],
        "policy: dp.required: asked pretrain without DP-SGD",
        "policy",
    ),
    # The site spent 1 in an earlier run (its ledger says so); the coordinator resumes a
    # finished run for a third, DP, round: a resume is one more run to the ledger.
    "a resume past the lifetime budget": (
        ["federation.rounds.pretrain=3", "train.dp.epsilon=1", "train.dp.delta=1e-5"],
        "policy: dp.max_epsilon_lifetime: this round would pass 1.5",
        "dp_budget_exhausted",
    ),
    # The site's cap is the run's tiny model; this one is over 100 times its size.
    "model 100x the cap": (
        [
            "model.shapes.mamba2.hidden_size=1024",
            "model.shapes.mamba2.num_heads=64",
            "model.shapes.mamba2.num_hidden_layers=8",
        ],
        "policy: model.max_parameters: asked > {cap}",
        "policy",
    ),
}
HOSTILE_POLICY = {"policy.dp.required": True, "policy.dp.max_epsilon_lifetime": 1.5}


def test_hostile_requests_are_refused_and_change_nothing(federation, finished_run):
    """Each request beyond the sites' policy (HOSTILE, submitted together) is refused by
    the real SuperNodes with the rule's name, before any data is read or written: the
    sites' work directories and DP ledgers are as they were, and the run config's
    `work-root` is never used."""
    lb = federation
    tok = finished_run[0] / "tokenizer.json"
    base = [*RUN, "federation.statistics=false", f"federation.tokenizer={tok}"]
    configs = {
        case: load_federation(overrides=[*base, *asked]) for case, (asked, _, _) in HOSTILE.items()
    }
    cap = count_parameters(load_federation().model, Tokenizer.load(tok))
    n = count_parameters(configs["model 100x the cap"].model, Tokenizer.load(tok))
    assert n > 100 * cap
    refusals = {case: r.format(n=n, cap=cap) for case, (_, r, _) in HOSTILE.items()}
    policy = {**HOSTILE_POLICY, "policy.model.max_parameters": cap}
    name = {case: case.replace(" ", "-") for case in HOSTILE}
    shutil.copytree(finished_run[0], lb.root / f"{name['a resume past the lifetime budget']}-out")
    files = {s: lb.site_dir(s) / "policy.yaml" for s in "ab"}
    texts = {s: f.read_text() for s, f in files.items()}
    try:
        for s in "ab":
            ledger = Ledger(lb.root / f"work-{s}")
            ledger.settle(ledger.reserve(0, "finetune", 1, 1.0, 1e-5, 10.0), 1.0)
        before = {s: sorted(p.name for p in (lb.root / f"work-{s}").iterdir()) for s in "ab"}
        ledgers = {s: Ledger(lb.root / f"work-{s}").entries() for s in "ab"}
        for f in files.values():
            tree = OmegaConf.load(f)
            for k, v in policy.items():
                OmegaConf.update(tree, k, v)
            OmegaConf.save(tree, f)
        env = connect(lb.control, Path(lb.ca), lb.root / "flwr")
        runs = []
        for case, config in configs.items():
            out, audit = (lb.root / f"{name[case]}-{x}" for x in ("out", "audit"))
            rc = run_config(config, out, "resume" in case, audit)
            runs.append(submit({**rc, "work-root": str(lb.root / f"{name[case]}-work-root")}, env))
        for run_id in runs:
            lb.wait_run(run_id)
        for case, (_, _, category) in HOSTILE.items():
            assert not (lb.root / f"{name[case]}-work-root").exists()
            audit = sorted((lb.root / f"{name[case]}-audit").glob("*.json"))
            errors = [e for f in audit if (e := json.loads(f.read_text())["error"])]
            assert [ERRORS[e["code"]] for e in errors] == [category] * 2, case
            if category == "policy":
                assert {e["reason"] for e in errors} == {refusals[case]}
        for s in "ab":
            work = lb.root / f"work-{s}"
            log = (work / "errors.log").read_text()
            assert all(f"SiteRefusal: {r}\n" in log for r in refusals.values()), log
            # The refusals' log, and the ledger's lock: nothing else.
            assert {p.name for p in work.iterdir()} - {*before[s]} <= {
                "errors.log",
                "dp-ledger.lock",
            }
            assert Ledger(work).entries() == ledgers[s]
    finally:
        for s, f in files.items():
            f.write_text(texts[s])
            (lb.root / f"work-{s}" / LEDGER_FILE).unlink(missing_ok=True)  # the seeded one


def _hostile_app(root: Path, marker: Path) -> tuple[Path, str]:
    """The release's bundle with a `client/app.py` of its own: fedclif's, one line changed
    (it touches `marker` when imported), and the ClientApp pointed at it."""
    files = app_files()
    pyproject = tomllib.loads(files["pyproject.toml"].decode())
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "client.app:app"
    files["pyproject.toml"] = tomli_w.dumps(pyproject).encode()
    code = (Path(fedclif.__file__).parent / "client" / "app.py").read_text()
    changed = code.replace("app = ClientApp()", f"app = ClientApp(); Path({str(marker)!r}).touch()")
    assert changed.count("\n") == code.count("\n") and changed != code
    files["client/app.py"] = changed.encode()
    return write_app(root, files), fab_hash(files)


def test_a_bundle_the_site_did_not_approve_never_runs(federation):
    """A coordinator submits the release's app with one line of the site's code changed:
    no site installs or imports it, each answers `unapproved_app` and says so in its log;
    once site a approves that bundle, a runs it (the gate, not the code, refused it)."""
    lb = federation
    marker = lb.root / "hostile-code-ran"
    app, h = _hostile_app(lb.root / "hostile-app", marker)
    env = connect(lb.control, Path(lb.ca), lb.root / "flwr")
    before = {s: sorted(p.name for p in (lb.root / f"work-{s}").iterdir()) for s in "ab"}

    def submit(name: str) -> Path:
        audit = lb.root / name
        config = load_federation(overrides=[*RUN, "federation.timeout_s=60"])
        conf = lb.root / f"{name}.toml"
        conf.write_text(tomli_w.dumps(run_config(config, lb.root / f"{name}-out", False, audit)))
        run = flwr(["run", str(app), CONNECTION, "--run-config", str(conf)], env).stdout
        lb.wait_run(int(re.search(r"run (\d+)", run).group(1)))
        return audit

    audit = submit("unapproved")
    assert not marker.exists()
    errors = [json.loads(f.read_text())["error"] for f in sorted(audit.glob("*.json"))]
    assert [e["code"] for e in errors] == [ERROR_CODE["unapproved_app"]] * 2
    for s in "ab":
        assert f"refused app bundle {h}" in (lb.root / f"work-{s}" / "errors.log").read_text()
        assert f"refused app bundle {h}" in lb.log(f"node-{s}")
        after = sorted(p.name for p in (lb.root / f"work-{s}").iterdir())
        assert after == sorted({*before[s], "errors.log"})

    policy = str(lb.site_dir("a") / "policy.yaml")
    lb.fedclif("site", "approve", h, "--policy", policy, "--note", "reviewed for the test")
    try:
        audit = submit("approved-at-a")
        assert marker.exists()
        codes = [json.loads(f.read_text())["error"] for f in sorted(audit.glob("*.json"))]
        assert ERROR_CODE["unapproved_app"] in [c and c["code"] for c in codes]  # site b
    finally:
        (lb.root / "work-a" / APPROVED_FILE).unlink()


def test_a_resumed_run_goes_on_without_a_site_killed_between_rounds(federation, finished_run):
    """`fedclif run --resume` at the coordinator, and a site lost mid-run: a copy of the
    two-round run asked for four continues from round 2's checkpoint (no statistics or
    tokenizing again); site b's daemon is killed between rounds 3 and 4, and round 4 goes
    on with a and names b. The coordinator waits after round 3 until b is down
    (tests/gated_app.py, a bundle both sites approve), so round 4 cannot finish first on
    a fast machine. `fedclif status` lists the runs. (Runs last: it leaves site b
    stopped. That a resumed run ends where an uninterrupted one does, and a coordinator
    killed mid-run: tests/simulations/test_simulation.py.)"""
    lb, (done, _) = federation, finished_run
    out = lb.root / "resilient"
    shutil.copytree(done, out, ignore=shutil.ignore_patterns("model", "results.json"))
    files = app_files("gated_app:app", {**RUN_CONFIG, "pause-after-round": 0})
    files["gated_app.py"] = (Path(__file__).parent / "gated_app.py").read_bytes()
    app = write_app(lb.root / "gated-app", files)
    for s in "ab":
        policy = str(lb.site_dir(s) / "policy.yaml")
        lb.fedclif(
            "site",
            "approve",
            fab_hash(files),
            "--policy",
            policy,
            "--note",
            "the test's gated coordinator",
        )
    # The round timeout stays long (a loaded machine starts a ClientApp slowly): the
    # SuperLink answers for a lost site well before it.
    config = load_federation(
        overrides=[
            "federation.rounds.pretrain=4",
            "federation.min_sites=1",
            "federation.evaluate=false",
            *RUN,
        ]
    )
    conf = lb.root / "resilient.toml"
    conf.write_text(tomli_w.dumps({**run_config(config, out, True), "pause-after-round": 3}))
    env = connect(lb.control, Path(lb.ca), lb.root / "flwr")
    run = flwr(["run", str(app), CONNECTION, "--run-config", str(conf)], env).stdout
    wait_for(lambda: (out / "paused").exists(), 240, "round 3")
    lb.stop("node-b")
    (out / "go").touch()
    lb.wait_run(int(re.search(r"run (\d+)", run).group(1)))
    r = json.loads((out / "results.json").read_text())
    assert [x["round"] for x in r["rounds"]] == [1, 2, 3, 4]
    assert r["rounds"][:2] == json.loads((done / "results.json").read_text())["rounds"]
    assert r["tokenizer_hash"] == Tokenizer.load(done / "tokenizer.json").hash
    rounds = {x["round"]: x for x in r["rounds"]}
    assert set(rounds[3]["sites"]) == {"a", "b"}
    assert rounds[3]["absent"] == [] and not rounds[3]["failed"]
    assert set(rounds[4]["sites"]) == {"a"}
    # b is gone before round 4: either the SuperLink still listed it (its message fails)
    # or no longer did (the round could not ask it); either way the round names it.
    assert {x["site"] for x in rounds[4]["failed"]} | set(rounds[4]["absent"]) == {"b"}
    two, four = (load_file(str(d / "model" / "model.safetensors")) for d in (done, out))
    assert two.keys() == four.keys() and any(not np.array_equal(two[k], four[k]) for k in two)
    status = lb.fedclif("status", "--superlink", lb.control, "--ca", lb.ca).stdout
    assert status.count("finished:completed") >= 2, status
