"""Server and site pieces that need no running federation: strategies from config, the
strategy state a checkpoint keeps, update checks inside a round, the site's DP budget and
error categories."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import OmegaConf

from fedclif.client.app import _category
from fedclif.client.policy import check_model, load_policy
from fedclif.server import checkpoint
from fedclif.server.aggregate import STREAMING, RunningMean
from fedclif.server.checkpoint import (
    load_checkpoint,
    restore_strategy,
    resume_problem,
    save_checkpoint,
)
from fedclif.server.checks import shared_codes, stats_problem
from fedclif.server.run import STRATEGIES, FederatedRun, make_strategy
from fedclif.shared.clif.site import load_site
from fedclif.shared.errors import FedclifError
from fedclif.shared.evaluation.metrics import binary_metrics, flat_metrics
from fedclif.shared.protocol.federation import (
    ARRAYS,
    CONFIG,
    ERRORS,
    FLOWER_ERRORS,
    METRICS,
    STATS,
    SiteRefusal,
    from_record,
    load_federation,
    to_record,
)
from fedclif.shared.tokens.stats import merge_stats, site_stats
from fedclif.shared.tokens.tokenizer import Tokenizer, fit_tokenizer


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_configured_strategy_is_built(name):
    s = make_strategy(
        load_federation(
            overrides=[f"federation.strategy.name={name}", "federation.min_sites=3"]
        ).federation
    )
    assert type(s) is STRATEGIES[name] and s.min_train_nodes == 3


def test_strategy_options_and_unknown_names_are_checked():
    s = make_strategy(
        load_federation(
            overrides=[
                "federation.strategy.name=fedprox",
                "federation.strategy.options.proximal_mu=0.5",
            ]
        ).federation
    )
    assert s.proximal_mu == 0.5
    with pytest.raises(FedclifError, match=r"strategy\.options"):
        make_strategy(load_federation(overrides=["federation.strategy.options.mu=1"]).federation)
    with pytest.raises(FedclifError, match="unknown strategy"):
        make_strategy(load_federation(overrides=["federation.strategy.name=fedsgd"]).federation)
    with pytest.raises(FedclifError, match="lrr"):
        load_federation(overrides=["train.pretrain.lrr=1"])
    assert load_federation(overrides=["train.pretrain.lr=0.5"]).train.pretrain.lr == 0.5


class _Learning:
    """Two sites whose update pulls the weights they are sent toward their own optimum
    (deterministic), answered through push and pull as a streaming round asks."""

    def __init__(self):
        self.sent, self.targets = {}, {11: 0.4, 12: 0.1}  # updates well inside the norm check

    def get_node_ids(self) -> list[int]:
        return list(self.targets)

    def push_messages(self, msgs):
        for m in msgs:
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            self.sent[m.metadata.message_id] = m
        return [m.metadata.message_id for m in msgs]

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            m = self.sent.pop(mid)
            n = m.metadata.dst_node_id
            TaskIdentity._node_id = n
            w = from_record(m.content[ARRAYS])["w"]
            update = {"w": (w - 0.3 * (w - self.targets[n])).astype(np.float32)}
            out.append(
                Message(RecordDict({ARRAYS: to_record(update), METRICS: _metrics()}), reply_to=m)
            )
        return out


def test_a_fedadam_run_resumed_after_round_two_ends_where_an_uninterrupted_one_does(
    tmp_path, monkeypatch
):
    """Three real FedAdam rounds against a run stopped after two and resumed from its
    checkpoint (weights and the optimizer's moments): the same weights, bit for bit; a
    resume that lost the moments does not get there."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    fed = load_federation(
        overrides=[
            "federation.strategy.name=fedadam",
            "federation.min_sites=2",
            "train.pretrain.context=10",
        ]
    )
    tok, w0 = SimpleNamespace(hash="abc"), {"w": np.full((3, 2), 0.2, np.float32)}

    def run(out: Path) -> FederatedRun:
        announced = {s: {"stays": 90, "tokens": 9000} for s in ("a", "b")}
        r = FederatedRun(_Learning(), fed, out, sites={11: "a", 12: "b"}, announced=announced)
        return r

    whole = run(tmp_path / "whole").rounds("pretrain", 3, tok, w0, None)
    run(tmp_path / "cut").rounds("pretrain", 2, tok, w0, None)
    state, weights, moments, _ = load_checkpoint(tmp_path / "cut")
    assert state["round"] == 2 and {k.split("/")[0] for k in moments} >= {"m_t", "v_t"}
    strategy = make_strategy(fed.federation)
    restore_strategy(strategy, moments)
    resumed = run(tmp_path / "cut").rounds("pretrain", 3, tok, weights, None, 2, strategy)
    np.testing.assert_array_equal(resumed["w"], whole["w"])
    forgot = run(tmp_path / "forgot").rounds("pretrain", 3, tok, weights, None, 2)
    assert not np.allclose(forgot["w"], whole["w"])


