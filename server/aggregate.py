"""Streaming aggregation: the weighted mean of the sites' updates folded in one reply at a
time, so the server holds the model a few times over however many sites reply.

Flower's FedAvg (and FedProx, FedAdam, FedYogi, which start from its weighted mean) takes
the list of every reply: server memory grows as (1 + N) x the model. Here each valid reply
is added to running float64 sums and dropped; the strategy then aggregates one reply that
carries the mean and the total weight, which for a weighted mean is the same thing (to
float tolerance: Flower sums in float32). Median, trimmed mean and Krum need every reply
at once and keep Flower's path."""

import math
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import ARRAYS, METRICS, WEIGHT_KEY

# The strategies (configs/federation/default.yaml names) whose aggregate is, or starts
# from, the example-weighted mean of the replies.
STREAMING = ("fedavg", "fedprox", "fedadam", "fedyogi")


class RunningMean:
    """The example-weighted mean of training replies' arrays, one reply at a time."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.total = 0.0
        self.metrics: list[RecordDict] = []  # each reply's MetricRecord alone (small)

    def add(self, content: RecordDict) -> None:
        """Fold in one reply (already checked: server/checks.py)."""
        w = float(content[METRICS][WEIGHT_KEY])
        for k, arr in content[ARRAYS].items():
            x = arr.numpy()
            if k not in self.sums:
                self.sums[k] = np.zeros(x.shape, np.float64)
                self.dtypes[k] = x.dtype
            self.sums[k] += w * x.astype(np.float64)  # in float64: w * x would round to x's dtype
        self.total += w
        self.metrics.append(RecordDict({METRICS: content[METRICS]}))

    def result(self) -> RecordDict:
        """A reply's content holding the mean and the total weight, for the strategy's
        `aggregate_train` (the weighted mean of a single reply is that reply)."""
        arrays = ArrayRecord(
            {k: Array((s / self.total).astype(self.dtypes[k])) for k, s in self.sums.items()}
        )
        metrics = aggregate_metricrecords(self.metrics, WEIGHT_KEY)
        metrics[WEIGHT_KEY] = self.total
        return RecordDict({ARRAYS: arrays, METRICS: MetricRecord(dict(metrics))})


class HeaviestHeld:
    """Bounds one site's influence on a round's weighted mean: its weight is at most
    `ratio` times all the other sites' together (a rogue site that announces 10^9
    examples counts as much as the rest, no more). Replies are passed on to `fold` as they
    come, but for the heaviest so far, held back (one model more in memory, whatever the
    number of sites) until `finish` knows the others' total and caps it. With `ratio` >= 1
    only the heaviest can pass the cap: any other weighs at most as much as it."""

    def __init__(self, ratio: float | None, fold: Callable[[Message], None]):
        if ratio is not None and not float(ratio) >= 1:
            key = "federation.checks.max_weight_ratio"
            raise FedclifError(f"{key}: at least 1 or null, got {ratio}")
        self.ratio, self.fold = ratio, fold
        self.held: tuple[str, Message] | None = None
        self.total = 0.0

    def add(self, site: str, reply: Message) -> None:
        w = _weight(reply)
        self.total += w
        if self.held is None or w > _weight(self.held[1]):
            if self.held is not None:
                self.fold(self.held[1])
            self.held = (site, reply)
        else:
            self.fold(reply)

    def finish(self) -> dict | None:
        """Fold the heaviest reply, capped; what was capped (site, announced, counted)."""
        if self.held is None:
            return None
        site, reply = self.held
        w = _weight(reply)
        others = self.total - w
        cap = math.inf if self.ratio is None or others <= 0 else self.ratio * others
        capped = None
        if w > cap:
            reply.content[METRICS][WEIGHT_KEY] = cap
            capped = {"site": site, "announced": w, "counted": cap}
        self.fold(reply)
        self.held = None
        return capped


def _weight(reply: Message) -> float:
    return float(reply.content[METRICS][WEIGHT_KEY])
