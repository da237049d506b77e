"""Every site reply is checked here before anything aggregates it. A reply that fails is
rejected with its rule (a name and numbers, never data) and the round goes on with the
others: no single site can end a run, or steer it past these bounds."""

import math
from numbers import Real

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import (
    ARRAYS,
    CONFIG,
    DP_TRAIN_METRICS,
    METRICS,
    TRAIN_METRICS,
    WEIGHT_KEY,
    WITHHELD,
)


def update_problem(reply: ArrayRecord, current: ArrayRecord, max_ratio: float) -> str | None:
    """Why a reply's arrays must not be aggregated, or None: other keys, dtypes or shapes
    than the global model's, non-finite values, or an update (reply minus global weights)
    longer than `max_ratio` times the global weights' L2 norm (a poisoned or diverged
    site)."""
    if set(reply.keys()) != set(current.keys()):
        missing = sorted(set(current.keys()) - set(reply.keys()))
        extra = sorted(set(reply.keys()) - set(current.keys()))
        return f"keys: missing {missing[:2]}, unexpected {extra[:2]}"
    sq = ref_sq = 0.0
    for k, arr in current.items():
        got = reply[k]
        if got.dtype != arr.dtype:
            return f"dtype {got.dtype} != {arr.dtype} for {k}"
        if tuple(got.shape) != tuple(arr.shape):
            return f"shape {tuple(got.shape)} != {tuple(arr.shape)} for {k}"
        try:
            values = got.numpy()
        except Exception:  # bytes that do not decode as the dtype they claim
            return f"unreadable array {k}"
        if not np.isfinite(values).all():
            return f"non-finite values in {k}"
        ref = arr.numpy().astype(np.float64)
        sq += float(np.sum((values.astype(np.float64) - ref) ** 2))
        ref_sq += float(np.sum(ref**2))
    ratio = math.sqrt(sq / ref_sq) if ref_sq > 0 else 0.0
    if ratio > max_ratio:
        return f"update norm {ratio:.3g} x the global weights' > {max_ratio:.3g}"
    return None


def train_reply_problem(
    content: RecordDict, current: ArrayRecord, dp: bool, max_examples: float, max_ratio: float
) -> str | None:
    """Why a training reply must not be aggregated, or None: its records (one ArrayRecord
    `arrays`, one MetricRecord `metrics`, nothing else), its metrics (exactly
    TRAIN_METRICS, or DP_TRAIN_METRICS under DP, numbers; `num-examples` positive and at most
    `max_examples`, what the site announced) and its arrays (`update_problem`)."""
    arrays, metrics = content.array_records, content.metric_records
    if ARRAYS not in arrays:
        return "missing_arrays"
    if set(arrays) != {ARRAYS} or set(metrics) != {METRICS} or len(content.config_records):
        return f"records: {sorted([*arrays, *metrics, *content.config_records])}"
    m = metrics[METRICS]
    expected = set(DP_TRAIN_METRICS if dp else TRAIN_METRICS)
    if set(m) != expected:
        return (
            f"metric keys: missing {sorted(expected - set(m))}, extra {sorted(set(m) - expected)}"
        )
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in m.values()):
        return "metric values: not finite numbers"
    n = m[WEIGHT_KEY]
    if not 0 < n <= max_examples:
        return f"{WEIGHT_KEY} {n:.3g} outside (0, {max_examples:,.0f}] (announced)"
    return update_problem(arrays[ARRAYS], current, max_ratio)


def evaluate_reply_problem(content: RecordDict) -> str | None:
    """Why an evaluation reply must not be averaged, or None: one MetricRecord `metrics`
    of numbers or lists of numbers (NaN where a metric is undefined) with a non-negative
    `num-examples`; besides it only the WITHHELD record."""
    if set(content.metric_records) != {METRICS} or len(content.array_records):
        return f"records: {sorted([*content.array_records, *content.metric_records])}"
    if set(content.config_records) - {WITHHELD}:
        return f"records: {sorted(content.config_records)}"
    m = content.metric_records[METRICS]
    n = m.get(WEIGHT_KEY)
    if not isinstance(n, int | float) or not math.isfinite(n) or n < 0:
        return f"{WEIGHT_KEY}: not a non-negative number"
    if not all(isinstance(v, int | float | list) for v in m.values()):
        return "metric values: not numbers"
    return None


def site_name(content: RecordDict) -> str | None:
    """The site name a reply gives (its CONFIG record's `site`), or None when it gives
    none that could be one (a string of 1-100 characters)."""
    if CONFIG not in content.config_records:
        return None
    name = content.config_records[CONFIG].get("site")
    return name if isinstance(name, str) and 0 < len(name) <= 100 else None


def sizes_problem(content: RecordDict) -> str | None:
    """Why a tokenizing reply's announced sizes cannot be used, or None: one MetricRecord
    `metrics` of exactly `stays` and `tokens`, non-negative integers."""
    if set(content.metric_records) != {METRICS} or len(content.array_records):
        return f"records: {sorted([*content.array_records, *content.metric_records])}"
    m = content.metric_records[METRICS]
    if set(m) != {"stays", "tokens"} or not all(_count(v) for v in m.values()):
        return "sizes: stays and tokens must be non-negative integers"
    return None


PROBE_PARTS = ("mean", "scale", "coef", "intercept")