def test_errors_leave_as_categories_only():
    assert _category(SiteRefusal("missing_base", "detail")) == "missing_base"
    assert _category(FedclifError("patient 123 has a bad row")) == "invalid_data"
    assert _category(MemoryError()) == "out_of_memory"
    assert _category(ValueError("hospitalization 456")) == "internal"
    # fedclif's codes sit above Flower's own (0-8), so neither is read as the other.
    assert min(ERRORS) > max(FLOWER_ERRORS)


class _Nodes:
    """The network as a strategy sees it when sampling: node ids (the round's messages
    and replies below are real Flower messages)."""

    def get_node_ids(self) -> list[int]:
        return [11, 12]

    def get_nodes(self) -> list[NodeInfo]:
        """What the SuperLink knows of each node: here, as in a simulation, no name."""
        return [NodeInfo(node_id=n) for n in self.get_node_ids()]


def _metrics(n=100, **extra) -> MetricRecord:
    honest = {
        "num-examples": n,
        "train_loss": 2.0,
        "steps": 20,
        "load_seconds": 0.5,
        "train_seconds": 1.5,
    }
    return MetricRecord({**honest, **extra})


def _rogue_replies(w: np.ndarray) -> dict[str, tuple[RecordDict, str]]:
    """Kinds of bad training reply one site may send (given the global weights `w`), and
    the rule each must be rejected by."""
    arrays = lambda a: to_record({"w": a})  # noqa: E731
    unit = np.ones_like(w) / np.linalg.norm(np.ones_like(w))
    just_above = w + 1.01 * np.linalg.norm(w) * unit  # the bound is 1 x the weights' norm
    two = RecordDict({ARRAYS: arrays(w), "extra": arrays(w), METRICS: _metrics()})
    listed = _metrics()
    listed["num-examples"] = [1, 2]
    missing = _metrics()
    del missing["num-examples"]
    return {
        "no arrays": (RecordDict({METRICS: _metrics()}), "missing_arrays"),
        "float64": (
            RecordDict({ARRAYS: arrays(w.astype(np.float64)), METRICS: _metrics()}),
            "dtype float64 != float32 for w",
        ),
        "complex": (
            RecordDict({ARRAYS: arrays(w.astype(np.complex64)), METRICS: _metrics()}),
            "dtype complex64 != float32 for w",
        ),
        "wrong shape": (
            RecordDict({ARRAYS: arrays(w[:2]), METRICS: _metrics()}),
            "shape (2, 3) != (4, 3) for w",
        ),
        "wrong keys": (
            RecordDict({ARRAYS: to_record({"v": w}), METRICS: _metrics()}),
            "keys: missing ['w'], unexpected ['v']",
        ),
        "NaN": (
            RecordDict({ARRAYS: arrays(np.full_like(w, np.nan)), METRICS: _metrics()}),
            "non-finite values in w",
        ),
        "scaled 1e6": (
            RecordDict({ARRAYS: arrays(w * 1e6), METRICS: _metrics()}),
            "update norm 1e+06 x the global weights' > 1",
        ),
        "just above the bound": (
            RecordDict({ARRAYS: arrays(just_above), METRICS: _metrics()}),
            "update norm 1.01 x the global weights' > 1",
        ),
        "huge num-examples": (
            RecordDict({ARRAYS: arrays(w), METRICS: _metrics(10**9)}),
            "num-examples 1e+09 outside (0, 910] (announced)",
        ),
        "zero num-examples": (
            RecordDict({ARRAYS: arrays(w), METRICS: _metrics(0)}),
            "num-examples 0 outside",
        ),
        "list num-examples": (
            RecordDict({ARRAYS: arrays(w), METRICS: listed}),
            "metric values: not finite numbers",
        ),
        "missing num-examples": (
            RecordDict({ARRAYS: arrays(w), METRICS: missing}),
            "metric keys: missing ['num-examples'], extra []",
        ),
        "extra metric": (
            RecordDict({ARRAYS: arrays(w), METRICS: _metrics(x=1.0)}),
            "metric keys: missing [], extra ['x']",
        ),
        "two ArrayRecords": (two, "records: ['arrays', 'extra', 'metrics']"),
    }


ROGUE_KINDS = list(_rogue_replies(np.ones((4, 3), np.float32)))


