"""Federation costs: protocol overhead per round, bytes per round for full weights versus
LoRA, and the server's aggregation memory as the number of sites grows.

1. A real loopback deployment (`server/loopback.py`: TLS, site authentication, one
   SuperNode per synthetic site), tiny model: per pretraining round, wall time minus the
   slowest site's local training (`train_seconds`, reported by the sites), as a share of
   that compute. Everything outside training counts as overhead: messaging, the
   per-message ClientApp process start, imports, data loading, model building.
2. Bytes per round per site for full weights and for LoRA adapters + head (one way; a
   round sends and receives about that each), from the real model's ArrayRecords.
3. Server peak RSS aggregating N replies of an ~80 MB model, each N in a fresh process:
   Flower's FedAvg (`aggregate_arrayrecords`, every reply held) against fedclif's
   streaming running mean (server/aggregate.py), and the reply checks' cost per reply.
4. What the site's checks add to each message (client/policy.py, approval.py,
   ledger.py), median ms over `--reps`, beside the message's own work on the demo site
   (its statistics; a 5-step tiny-model training round) measured in the same run.

    python -m bench.federation                        # 3 sites, 3 rounds, N = 2, 8, 32
    python -m bench.federation --sites 0 --replies 2 4      # parts 2, 3 and 4
    python -m bench.federation --sites 0 --replies 2 --reps 3 --quick   # what tests run
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.measure import measure, tokenized_demo


def _tok(root: Path):
    """The demo's tokenizer (a real vocabulary size for the payloads)."""
    from fedclif.shared.tokens.tokenizer import Tokenizer

    return Tokenizer.load(tokenized_demo(root / "demo") / "tokenizer.json")


def payload_bytes(root: Path) -> dict[str, int]:
    """Bytes of one round's arrays for full pretraining weights and for LoRA + head."""
    from fedclif.shared.config import load_config
    from fedclif.shared.model.models import build_model, get_weights, setup
    from fedclif.shared.protocol.federation import to_record

    tok = _tok(root)
    out = {}
    for size in ("tiny", "small"):
        cfg = load_config("train", overrides=["finetune.peft=lora"])
        model = build_model(load_config(f"model/{size}"), tok)
        setup(model, cfg, "pretrain")
        out[f"{size} full"] = to_record(get_weights(model)).count_bytes()
        setup(model, cfg, "finetune")
        out[f"{size} lora+head"] = to_record(get_weights(model)).count_bytes()
    return out


# Part 3's model: ~80 MB (float32), the `small` Mamba-2 widened and deepened; `--quick`:
# the `small` model itself (~8 MB).
BIG_MODEL = [
    "model.size=small",
    "model.shapes.mamba2.hidden_size=512",
    "model.shapes.mamba2.num_heads=16",
    "model.shapes.mamba2.num_hidden_layers=12",
]
QUICK_MODEL = ["model.size=small"]


def _big_weights(root: Path, model: list[str]) -> dict:
    from fedclif.shared.config import load_tree
    from fedclif.shared.model.models import build_model, get_weights, setup

    cfg = load_tree(("model", "train"), (), None, model)
    model = build_model(cfg.model, _tok(root))
    setup(model, cfg.train, "pretrain")
    return get_weights(model)


def _reply(w: dict, i: int):
    import numpy as np
    from flwr.app import MetricRecord, RecordDict

    from fedclif.shared.protocol.federation import to_record

    rng = np.random.default_rng(i)
    arrays = {k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) for k, v in w.items()}
    return RecordDict(
        {"arrays": to_record(arrays), "metrics": MetricRecord({"num-examples": 100 + i})}
    )


