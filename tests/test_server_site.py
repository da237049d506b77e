"""Server and site pieces that need no running federation: strategies from config, the
strategy state a checkpoint keeps, update checks inside a round, the site's DP budget and
error categories."""

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedclif.client.app import _category
from fedclif.server.checkpoint import restore_strategy, strategy_state
from fedclif.server.run import STRATEGIES, FederatedRun, make_strategy
from fedclif.shared.errors import FedclifError
from fedclif.shared.federation import (
    ARRAYS,
    ERRORS,
    FLOWER_ERRORS,
    METRICS,
    SiteRefusal,
    load_federation,
    to_record,
)
from fedclif.shared.tokenizer import Tokenizer


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


def test_fedadam_moments_survive_a_checkpoint():
    s = make_strategy(load_federation(overrides=["federation.strategy.name=fedadam"]).federation)
    rng = np.random.default_rng(0)
    s.m_t = {"w": rng.normal(size=(3, 2))}
    s.v_t = {"w": rng.random((3, 2))}
    s.current_arrays = {"w": rng.normal(size=(3, 2))}
    flat = strategy_state(s)
    assert set(flat) == {"m_t/w", "v_t/w", "current_arrays/w"}
    fresh = make_strategy(
        load_federation(overrides=["federation.strategy.name=fedadam"]).federation
    )
    restore_strategy(fresh, flat)
    for attr in ("m_t", "v_t", "current_arrays"):
        np.testing.assert_array_equal(getattr(fresh, attr)["w"], getattr(s, attr)["w"])


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
        return [11, 12, 13]


def test_poisoned_replies_are_rejected_and_the_round_goes_on(tmp_path, demo_tokens, monkeypatch):
    """A round with an honest site, one sending NaN and one sending weights scaled by 1e6:
    both bad replies are rejected by site name, the global model is the honest update."""
    # Flower's ServerApp process sets its run and node; messages need them.
    for attr, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, v)
    fed = load_federation(
        overrides=["federation.min_sites=1", "federation.checks.max_update_norm=100"]
    )
    run = FederatedRun(_Nodes(), fed, tmp_path)
    run.sites = {11: "honest", 12: "nan", 13: "scaled"}
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    rng = np.random.default_rng(0)
    current = {"w": rng.normal(size=(4, 3)).astype(np.float32)}
    pending = run.begin_round("pretrain", 1, tok, current, None, make_strategy(fed.federation))
    msgs = pending.msgs
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12, 13]
    honest = {"w": current["w"] + 0.01}
    sent = {11: honest, 12: {"w": np.full((4, 3), np.nan, np.float32)},
            13: {"w": current["w"] * 1e6}}  # fmt: skip
    replies = []
    for m in msgs:
        m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"  # as a Grid does
        TaskIdentity._node_id = m.metadata.dst_node_id  # the site answering
        content = RecordDict({ARRAYS: to_record(sent[m.metadata.dst_node_id]),
                              METRICS: MetricRecord({"num-examples": 10})})  # fmt: skip
        replies.append(Message(content, reply_to=m))
    weights = run.end_round(pending, replies, 1)
    np.testing.assert_allclose(weights["w"], honest["w"])
    h = run.state["history"][-1]
    why = {x["site"]: x["reason"] for x in h["rejected"]}
    assert set(why) == {"nan", "scaled"}
    assert "non-finite" in why["nan"] and "norm" in why["scaled"]
    assert set(h["sites"]) == {"honest"}
    assert (tmp_path / "checkpoint" / "weights.safetensors").is_file()