@pytest.mark.parametrize("kind", ROGUE_KINDS)
def test_a_rogue_reply_is_rejected_by_its_rule_and_the_round_goes_on(
    tmp_path, demo_tokens, monkeypatch, kind
):
    """An honest site and a rogue one: the rogue's reply is rejected, by site name and
    rule, into the round's record; the global model is the honest site's update, exactly
    as in a round without the rogue."""
    # Flower's ServerApp process sets its run and node; messages need them.
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    fed = load_federation(overrides=["federation.min_sites=1", "train.pretrain.context=10"])
    # What each announced when it tokenized: at most (tokens + stays) / context + 1 blocks.
    announced = {s: {"stays": 90, "tokens": 9000} for s in ("honest", "rogue")}
    sites = {11: "honest", 12: "rogue"}
    run = FederatedRun(_Nodes(), fed, tmp_path, sites=sites, announced=announced)
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    current = {"w": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)}
    pending = run.begin_round("pretrain", 1, tok, current, None, make_strategy(fed.federation))
    honest = {"w": current["w"] + 0.01}
    rogue, rule = _rogue_replies(current["w"])[kind]
    replies = []
    for m in pending.msgs:
        m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"  # as a Grid does
        TaskIdentity._node_id = m.metadata.dst_node_id  # the site answering
        content = RecordDict({ARRAYS: to_record(honest), METRICS: _metrics()})
        replies.append(Message(content if m.metadata.dst_node_id == 11 else rogue, reply_to=m))
    weights = run.end_round(pending, replies, 1)
    np.testing.assert_array_equal(weights["w"], honest["w"])
    h = run.state["history"][-1]
    assert h["rejected"] == [{"site": "rogue", "reason": h["rejected"][0]["reason"]}]
    assert h["rejected"][0]["reason"].startswith(rule), h["rejected"][0]["reason"]
    assert set(h["sites"]) == {"honest"}
    assert (tmp_path / "checkpoint" / "weights.safetensors").is_file()


class _Steering(_Learning):
    """An honest site (11, its optimum at 1.0) and a rogue (12) that answers every round
    with weights of 0.001 and `announced` training examples (as many as it announced
    when it tokenized: inside the size check)."""

    def __init__(self, announced: float):
        super().__init__()
        self.targets, self.announced = {11: 1.0, 12: 0.001}, announced

    def pull_messages(self, ids):
        out = super().pull_messages(ids)
        for r in out:
            if r.metadata.src_node_id == 12:
                r.content[ARRAYS] = to_record({"w": np.full((3, 2), 0.001, np.float32)})
                r.content[METRICS] = _metrics(self.announced)
        return out


def test_a_sites_examples_are_capped_near_what_it_announced(tmp_path):
    """A round's `num-examples` may not pass what the site's announced sizes allow: every
    stay of finetuning (one example closes all its tasks) and every packed block of
    pretraining, with room for the announcement's rounding (stays rounded down by less
    than half) and no more."""
    fed = load_federation(overrides=["train.pretrain.context=100"])
    run = FederatedRun(_Nodes(), fed, tmp_path, announced={"a": {"stays": 200, "tokens": 59_800}})
    stays, blocks = 200, (59_800 + 200) / 100
    assert stays <= run.max_examples("a", "finetune") <= 2 * stays
    assert blocks <= run.max_examples("a", "pretrain") <= 2 * blocks
    assert run.max_examples("unknown", "finetune") == 0  # nothing announced, no weight


