"""What the server and the sites agree on: the run's config, message record names, and
error categories (a site reports a category, never the text of an exception, which could
quote patient data)."""

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from omegaconf import DictConfig, OmegaConf

from fedclif.shared.config import load_tree
from fedclif.shared.errors import FedclifError

# Record names inside message content.
ARRAYS, CONFIG, METRICS, BASE, STATS = "arrays", "config", "metrics", "base", "stats"
PROBES = "probes"
# Evaluation replies: the tasks a site's policy withheld, and why (task -> reason).
WITHHELD = "withheld"
# Message types the ClientApp answers (besides Flower's plain train and evaluate).
QUERY_INFO, QUERY_STATS, QUERY_TOKENIZE = "query.info", "query.stats", "query.tokenize"
# Linear probes on a frozen pretrained model: fitted at one site, scored at any.
TRAIN_PROBE, EVALUATE_PROBE = "train.probe", "evaluate.probe"

# What a training reply's MetricRecord holds, nothing else; under DP-SGD `epsilon` too and
# not the loss (a statistic of the training patients the DP-SGD noise does not cover).
# WEIGHT_KEY weighs the site's update in FedAvg and its kin.
WEIGHT_KEY = "num-examples"
TRAIN_METRICS = (
    WEIGHT_KEY,
    "train_loss",
    "steps",
    "load_seconds",
    "train_seconds",
)
DP_TRAIN_METRICS = (*(m for m in TRAIN_METRICS if m != "train_loss"), "epsilon")

# Error codes a site may send (above Flower's own, 0-8). Anything unexpected is INTERNAL,
# whatever it said.
ERRORS = {
    101: "invalid_data",  # the site's CLIF export or tokenized data failed checks
    102: "out_of_memory",
    103: "dp_budget_exhausted",  # the round would spend more epsilon than the site allows
    104: "missing_base",  # a LoRA round arrived before the site had the pretrained base
    105: "tokenizer_mismatch",
    106: "policy",  # the request breaks the site's policy (the reason names the rule)
    107: "unapproved_app",  # the run's app bundle is not one the site approved
    199: "internal",
}
# Flower's own error replies (flwr.common.constant.ErrorCode), by what they mean here.
FLOWER_ERRORS = {
    1: "clientapp_failed",
    2: "clientapp_failed",
    3: "no_reply",
    4: "no_reply",
    5: "site_unavailable",
    8: "clientapp_failed",
}
ERROR_CODE = {name: code for code, name in ERRORS.items()}


RUN_SECTIONS = ("federation", "tokenizer", "train", "model")
RUN_LAYERS = ("federation/default",)
# The Flower strategy's keyword arguments, checked when it is built.
OPEN_KEYS = ("federation.strategy.options",)


def load_federation(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """A federated run's config tree: `federation` (rounds, strategy, checks),
    `tokenizer` (what the run asks of the sites' statistics: each site's policy may
    refuse), `train` (the sites' local rounds, configs/train.yaml under
    configs/federation/default.yaml) and `model`; then a user file and
    `section.key=value` overrides."""
    return load_tree(RUN_SECTIONS, RUN_LAYERS, path, overrides, OPEN_KEYS)


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class SiteRefusal(FedclifError):
    """A site declines a message for a reason it may share (a category in ERRORS)."""

    def __init__(self, category: str, detail: str):
        super().__init__(detail)
        self.category = category


def received_config(data: str | dict, what: str) -> DictConfig:
    """A config a message carried (YAML text or a mapping), as data: OmegaConf resolves
    `${...}` when a value is read, and its resolvers read this process's environment and
    other keys, so any value holding one is refused (rule `configs are data`, naming the
    key, never the value)."""
    tree = OmegaConf.create(data)
    stack: list[tuple[str, object]] = [(what, OmegaConf.to_container(tree, resolve=False))]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{key}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str) and "${" in value:
            raise SiteRefusal("policy", f"policy: configs are data: {key} holds an interpolation")
    return tree


def weights_id(arrays: dict[str, np.ndarray]) -> str:
    """Content hash of a set of arrays: names a LoRA base that sites keep on disk."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()[:16]