def probe_reply_problem(content: RecordDict, tasks: list[str], width: int) -> str | None:
    """Why a site's linear probes must not be sent to other sites, or None: one ArrayRecord
    of `<task>.<part>` arrays (a task of the run, all four parts of client/probe.py
    `fit_probes`: float vectors of the model's `width`, a one-value intercept, finite,
    scales positive) and one MetricRecord holding a positive `num-examples`."""
    if set(content.array_records) != {ARRAYS} or set(content.metric_records) != {METRICS}:
        return f"records: {sorted([*content.array_records, *content.metric_records])}"
    if len(content.config_records):
        return f"records: {sorted(content.config_records)}"
    n = content.metric_records[METRICS].get(WEIGHT_KEY)
    if not isinstance(n, int | float) or not math.isfinite(n) or n <= 0:
        return f"{WEIGHT_KEY}: not a positive number"
    arrays = content.array_records[ARRAYS]
    fitted = {k.rsplit(".", 1)[0] for k in arrays}
    expected = {f"{t}.{p}" for t in fitted for p in PROBE_PARTS}
    if not fitted <= set(tasks) or set(arrays.keys()) != expected:
        return f"probe arrays: {sorted(set(arrays.keys()) ^ expected)[:2] or sorted(fitted)[:2]}"
    for k, arr in arrays.items():
        shape = (1,) if k.endswith(".intercept") else (width,)
        if arr.dtype not in ("float32", "float64") or tuple(arr.shape) != shape:
            return f"probe array {k}: {arr.dtype} {tuple(arr.shape)}, not float {shape}"
        values = arr.numpy()
        if not np.isfinite(values).all():
            return f"probe array {k}: non-finite values"
        if k.endswith(".scale") and not (values > 0).all():
            return f"probe array {k}: a scale not positive"
    return None


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def stats_problem(stats, sig_figs: int, max_codes: int) -> str | None:
    """Why a site's statistics must not enter the shared tokenizer, or None: the shape
    shared/tokens/stats.py writes, counts that are non-negative integers, at most `max_codes`
    codes, histogram values finite and on the `sig_figs` grid, one count per value."""
    if not isinstance(stats, dict) or not {"codes", "numeric", "n_stays"} <= set(stats):
        return "statistics: not a statistics record"
    codes, numeric = stats["codes"], stats["numeric"]
    if not isinstance(codes, dict) or not isinstance(numeric, dict):
        return "statistics: codes and numeric must be maps"
    if len(codes) > max_codes or len(numeric) > max_codes:
        return f"statistics: {max(len(codes), len(numeric)):,} codes > {max_codes:,}"
    if not all(isinstance(c, str) and _count(n) for c, n in codes.items()):
        return "statistics: code counts must be non-negative integers"
    if stats["n_stays"] is not None and not _count(stats["n_stays"]):
        return "statistics: n_stays must be a non-negative integer"
    for code, h in numeric.items():
        if not isinstance(h, dict) or not isinstance(h.get("values"), list):
            return f"statistics: histogram of {code} is not one"
        values, counts = h["values"], h.get("counts")
        if not isinstance(counts, list) or len(counts) != len(values):
            return f"statistics: histogram of {code}: one count per value"
        if not all(_count(n) for n in [*counts, h.get("suppressed", 0)]):
            return f"statistics: histogram of {code}: counts must be non-negative integers"
        if not all(
            isinstance(v, Real) and math.isfinite(v) and float(f"{v:.{sig_figs}g}") == v
            for v in values
        ):
            return f"statistics: histogram of {code}: values off the {sig_figs}-digit grid"
    return None


def shared_codes(
    stats: dict[str, dict], min_sites: int | None, max_share: float
) -> tuple[dict[str, dict], list[dict]]:
    """The sites' statistics (already `stats_problem`-free), restricted to the codes the
    federation shares, and what was trimmed from whom: a code needs `min_sites` senders
    (None: 2 where 3 or more sites sent statistics, else 1), and a site's own codes (sent
    by it alone) are at most `max_share` of the vocabulary, the ones it counted least
    dropped first. One site cannot stuff the vocabulary past every other site's
    `model.max_vocab`, nor put a word in it alone where others could vouch."""
    if not 0 < max_share < 1:
        raise FedclifError(f"federation.checks.max_code_share: in (0, 1), got {max_share}")
    senders: dict[str, set[str]] = {}
    for site, s in stats.items():
        for code, n in s["codes"].items():
            if n > 0:
                senders.setdefault(code, set()).add(site)
    need = int(min_sites) if min_sites is not None else (2 if len(stats) >= 3 else 1)
    allowed = {c for c, who in senders.items() if len(who) >= need}
    trimmed = []
    for site, s in stats.items():
        # Most counted first, ties by name: the same statistics trim the same codes in
        # every run (a set's order changes with the process's hash seed).
        own = sorted(
            (c for c in allowed if senders[c] == {site}), key=lambda c: (-s["codes"][c], c)
        )
        limit = math.floor(max_share / (1 - max_share) * (len(allowed) - len(own)))
        if len(stats) > 1 and len(own) > limit:
            allowed -= set(own[limit:])
            why = f"own codes over max_code_share {max_share:g}"
            trimmed.append({"site": site, "codes_dropped": len(own) - limit, "reason": why})
    kept = {
        site: {
            **s,
            "codes": {c: n for c, n in s["codes"].items() if c in allowed},
            "numeric": {c: h for c, h in s["numeric"].items() if c in allowed},
        }
        for site, s in stats.items()
    }
    return kept, trimmed