@pytest.mark.parametrize("streaming", [True, False])
def test_a_site_announcing_a_billion_examples_counts_as_much_as_the_rest(
    tmp_path, monkeypatch, streaming
):
    """A rogue site announces 10^9 stays and answers each round with weights of 0.001 and
    10^9 examples: without a cap it drags the global weights from 1 to 0.001 in one round.
    With `max_weight_ratio` 1 it counts as much as the honest site (each round's mean is
    the two replies' plain mean), every cap is on the record, and the run finishes its
    three rounds on the honest site's pull."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    settings = [
        "federation.min_sites=2",
        "train.pretrain.context=10",
        f"federation.strategy.streaming={str(streaming).lower()}",
    ]
    tok, w0 = SimpleNamespace(hash="abc"), {"w": np.ones((3, 2), np.float32)}

    def run(out: str, *overrides: str, rounds: int = 3) -> tuple[FederatedRun, dict]:
        fed = load_federation(overrides=[*settings, *overrides])
        announced = {
            "honest": {"stays": 90, "tokens": 9000},
            "rogue": {"stays": 10**9, "tokens": 10**9},
        }
        sites = {11: "honest", 12: "rogue"}
        r = FederatedRun(_Steering(1e9), fed, tmp_path / out, sites=sites, announced=announced)
        return r, r.rounds("pretrain", rounds, tok, w0, None)

    _, uncapped = run("uncapped", "federation.checks.max_weight_ratio=null", rounds=1)
    assert np.allclose(uncapped["w"], 0.001, atol=1e-4)
    r, w = run("capped")
    expected = 1.0
    for h in r.state["history"]:
        honest = expected - 0.3 * (expected - 1.0)  # the honest site's pull
        expected = (honest + 0.001) / 2
        assert h["capped"] == [{"site": "rogue", "announced": 1e9, "counted": 100.0}]
        assert set(h["sites"]) == {"honest", "rogue"} and not h["rejected"]
    np.testing.assert_allclose(w["w"], expected, rtol=1e-5)
    assert w["w"].min() > 100 * uncapped["w"].max()
    with pytest.raises(FedclifError, match=r"federation\.checks\.max_weight_ratio: at least 1"):
        run("bad", "federation.checks.max_weight_ratio=0.5")


class _Five(_Nodes):
    def get_node_ids(self) -> list[int]:
        return [11, 12, 13, 14, 15]


def _round_of(tmp_path, name: str, options: list[str], replies: dict[int, dict]) -> dict:
    """One pretraining round of strategy `name` over sites 11-15 answering `replies`."""
    settings = ["federation.min_sites=5", "train.pretrain.context=10"]
    fed = load_federation(overrides=[f"federation.strategy.name={name}", *options, *settings])
    sites = {n: f"site{n}" for n in replies}
    announced = {s: {"stays": 90, "tokens": 9000} for s in sites.values()}
    run = FederatedRun(_Five(), fed, tmp_path / name, sites=sites, announced=announced)
    current = replies.pop("current")
    tok = SimpleNamespace(hash="abc")
    pending = run.begin_round("pretrain", 1, tok, current, None, make_strategy(fed.federation))
    answers = []
    for m in pending.msgs:
        n = m.metadata.dst_node_id
        m.metadata.__dict__["_message_id"] = f"m{n}"
        TaskIdentity._node_id = n
        content = RecordDict({ARRAYS: to_record(replies[n]), METRICS: _metrics()})
        answers.append(Message(content, reply_to=m))
    return run.end_round(pending, answers, 1), pending


@pytest.mark.parametrize(
    "name,options",
    [
        ("fedmedian", []),
        ("fedtrimmedavg", ["federation.strategy.options.beta=0.2"]),
        ("krum", ["federation.strategy.options.num_malicious_nodes=1"]),
    ],
)
def test_robust_aggregation_shrugs_off_one_outlier(tmp_path, monkeypatch, name, options):
    """Four honest sites near the global model and one pulling it 40% away (inside the
    update-norm check): FedAvg moves a fifth of the way; median, trimmed mean and Krum
    stay with the honest sites (Krum returns one of them)."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    rng = np.random.default_rng(5)
    w = rng.normal(size=(10, 4)).astype(np.float32)
    replies = {
        n: {"w": w + rng.normal(0, 0.01, w.shape).astype(np.float32)} for n in (11, 12, 13, 14)
    }
    replies[15] = {"w": w * 1.4}
    avg, _ = _round_of(tmp_path, "fedavg", [], {**replies, "current": {"w": w}})
    robust, _ = _round_of(tmp_path, name, options, {**replies, "current": {"w": w}})
    assert np.abs(avg["w"] - w).max() > 0.1
    assert np.abs(robust["w"] - w).max() < 0.03
    if name == "krum":
        assert any(np.array_equal(robust["w"], replies[n]["w"]) for n in (11, 12, 13, 14))