def _hold_and_aggregate(root: Path, n: int, streaming: bool, model: list[str]) -> int:
    """Aggregate n replies of `model`: Flower's FedAvg holding them all, or fedclif's
    running mean taking them one at a time (server/aggregate.py); returns parameters."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedclif.server.aggregate import RunningMean

    w = _big_weights(root, model)
    if streaming:
        running = RunningMean()
        for i in range(n):
            running.add(_reply(w, i))  # the reply is dropped once folded in
        running.result()
    else:
        aggregate_arrayrecords([_reply(w, i) for i in range(n)], "num-examples")
    return sum(v.size for v in w.values())


def check_cost(root: Path, model: list[str], reps: int = 5) -> tuple[float, float]:
    """Median seconds of the reply checks (server/checks.py) and of folding one reply
    in, for one reply of `model`."""
    import time

    from fedclif.server.aggregate import RunningMean
    from fedclif.server.checks import train_reply_problem
    from fedclif.shared.protocol.federation import TRAIN_METRICS, to_record

    w = _big_weights(root, model)
    current, reply = to_record(w), _reply(w, 0)
    for k in TRAIN_METRICS:
        reply["metrics"][k] = 100
    checks, fold = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        assert train_reply_problem(reply, current, False, 1e9, 1.0) is None
        t1 = time.perf_counter()
        RunningMean().add(reply)
        fold.append(time.perf_counter() - t1)
        checks.append(t1 - t0)
    return statistics.median(checks), statistics.median(fold)


def protocol_overhead(root: Path, n_sites: int, rounds: int, steps: int, stays: int) -> list:
    from fedclif.server.loopback import Loopback
    from fedclif.simulations.synth import load_preset, write_site

    presets = ["mimic-like", "ucmc-like", "shift-none", "shift-case-mix"]
    sites = [f"site{i}" for i in range(n_sites)]
    data = {}
    for i, s in enumerate(sites):
        data[s] = root / "data" / s
        write_site(load_preset(presets[i % len(presets)]), stays, i + 1, data[s])
    lb = Loopback(root / "fed", sites)
    (root / "fed").mkdir(parents=True)
    try:
        lb.up(data)
        out = root / "fed" / "run"
        lb.run(
            out,
            f"federation.rounds.pretrain={rounds}",
            "federation.evaluate=false",
            f"federation.min_sites={n_sites}",
            f"train.pretrain.max_steps={steps}",
        )
    finally:
        lb.stop_all()
    res = json.loads((out / "results.json").read_text())
    rows = []
    for x in res["rounds"]:
        compute = max(m["train_seconds"] for m in x["sites"].values())
        rows.append((x["round"], x["seconds"], compute, x["bytes_sent"], x["bytes_received"]))
    return rows


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def check_costs(root: Path, reps: int) -> tuple[list[tuple[str, str, float]], dict[str, float]]:
    """(message, check, median ms) for every check a site runs, and the messages' own
    work (ms) on the demo site."""
    from fedclif.client.approval import approved
    from fedclif.client.ledger import Ledger
    from fedclif.client.local import train_round
    from fedclif.client.policy import (
        check_dp,
        check_model,
        check_stats,
        check_training,
        load_policy,
        withhold,
        write_policy,
    )
    from fedclif.shared.clif.site import load_site
    from fedclif.shared.config import load_config
    from fedclif.shared.model.models import count_parameters, stage_model
    from fedclif.shared.model.sequences import load_site_data
    from fedclif.shared.protocol.federation import load_federation
    from fedclif.shared.tokens.stats import site_stats

    tokens = tokenized_demo(root / "demo")
    work = root / "checks-work"
    policy_file = write_policy(root / "checks-site", [f"policy.work_dir={work}"])
    policy = load_policy(policy_file)
    run = load_federation(overrides=["train.dp.epsilon=1", "train.pretrain.max_steps=5"])
    tok_cfg = load_config("tokenizer")
    site = load_site(root / "demo" / "clif_demo", load_config("site"))
    data = load_site_data(tokens, run.train.split, full=True)
    ledger = Ledger(work)

    def charge() -> None:
        ledger.settle(ledger.reserve(1, "pretrain", 1, 1e-6, 1e-6, 1e9), 1e-6)

    flat = {"num_examples": 500}
    for t in TASK_NAMES:
        flat |= {f"{t}_n": 100, f"{t}_prevalence": 0.2, f"{t}_auroc": 0.8}
    rows = [
        ("every message", "read the policy file", lambda: load_policy(policy_file)),
        ("every message", "hash the approved bundle", lambda: approved(work)),
        ("query.stats", "check_stats", lambda: check_stats(tok_cfg.stats, policy)),
        ("train", "check_training", lambda: check_training(run.train, policy)),
        (
            "train",
            "count parameters, check_model",
            lambda: check_model(count_parameters(run.model, data.tok), len(data.tok.vocab), policy),
        ),
        ("train", "check_dp", lambda: check_dp(run.train, "pretrain", 1000, policy)),
        ("train", "DP ledger reserve + settle (fsync)", charge),
        ("evaluate", "withhold (5 tasks)", lambda: withhold(flat, list(TASK_NAMES), policy)),
    ]
    costs = [(m, c, _median_ms(fn, reps)) for m, c, fn in rows]
    plain = load_federation(overrides=["train.pretrain.max_steps=5"]).train

    def train() -> None:
        model = stage_model(run.model, data.tok, plain, "pretrain", seed=0)
        train_round(model, data, plain, "pretrain")

    work_ms = {
        "query.stats": _median_ms(lambda: site_stats(site, tok_cfg), max(reps // 10, 3)),
        "train": _median_ms(train, 3),
    }
    return costs, work_ms


TASK_NAMES = ("death", "long_los", "icu", "imv", "readmission")


def _print_aggregation(root: Path, replies: list[int], model: list[str]) -> None:
    print("\n3. server peak RSS aggregating N replies (each N in a fresh process)")
    first = {}
    for n in replies:
        row = {}
        for streaming in (False, True):
            _, mib, params = measure(_hold_and_aggregate, root, n, streaming, model)
            row[streaming] = mib
            first.setdefault(streaming, mib)
        print(
            f"   N={n:4d}  Flower FedAvg {row[False]:7.0f} MiB ({row[False] / first[False]:.2f}x)"
            f"   streaming {row[True]:7.0f} MiB ({row[True] / first[True]:.2f}x the N={replies[0]}"
            f" figure); model {params * 4 / 2**20:.0f} MiB"
        )
    checks, fold = check_cost(root, model)
    print(
        f"   per reply of that model: checks {1e3 * checks:.0f} ms, folding in "
        f"{1e3 * fold:.0f} ms (median of 5)"
    )


def _print_checks(costs: list, work_ms: dict, reps: int) -> None:
    print(f"\n4. the site's checks per message, median ms of {reps}")
    total: dict[str, float] = {}
    for message, check, ms in costs:
        total[message] = total.get(message, 0.0) + ms
        print(f"   {message:14} {check:40} {ms:9.3f} ms")
    every = total.pop("every message")
    for message, ms in total.items():
        line = f"   {message:14} all checks {every + ms:8.2f} ms"
        if message in work_ms:
            w = work_ms[message]
            line += f"  vs the message's work {w:9.1f} ms ({100 * (every + ms) / w:.2f}%)"
        print(line)


def _print_overhead(rows: list, args: argparse.Namespace) -> None:
    print(
        f"1. protocol overhead: {args.sites} sites on loopback (TLS, site auth), tiny "
        f"model, {args.steps} local steps of 8 x 512 tokens"
    )
    print(
        f"   {'round':>5} {'wall s':>8} {'slowest site s':>15} {'overhead s':>11} "
        f"{'% of compute':>13} {'MB sent':>8} {'MB recv':>8}"
    )
    shares = []
    for rnd, wall, compute, sent, recv in rows:
        shares.append((wall - compute) / compute)
        print(
            f"   {rnd:5d} {wall:8.1f} {compute:15.1f} {wall - compute:11.1f} "
            f"{100 * shares[-1]:12.0f}% {sent / 1e6:8.2f} {recv / 1e6:8.2f}"
        )
    print(f"   median overhead: {100 * statistics.median(shares):.0f}% of compute (aim < 10%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=3, help="0: skip the deployment part")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="local optimizer steps per round")
    ap.add_argument("--stays", type=int, default=300, help="stays per synthetic site")
    ap.add_argument("--replies", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--reps", type=int, default=50, help="repetitions of each site check")
    ap.add_argument("--quick", action="store_true", help="part 3 on the small model (tests)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.sites:
            _print_overhead(
                protocol_overhead(root, args.sites, args.rounds, args.steps, args.stays), args
            )
        print("\n2. bytes per site per round, one way")
        for k, v in payload_bytes(root).items():
            print(f"   {k:18} {v / 1e6:9.3f} MB")
        _print_aggregation(root, args.replies, QUICK_MODEL if args.quick else BIG_MODEL)
        _print_checks(*check_costs(root, args.reps), args.reps)


if __name__ == "__main__":
    main()
