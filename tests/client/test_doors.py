"""Closed doors at a site, the fast part (the same doors on real processes:
tests/test_federation.py): a site's SuperExec launches client apps alone, what a
coordinator sends is data, never code, and no reply carries a side channel."""

import dataclasses
import json
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.superexec.executor import LaunchResultStatus, get_executor
from omegaconf import OmegaConf

from fedclif.client.app import (
    Node,
    _metrics_reply,
    _model,
    evaluate,
    fit_probe,
    stats,
    tokenize,
)
from fedclif.client.app import train as train_handler
from fedclif.client.approval import client_apps_only
from fedclif.client.policy import coarse_sizes, write_policy
from fedclif.shared.config import load_config, load_tree
from fedclif.shared.evaluation.metrics import binary_metrics
from fedclif.shared.model.models import get_weights, stage_model
from fedclif.shared.protocol.federation import (
    CONFIG,
    DP_TRAIN_METRICS,
    ERROR_CODE,
    TRAIN_METRICS,
    load_federation,
    received_config,
    to_record,
)
from fedclif.shared.tokens.tokenizer import Tokenizer


@pytest.fixture
def launchers(tmp_path, monkeypatch):
    """A PATH whose every Flower task command only leaves a mark that it was started."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("flwr-clientapp", "flwr-agentapp", "flwr-connector", "flwr-model"):
        f = bin_dir / command
        ran = tmp_path / f"ran-{command}"
        f.write_text(f'#!/bin/sh\necho "$@" > {ran}.args\ncat > {ran}.stdin\ntouch {ran}\n')
        f.chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_a_sites_superexec_launches_client_apps_only(launchers):
    """Flower's SuperExec plugin and executor, with fedclif's allow-list: every task type
    but a client app (an agent app installs and runs a bundle's code too) is refused and
    logged with its bundle's hash; a client app is launched."""
    work = launchers
    plugin = client_apps_only(work)(
        runtime_api_address="127.0.0.1:1",
        insecure=True,
        root_certificates_path=None,
        executor=get_executor(ExecutorType.SUBPROCESS),
    )
    others = [t for t in TaskType if t != TaskType.CLIENT_APP]
    assert TaskType.AGENT_APP in others
    for i, t in enumerate(others):
        task = Task(task_id=i + 1, type=str(t), run_id=7, fab_hash="f" * 64)
        r = plugin.launch_task(token="tok", task=task)
        assert r.status == LaunchResultStatus.FAILED
    log = (work / "errors.log").read_text()
    for t in others:
        assert f"refused a {t} task of app bundle {'f' * 64}: client apps only" in log
    task = Task(task_id=99, type=str(TaskType.CLIENT_APP), run_id=7, fab_hash="a" * 64)
    token = "secret-task-token"
    assert plugin.launch_task(token=token, task=task).status == LaunchResultStatus.ACCEPTED
    ran = work / "ran-flwr-clientapp"
    t0 = time.monotonic()
    while not ran.exists() and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    assert sorted(p.name for p in work.glob("ran-*") if "." not in p.name) == [ran.name]
    # The task's token reaches the client app on its standard input, never its command line.
    args = (work / "ran-flwr-clientapp.args").read_text().split()
    assert token not in args and "--token-stdin" in args and "--insecure" in args
    assert (work / "ran-flwr-clientapp.stdin").read_text() == f"{token}\n"


@pytest.fixture
def site_context(tmp_path):
    """A deployed site's ClientApp context: its policy file, its work directory."""
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    node_config = {"data-path": str(tmp_path / "clif"), "policy-path": str(policy)}
    return Context(1, 1, node_config, RecordDict(), {})


def _answer(handler, kind: str, config: dict, context: Context) -> Message:
    """The reply of a ClientApp handler to a message as a SuperNode hands it over."""
    meta = Metadata(1, "m1", 0, 1, "", "", time.time(), 3600.0, kind)
    return handler(Message(RecordDict({CONFIG: ConfigRecord(config)}), metadata=meta), context)


SECRET = "hospital-db-s3cret"


@pytest.mark.parametrize("where", ["stats.seed", "stats.min_cell_count", "stats.nested_list"])
def test_a_received_config_is_data_never_resolved(site_context, monkeypatch, where):
    """A coordinator's `${oc.env:...}` (or any interpolation) in a config is refused by
    its rule, naming the key: the site's environment is never read into a reply."""
    monkeypatch.setenv("PGPASSWORD", SECRET)
    tok = OmegaConf.to_container(load_config("tokenizer"))
    value = "${oc.env:PGPASSWORD}"
    if where == "stats.nested_list":
        tok["stats"]["nested_list"] = [1, {"x": value}]
        key = "tokenizer.stats.nested_list[1].x"
    else:
        tok["stats"][where.split(".")[1]] = value
        key = f"tokenizer.{where}"
    reply = _answer(stats, "query.stats", {"tokenizer": json.dumps(tok)}, site_context)
    assert reply.has_error() and reply.error.code == ERROR_CODE["policy"]
    assert reply.error.reason == f"policy: configs are data: {key} holds an interpolation"
    work = Path(site_context.node_config["policy-path"]).parent.parent / "work"
    assert SECRET not in (work / "errors.log").read_text()


def test_a_training_config_with_an_interpolation_is_refused(site_context, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", SECRET)
    train = load_federation(overrides=["train.split.test=0.2"]).train
    text = OmegaConf.to_yaml(train).replace("test: 0.2", "test: ${oc.env:PGPASSWORD}")
    config = {"stage": "pretrain", "train": text, "model": "{}", "tokenizer_hash": "x"}
    reply = _answer(train_handler, "train", config, site_context)
    assert reply.error.reason == "policy: configs are data: train.split.test holds an interpolation"
    honest = received_config(OmegaConf.to_yaml(train), "train")
    assert float(honest.split.test) == 0.2  # the same text without one is read as before


def test_the_work_directory_keeps_the_last_token_sets_and_bases(tmp_path, demo_dir, demo_tokens):
    """Run after run, a coordinator's tokenizers and LoRA bases do not fill the site's
    disk: the work directory keeps the policy's `keep.token_sets` and `keep.bases`, the
    least recently used removed first (a set in use is touched)."""
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    context = Context(
        1, 1, {"data-path": str(demo_dir), "policy-path": str(policy)}, RecordDict(), {}
    )
    work = tmp_path / "work"
    for i, name in enumerate(["tokens-old", "tokens-older", "tokens-oldest"]):
        (work / name).mkdir(parents=True)
        os.utime(work / name, (time.time() - 100 * (i + 1),) * 2)
    tok = json.loads((demo_tokens / "tokenizer.json").read_text())
    reply = _answer(tokenize, "query.tokenize", {"tokenizer": json.dumps(tok)}, context)
    assert not reply.has_error()
    new = f"tokens-{Tokenizer.from_dict(tok, 'the test').hash[:16]}"
    assert sorted(p.name for p in work.glob("tokens-*")) == sorted(
        [new, "tokens-old", "tokens-older"]
    )
    node = Node(context)
    for i in range(5):
        base = work / f"base-{i}.safetensors"
        base.write_bytes(b"")
        node.keep(base, "base-*.safetensors", "bases")
        os.utime(base, (time.time() - 100 + i,) * 2)
    node.keep(work / "base-1.safetensors", "base-*.safetensors", "bases")  # used again
    assert sorted(p.name for p in work.glob("base-*")) == [
        "base-1.safetensors",
        "base-3.safetensors",
        "base-4.safetensors",
    ]


def test_no_probe_leaves_a_site_that_requires_dp(tmp_path):
    """A linear probe's means and coefficients are no DP-SGD output: under `dp.required`
    the site refuses to fit one, before reading anything."""
    policy = write_policy(
        tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}", "policy.dp.required=true"]
    )
    context = Context(
        1, 1, {"data-path": str(tmp_path / "clif"), "policy-path": str(policy)}, RecordDict(), {}
    )
    reply = _answer(fit_probe, "train.probe", {"stage": "pretrain"}, context)
    assert reply.error.code == ERROR_CODE["policy"]
    assert (
        reply.error.reason == "policy: dp.required: asked for linear probes, which are not DP-SGD"
    )


def _attack(replicates: list[float], n: int, n_boot: int, seed: int) -> np.ndarray:
    """A coordinator's least squares: with a constant-score model each resample's AUPRC is
    its share of positives, so resamples known to the attacker (`seed`) give every
    stay's outcome."""
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    counts = np.stack([np.bincount(row, minlength=n) for row in idx]) / n
    return np.linalg.lstsq(counts, np.asarray(replicates), rcond=None)[0] > 0.5


def test_per_resample_metrics_tell_no_stays_outcome(tmp_path):
    """The finding: one evaluation reply with bootstrap replicates, resampled with a seed
    the coordinator knows, gave every test stay's outcome by least squares. A deployed
    site resamples with its own seed (drawn once, kept at the site, never sent): the same
    attack recovers nothing better than guessing, and the site's evaluations still pair
    with each other (one seed)."""
    rng = np.random.default_rng(3)
    y = (rng.random(120) < 0.3).astype(int)
    constant = np.full(y.size, 0.5)
    known = binary_metrics(y, constant, n_boot=1000, seed=0, replicates=True)["auprc_boot"]
    assert (_attack(known, y.size, 1000, 0) == y).all()  # the finding, reproduced
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    node = Node(
        Context(1, 1, {"data-path": str(tmp_path), "policy-path": str(policy)}, RecordDict(), {})
    )
    seed = node.boot_seed()
    assert seed == node.boot_seed() != 0  # kept: evaluations pair
    assert stat.S_IMODE((tmp_path / "work" / "boot-seed").stat().st_mode) == 0o600
    site = binary_metrics(y, constant, n_boot=1000, seed=seed, replicates=True)["auprc_boot"]
    assert (_attack(site, y.size, 1000, 0) == y).mean() < 0.8  # ~ guessing the majority
    virtual = Node(
        Context(
            1,
            1,
            {"partition-id": 0},
            RecordDict(),
            {"sites": str(tmp_path), "work-root": str(tmp_path / "sim")},
        )
    )
    assert virtual.boot_seed() == 0  # a simulation pairs with the researcher's own scores


def test_sizes_in_an_evaluation_reply_are_multiples_of_the_minimum_cell():
    """Each task's n, calibration sizes and events (prevalence x n) leave rounded down to
    the policy's minimum cell: two evaluations differing by a few stays look the same."""
    policy = load_tree(("policy", "site"), (), None)  # min_cell_count 10
    flat = {
        "num_examples": 257.0,
        "death_n": 133.0,
        "death_prevalence": 27 / 133,
        "death_calibration_n": 133,
        "death_calibration_n_recal": 133,
        "death_auroc": 0.8,
        "imv_n": 124.0,
        "imv_prevalence": 41 / 124,
        "imv_auroc": 0.7,
    }
    out = coarse_sizes(flat, ["death", "imv", "icu"], policy)
    assert out == {
        "num_examples": 250,
        "death_n": 130,
        "death_prevalence": 20 / 130,
        "death_calibration_n": 130,
        "death_calibration_n_recal": 130,
        "death_auroc": 0.8,
        "imv_n": 120,
        "imv_prevalence": 40 / 120,
        "imv_auroc": 0.7,
    }
    one_more = coarse_sizes(
        {**flat, "death_n": 134.0, "death_prevalence": 28 / 134}, ["death", "imv"], policy
    )
    assert one_more["death_n"] == out["death_n"]
    assert one_more["death_prevalence"] == out["death_prevalence"]


def test_one_statistics_answer_per_export(tmp_path, demo_dir):
    """A deployed site answers statistics once per export: the same request again gets the
    same answer (with noise, the same noise: nothing to average away), a varied one (a
    coarser grid, whose difference from the first would give suppressed cells) is refused
    by its rule, and a new export gets an answer of its own."""
    data = tmp_path / "clif"
    shutil.copytree(demo_dir, data)
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    context = Context(1, 1, {"data-path": str(data), "policy-path": str(policy)}, RecordDict(), {})
    tok = OmegaConf.to_container(load_config("tokenizer", overrides=["stats.noise_scale=2"]))

    def ask(settings: dict) -> Message:
        return _answer(stats, "query.stats", {"tokenizer": json.dumps(settings)}, context)

    first, again = ask(tok), ask(tok)
    assert not first.has_error()
    assert str(again.content["stats"]["json"]) == str(first.content["stats"]["json"])
    coarser = json.loads(json.dumps(tok))
    coarser["stats"]["sig_figs"] = 2
    refused = ask(coarser)
    assert refused.error.code == ERROR_CODE["policy"]
    assert refused.error.reason.startswith("policy: stats.one_answer: ")
    (data / "clif_vitals.parquet").touch()  # a new export
    assert str(ask(coarser).content["stats"]["json"]) != str(first.content["stats"]["json"])


def _round_message(fed, tok: Tokenizer, kind: str, **config) -> Message:
    """A pretraining round's message (`kind`: train or evaluate) as the server sends it:
    fresh weights of `fed`'s model, its settings, and `config` besides."""
    weights = get_weights(stage_model(fed.model, tok, fed.train, "pretrain"))
    config = {
        "stage": "pretrain",
        "train": OmegaConf.to_yaml(fed.train),
        "round": 0,
        "model": json.dumps(OmegaConf.to_container(fed.model)),
        "tokenizer_hash": tok.hash,
        "base_id": "",
        **config,
    }
    meta = Metadata(1, "m1", 0, 1, "", "", time.time(), 3600.0, kind)
    records = {CONFIG: ConfigRecord(config), "arrays": to_record(weights)}
    return Message(RecordDict(records), metadata=meta)


def test_a_deployed_site_trains_and_evaluates_on_its_own_split(tmp_path, demo_tokens):
    """Split fractions, salt and resamples are the policy's at a deployed site, whatever
    the run asks (a coordinator stepping the test fraction could nest test sets and
    difference their metrics); a simulation's site takes the run's. An evaluation of any
    split but test or validation is refused before anything is read."""
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    asked = ["train.split.test=0.23", "train.split.salt=nested", "train.finetune.n_boot=7"]
    msg = _round_message(load_federation(overrides=asked), tok, "evaluate", eval_split="all")
    deployed = Node(
        Context(1, 1, {"data-path": str(tmp_path), "policy-path": str(policy)}, RecordDict(), {})
    )
    virtual = Node(
        Context(
            1,
            1,
            {"partition-id": 0},
            RecordDict(),
            {"sites": str(tmp_path / "sim"), "work-root": str(tmp_path)},
        )
    )
    for node in (deployed, virtual):
        shutil.copytree(demo_tokens, node.tokens(tok.hash))
    _, _, cfg, _ = _model(msg, deployed, full_data=False)
    assert (cfg.split.test, cfg.split.val, cfg.split.salt) == (0.2, 0.1, "fedclif")
    assert cfg.finetune.n_boot == cfg.probe.n_boot == 500
    _, _, cfg, _ = _model(msg, virtual, full_data=False)
    assert (cfg.split.test, cfg.split.salt, cfg.finetune.n_boot) == (0.23, "nested", 7)
    context = Context(
        1, 1, {"data-path": str(tmp_path), "policy-path": str(policy)}, RecordDict(), {}
    )
    reply = evaluate(msg, context)
    assert reply.error.reason == "policy: metrics.eval_split: asked for none of test, val"


@pytest.mark.parametrize("dp", [False, True])
def test_a_training_reply_carries_the_protocols_metrics_alone(tmp_path, demo_tokens, dp):
    """A round's reply: its arrays and exactly the protocol's metrics (under DP-SGD no
    loss, and the epsilon spent), its weight (`num-examples`, once) a multiple of the
    minimum cell."""
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    asked = ["train.pretrain.max_steps=1", "train.pretrain.context=64"]
    asked += ["train.dp.epsilon=1", "train.dp.delta=1e-4"] if dp else []
    msg = _round_message(load_federation(overrides=asked), tok, "train", round=1, seed=0)
    context = Context(
        1, 1, {"data-path": str(tmp_path), "policy-path": str(policy)}, RecordDict(), {}
    )
    shutil.copytree(demo_tokens, Node(context).tokens(tok.hash))
    reply = train_handler(msg, context)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == set(DP_TRAIN_METRICS if dp else TRAIN_METRICS)
    assert metrics["num-examples"] > 0 and metrics["num-examples"] % 10 == 0


def test_the_statistics_handler_refuses_finer_cells_and_writes_nothing(tmp_path, demo_dir):
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    context = Context(
        1, 1, {"data-path": str(demo_dir), "policy-path": str(policy)}, RecordDict(), {}
    )
    finer = OmegaConf.to_container(load_config("tokenizer", overrides=["stats.min_cell_count=3"]))
    reply = _answer(stats, "query.stats", {"tokenizer": json.dumps(finer)}, context)
    assert reply.error.reason == "policy: min_cell_count: asked < 10"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["errors.log"]


def test_an_evaluation_reply_withholds_and_rounds(tmp_path):
    """What the ClientApp's evaluation handler sends: a task on too few events absent
    from the metrics and named in WITHHELD with its rule; every size a multiple of the
    minimum cell."""
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    node = Node(
        Context(1, 1, {"data-path": str(tmp_path), "policy-path": str(policy)}, RecordDict(), {})
    )
    m = {
        "num_examples": 263.0,
        "death_n": 133.0,
        "death_prevalence": 27 / 133,
        "death_auroc": 0.8,
        "imv_n": 130.0,
        "imv_prevalence": 7 / 130,
        "imv_auroc": 0.9,
    }
    meta = Metadata(1, "m1", 0, 1, "", "", time.time(), 3600.0, "evaluate")
    msg = Message(RecordDict(), metadata=meta)
    reply = _metrics_reply(msg, m, node, ["death", "imv"])
    sent = dict(reply.content["metrics"])
    assert dict(reply.content["withheld"]) == {"imv": "policy: metrics.min_events (fewer than 10)"}
    assert not any(k.startswith("imv_") for k in sent)
    assert sent["death_n"] == 130 and sent["num-examples"] == 130 and "num_examples" not in sent
    assert sent["death_prevalence"] == 20 / 130


def test_a_coordinator_made_vocabulary_entry_never_reaches_a_sites_timelines(
    tmp_path, demo_dir, demo_tokens
):
    """The finding: a tokenizer with an answer charted once at the site ("Maria Lopez")
    and two decoys; after one round the charted answer's embedding row had moved, the
    decoys' had not. A deployed site encodes free-text entries it neither released nor
    allows as its table's unknown token: the entry never appears in its timelines, so its
    row gets no gradient; the answers the site did release keep their tokens. A
    simulation's site (no such check) shows the attack would have worked."""
    data = tmp_path / "clif"
    shutil.copytree(demo_dir, data)
    a = pl.read_parquet(data / "clif_patient_assessments.parquet")
    row = a.filter(pl.col("categorical_value").is_not_null() & pl.col("numerical_value").is_null())
    row = row.head(1).with_columns(pl.lit("Maria Lopez").alias("categorical_value"))
    pl.concat([a, row]).write_parquet(data / "clif_patient_assessments.parquet")
    code = f"ASMT_{row['assessment_category'][0]}"
    # The demo's 100 patients: a site policy with cells of 5, as the demo's tokenizer.
    cells = "policy.stats.min_cell_count=5"
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}", cells])
    context = Context(1, 1, {"data-path": str(data), "policy-path": str(policy)}, RecordDict(), {})
    cfg = OmegaConf.to_container(load_config("tokenizer", overrides=["stats.min_cell_count=5"]))
    assert not _answer(stats, "query.stats", {"tokenizer": json.dumps(cfg)}, context).has_error()
    answer = json.loads((tmp_path / "work" / "stats-answer.json").read_text())["answer"]
    released = json.loads(answer)["codes"]
    demo = Tokenizer.load(demo_tokens / "tokenizer.json")
    planted = [f"{code}=Maria Lopez", f"{code}=Jane Roe", f"{code}=John Doe"]
    tok = dataclasses.replace(demo, vocab=(*demo.vocab, *planted))
    ours = [t for t in demo.vocab if "=" in t and t in released]
    assert ours  # answers the site released itself, in the coordinator's tokenizer

    def ids_at(ctx: Context, node: Node) -> set[int]:
        reply = _answer(tokenize, "query.tokenize", {"tokenizer": json.dumps(tok.to_dict())}, ctx)
        assert not reply.has_error()
        timelines = pl.read_parquet(node.tokens(tok.hash) / "timelines.parquet")
        return set(timelines["tokens"].explode().to_list())

    deployed = ids_at(context, Node(context))
    assert not {tok.index[t] for t in planted} & deployed
    assert {tok.index[t] for t in ours} <= deployed
    virtual_ctx = Context(
        1,
        1,
        {"partition-id": 0},
        RecordDict(),
        {"sites": str(data), "work-root": str(tmp_path / "sim")},
    )
    assert tok.index[planted[0]] in ids_at(virtual_ctx, Node(virtual_ctx))