def test_fedprox_sends_its_mu_to_every_site(tmp_path, monkeypatch):
    """The site reads `proximal-mu` from the round's config (client/app.py): FedProx's
    option is what every message carries; FedAvg's carry none (mu 0 at the site)."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    w = {"w": np.ones((2, 2), np.float32)}
    replies = {n: w for n in (11, 12, 13, 14, 15)}
    mu = ["federation.strategy.options.proximal_mu=0.7"]
    _, prox = _round_of(tmp_path, "fedprox", mu, {**replies, "current": w})
    _, plain = _round_of(tmp_path, "fedavg", [], {**replies, "current": w})
    assert [m.content[CONFIG]["proximal-mu"] for m in prox.msgs] == [0.7] * 5
    assert all("proximal-mu" not in m.content[CONFIG] for m in plain.msgs)


class _Pushing(_Nodes):
    """The network as a streaming round sees it: messages pushed, replies pulled by id;
    node 11 answers with `honest` weights, node 12 stays silent."""

    def __init__(self, honest: dict):
        self.honest, self.sent = honest, {}

    def push_messages(self, msgs):
        for m in msgs:
            m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
            self.sent[m.metadata.message_id] = m
        return list(self.sent)

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            m = self.sent[mid]
            if m.metadata.dst_node_id == 11:
                TaskIdentity._node_id = 11
                content = RecordDict({ARRAYS: to_record(self.honest), METRICS: _metrics()})
                out.append(Message(content, reply_to=m))
        return out


def test_a_silent_site_is_waited_for_until_the_timeout_then_left_out(
    tmp_path, demo_tokens, monkeypatch
):
    """A site that never answers holds its round up to `timeout_s`, no longer: the round
    ends with the site that answered and names the silent one."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    fed = load_federation(
        overrides=["federation.min_sites=1", "federation.timeout_s=1", "train.pretrain.context=10"]
    )
    current = {"w": np.ones((4, 3), np.float32)}
    honest = {"w": current["w"] + 0.01}
    sites = {11: "honest", 12: "silent"}
    announced = {s: {"stays": 90, "tokens": 9000} for s in sites.values()}
    run = FederatedRun(_Pushing(honest), fed, tmp_path, sites=sites, announced=announced)
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    weights = run.rounds("pretrain", 1, tok, current, None)
    np.testing.assert_array_equal(weights["w"], honest["w"])
    (h,) = run.state["history"]
    assert list(h["sites"]) == ["honest"] and h["rejected"] == []
    assert h["failed"] == [{"site": "silent", "error": "no_reply"}]
    assert h["seconds"] >= 1  # it waited out the timeout for the silent site


class _Replying(_Nodes):
    """The network answering each message with the content `answer(node)` gives."""

    def __init__(self, answer):
        self.answer = answer

    def send_and_receive(self, msgs, timeout=None):
        out = []
        for m in msgs:
            m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
            TaskIdentity._node_id = m.metadata.dst_node_id
            out.append(Message(self.answer(m.metadata.dst_node_id), reply_to=m))
        return out


def _stats_reply(name: str, stats) -> RecordDict:
    text = stats if isinstance(stats, str) else json.dumps(stats)
    return RecordDict({STATS: ConfigRecord({"site": name, "json": text})})


@pytest.mark.parametrize(
    "kind,poison,rule",
    [
        ("negative count", lambda s: s["codes"].update(x=-5), "code counts must be non-negative"),
        (
            "negative cell",
            lambda s: next(iter(s["numeric"].values()))["counts"].__setitem__(0, -3),
            "counts must be non-negative integers",
        ),
        (
            "negative suppressed",
            lambda s: next(iter(s["numeric"].values())).update(suppressed=-1),
            "counts must be non-negative integers",
        ),
        ("float count", lambda s: s["codes"].update(x=1.5), "code counts must be non-negative"),
        (
            "too many codes",
            lambda s: s["codes"].update({f"c{i}": 10 for i in range(60_000)}),
            "statistics: 60,",
        ),
        (
            "NaN value",
            lambda s: next(iter(s["numeric"].values())).update(values=[float("nan")], counts=[10]),
            "values off the 3-digit grid",
        ),
        (
            "off the grid",
            lambda s: next(iter(s["numeric"].values())).update(values=[1.23456], counts=[10]),
            "values off the 3-digit grid",
        ),
        (
            "counts and values differ",
            lambda s: next(iter(s["numeric"].values()))["counts"].append(10),
            "one count per value",
        ),
        ("huge n_stays", lambda s: s.update(n_stays=-1), "n_stays must be"),
        ("not statistics", lambda s: s.clear(), "not a statistics record"),
    ],
)
def test_poisoned_statistics_are_left_out_of_the_tokenizer(
    tmp_path, site_dir, site_cfg, tok_cfg, monkeypatch, kind, poison, rule
):
    """A site whose statistics break a rule is left out of the shared tokenizer, by name
    and rule; the honest site's statistics alone make it."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    honest = site_stats(load_site(site_dir, site_cfg), tok_cfg)
    bad = json.loads(json.dumps(honest))
    poison(bad)
    grid = _Replying(
        lambda n: _stats_reply("honest", honest) if n == 11 else _stats_reply("rogue", bad)
    )
    run = FederatedRun(grid, load_federation(overrides=["federation.min_sites=1"]), tmp_path)
    assert list(run.collect_stats()) == ["honest"]
    (left,) = run.state["statistics"]["left_out"]
    assert (
        left["site"] == "rogue"
        and left["reason"].startswith("statistics: ")
        and rule in left["reason"]
    )


def test_a_second_site_under_a_taken_name_is_left_out_of_the_run(
    tmp_path, site_dir, site_cfg, tok_cfg, monkeypatch
):
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    honest = site_stats(load_site(site_dir, site_cfg), tok_cfg)
    grid = _Replying(lambda n: _stats_reply("a", honest))
    run = FederatedRun(grid, load_federation(overrides=["federation.min_sites=1"]), tmp_path)
    assert list(run.collect_stats()) == ["a"]
    assert run.state["statistics"]["left_out"] == [
        {"site": "a", "node": 12, "reason": "duplicate site name 'a'"}
    ]
    assert run.link.nodes() == [11]  # node 12 gets no further message
    assert run.link.excluded == {12: "duplicate site name 'a'"}


class _Registered(_Replying):
    """Node 9 answers first; node 11 is registered at the SuperLink as "a"; node 9 as
    `rogue_name` (None: not registered, as a node with a key registered under no name)."""

    def __init__(self, answer, rogue_name: str | None):
        super().__init__(answer)
        self.names = {11: "a"} | ({9: rogue_name} if rogue_name else {})

    def get_node_ids(self) -> list[int]:
        return [9, 11]

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, name=self.names.get(n, "")) for n in self.get_node_ids()]


@pytest.mark.parametrize("registered_as", ["rogue", None])
def test_a_site_name_is_bound_to_its_registered_key(
    tmp_path, site_dir, site_cfg, tok_cfg, monkeypatch, registered_as
):
    """A node answering first as "a" does not take the name of the node registered as
    "a": registered under another name, it is named by its registration; registered under
    none, it is left out of the run. Either way the real "a" is in."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    honest = site_stats(load_site(site_dir, site_cfg), tok_cfg)
    both = _stats_reply("a", honest)  # to statistics and to the name query
    both[CONFIG] = ConfigRecord({"site": "a"})
    grid = _Registered(lambda n: both, registered_as)
    run = FederatedRun(grid, load_federation(overrides=["federation.min_sites=1"]), tmp_path)
    stats = run.collect_stats()
    if registered_as:
        assert sorted(stats) == ["a", "rogue"] and run.sites == {9: "rogue", 11: "a"}
        assert run.state["statistics"]["left_out"] == [] and not run.link.excluded
    else:
        assert list(stats) == ["a"] and run.sites == {11: "a"}
        assert run.link.excluded == {9: "duplicate site name 'a'"}
        assert run.link.nodes() == [11]
        assert run.name_sites() == {11: "a"}  # asked again, still bound


def test_one_site_cannot_stuff_the_shared_vocabulary(site_dir, site_cfg, tok_cfg):
    """A rogue sends an honest site's statistics plus 49,000 junk codes (under
    max_codes_per_site). With two sites its own codes are trimmed to as many as the other
    site sent (max_code_share 0.5), its most counted first, and the honest site's model
    cap still holds; with three, a code needs two senders and no junk is left at all.
    Honest federations lose nothing."""
    honest = site_stats(load_site(site_dir, site_cfg), tok_cfg)
    rogue = json.loads(json.dumps(honest))
    rogue["codes"] |= {f"LAB_junk{i}": 10 + i for i in range(49_000)}
    assert stats_problem(rogue, 3, 50_000) is None  # the old bound let it through
    fed = load_federation().federation.checks

    def vocab(stats: dict) -> set[str]:
        kept, trimmed = shared_codes(stats, fed.min_sites_per_code, float(fed.max_code_share))
        return set(fit_tokenizer(merge_stats(list(kept.values())), tok_cfg).vocab), trimmed

    pair, _ = vocab({"honest": honest, "honest2": honest})
    # Honest federations lose nothing: two sites, and three, as if unchecked.
    assert pair == set(fit_tokenizer(merge_stats([honest, honest]), tok_cfg).vocab)
    trio = {"honest": honest, "honest2": honest, "honest3": honest}
    assert vocab(trio) == (set(fit_tokenizer(merge_stats([honest] * 3), tok_cfg).vocab), [])
    stuffed, trimmed = vocab({"honest": honest, "rogue": rogue})
    n_honest = sum(1 for n in honest["codes"].values() if n > 0)
    assert trimmed == [
        {
            "site": "rogue",
            "codes_dropped": 49_000 - n_honest,
            "reason": "own codes over max_code_share 0.5",
        }
    ]
    junk = {t for t in stuffed if "junk" in t}
    assert len(junk) == n_honest and f"LAB_junk{48_999}" in junk  # the most counted kept
    assert stuffed - junk == pair
    check_model(1000, len(stuffed), load_policy())  # under the honest site's max_vocab
    three, trimmed = vocab({"honest": honest, "honest2": honest, "rogue": rogue})
    assert three == vocab(trio)[0] and trimmed == []


def _probes(width: int, **change) -> dict[str, np.ndarray]:
    """A site's probes of death as client/probe.py `fit_probes` makes them."""
    p = {
        "death.mean": np.zeros(width),
        "death.scale": np.ones(width),
        "death.coef": np.full(width, 0.1),
        "death.intercept": np.zeros(1),
    }
    return p | change


ROGUE_PROBES = {
    "no arrays": (lambda w: RecordDict({METRICS: MetricRecord({"num-examples": 100})}), "records"),
    "other width": (lambda w: _probes(w + 1), "probe array death.mean: float64 (65,)"),
    "nan": (
        lambda w: _probes(w, **{"death.coef": np.full(w, np.nan)}),
        "probe array death.coef: non-finite",
    ),
    "zero scale": (
        lambda w: _probes(w, **{"death.scale": np.zeros(w)}),
        "probe array death.scale: a scale not positive",
    ),
    "a task not run": (lambda w: _probes(w) | {"sepsis.coef": np.ones(w)}, "probe arrays"),
    "a part missing": (
        lambda w: {k: v for k, v in _probes(w).items() if "mean" not in k},
        "probe arrays",
    ),
    "integers": (
        lambda w: _probes(w, **{"death.coef": np.ones(w, np.int64)}),
        "probe array death.coef: int64",
    ),
}


@pytest.mark.parametrize("kind", ROGUE_PROBES)
def test_a_rogue_probe_reply_is_rejected_and_the_probes_go_on(tmp_path, monkeypatch, caplog, kind):
    """A probe reply goes through server/checks.py like every other: a rogue one (which
    ended the probe phase with a KeyError) is rejected by its rule; the honest site's
    probes go on to be scored."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    fed = load_federation(overrides=["federation.min_sites=1"])
    width = int(fed.model.shapes[fed.model.arch].hidden_size)
    run = FederatedRun(_Nodes(), fed, tmp_path, sites={11: "honest", 12: "rogue"})
    pending = run.begin_probes(SimpleNamespace(hash="abc"), {"w": np.zeros(2, np.float32)})
    make, rule = ROGUE_PROBES[kind]
    bad = make(width)
    if not isinstance(bad, RecordDict):
        bad = RecordDict({ARRAYS: to_record(bad), METRICS: MetricRecord({"num-examples": 100})})
    replies = []
    for m in pending.msgs:
        m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
        TaskIdentity._node_id = m.metadata.dst_node_id
        honest = RecordDict(
            {ARRAYS: to_record(_probes(width)), METRICS: MetricRecord({"num-examples": 100})}
        )
        replies.append(Message(honest if m.metadata.dst_node_id == 11 else bad, reply_to=m))
    monkeypatch.setattr(logging.getLogger("fedclif"), "propagate", True)  # to caplog
    probes = run.end_probes(pending, replies)
    said = [r.getMessage() for r in caplog.records]
    assert list(probes) == ["honest"]
    assert any(f"rejected site rogue: {rule}" in line for line in said), said


def _evaluation(y_death, y_los, seed: int) -> RecordDict:
    """A site's evaluation reply as its ClientApp builds it (shared/evaluation/metrics.py)."""
    rng = np.random.default_rng(seed)
    per_task = {
        t: binary_metrics(np.array(y), rng.random(len(y)), threshold=0.5, n_boot=20)
        for t, y in (("death", y_death), ("long_los", y_los))
    }
    flat = flat_metrics(per_task)
    n = flat.pop("num_examples")
    return RecordDict({METRICS: MetricRecord({"num-examples": n, **flat})})


def test_a_small_site_and_a_rogue_evaluation_reply_do_not_stop_the_evaluation(
    tmp_path, demo_tokens, monkeypatch
):
    """A small honest site whose test split holds one class of a task (its ROC curve is
    undefined) is averaged over the metrics both sites have; a malformed evaluation reply
    is rejected by name and rule. Either way the evaluation ends with its results."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    fed = load_federation(overrides=["federation.min_sites=1"])
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    weights = {"w": np.zeros((2, 2), np.float32)}
    single = _evaluation([0, 1] * 15, [0] * 30, 1)  # no long stay at all
    rogue = RecordDict({METRICS: MetricRecord({"num-examples": [1.0], "death_auroc": 0.9})})
    for second, rejected in ((single, []), (rogue, ["num-examples: not a non-negative number"])):
        run = FederatedRun(_Nodes(), fed, tmp_path, sites={11: "big", 12: "second"})
        big = _evaluation([0, 1] * 30, [1, 0, 0] * 20, 0)
        pending = run.begin_evaluate("finetune", tok, weights, None)
        replies = []
        for m in pending.msgs:
            m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
            TaskIdentity._node_id = m.metadata.dst_node_id
            replies.append(Message(big if m.metadata.dst_node_id == 11 else second, reply_to=m))
        r = run.end_evaluate(pending, replies)
        assert [x["reason"] for x in r["rejected"]] == rejected
        assert ("long_los_tpr_at_fpr" in r["weighted"]) is bool(rejected)  # only both have it
        # The mean weighs each site by its examples (60 and 30 stays): not the plain mean.
        sites = r["sites"]
        n = {s: sites[s]["num-examples"] for s in sites}
        expected = sum(n[s] * sites[s]["death_auroc"] for s in sites) / sum(n.values())
        assert r["weighted"]["death_auroc"] == pytest.approx(expected, abs=1e-9)
        plain = np.mean([sites[s]["death_auroc"] for s in sites])
        assert len(sites) == 1 or abs(plain - expected) > 1e-3


def _round(n: int) -> tuple[dict, dict]:
    return {"round": n, "tokenizer_hash": "h"}, {"w": np.full((2, 2), n, np.float32)}


def test_a_crash_at_any_point_of_a_checkpoint_leaves_one_to_resume(tmp_path, monkeypatch):
    """Killed while writing round 2 (no state yet), between the swap's two renames, or
    before the old one is removed: resume finds a complete round, the newest there is."""
    strategy = make_strategy(load_federation().federation)
    save_checkpoint(tmp_path, *_round(1), strategy)
    real_rename = Path.rename

    def crash_on_second_rename(self, target):
        if self.name.endswith(".tmp"):  # the new checkpoint into place: "killed" before it
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, *_round(2), strategy)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (tmp_path / "checkpoint").exists()  # only .old (round 1) and .tmp (round 2)
    state, weights, _, _ = load_checkpoint(tmp_path)
    assert state["round"] == 2 and weights["w"][0, 0] == 2
    save_checkpoint(tmp_path, *_round(3), strategy)  # the next round cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # Killed inside the write of round 4's weights (half a file on disk): no state yet, so
    # not a checkpoint; resume takes round 3, whole.
    real_save = checkpoint._save

    def crash_in_weights(arrays, path: Path) -> None:
        if path.name == "weights.safetensors":
            path.write_bytes(b"partial")
            raise KeyboardInterrupt
        real_save(arrays, path)

    monkeypatch.setattr(checkpoint, "_save", crash_in_weights)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, *_round(4), strategy)
    state, weights, _, _ = load_checkpoint(tmp_path)
    assert state["round"] == 3 and weights["w"][0, 0] == 3


def test_resume_refuses_another_tokenizer_model_or_strategy():
    fed = load_federation()
    saved = {"tokenizer_hash": "abc", "config": OmegaConf.to_container(fed)}
    same = OmegaConf.to_container(fed)
    assert resume_problem(saved, same, "abc") is None
    assert resume_problem(saved, same, "xyz").startswith("tokenizer xyz != abc saved")
    other = OmegaConf.to_container(
        load_federation(overrides=["model.arch=llama", "federation.strategy.name=fedadam"])
    )
    why = resume_problem(saved, other, "abc")
    assert "model.arch ('mamba2' saved, 'llama' now)" in why
    assert "federation.strategy.name ('fedavg' saved, 'fedadam' now)" in why


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_aggregation_equals_flowers_on_the_same_replies(monkeypatch, name):
    """Folding replies in one at a time gives the strategy's own aggregate of the whole
    list (FedAvg's weighted mean, and FedAdam/FedYogi's step from it), to float32
    tolerance, and the same weighted metrics."""
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    rng = np.random.default_rng(3)
    current = {"w": rng.normal(size=(30, 20)).astype(np.float32), "b": np.zeros(20, np.float32)}
    replies = [
        Message(
            RecordDict(
                {
                    ARRAYS: to_record(
                        {
                            k: v + rng.normal(0, 0.1, v.shape).astype(np.float32)
                            for k, v in current.items()
                        }
                    ),
                    METRICS: _metrics(int(rng.integers(10, 500))),
                }
            ),
            dst_node_id=i,
            message_type="train",
        )
        for i in range(7)
    ]
    fed = load_federation(overrides=[f"federation.strategy.name={name}"]).federation
    whole, streamed = make_strategy(fed), make_strategy(fed)
    for s in (whole, streamed):  # as configure_train leaves a FedOpt strategy
        s.current_arrays = {k: v.copy() for k, v in current.items()}
    running = RunningMean()
    for r in replies:
        running.add(r.content)
    a, ma = whole.aggregate_train(1, replies)
    mean = Message(running.result(), dst_node_id=0, message_type="train")
    b, mb = streamed.aggregate_train(1, [mean])
    for k in current:
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), rtol=1e-5, atol=1e-6)
        assert b[k].numpy().dtype == a[k].numpy().dtype
    assert dict(mb).keys() == dict(ma).keys()
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-9)
