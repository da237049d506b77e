"""One federated run as the server drives it: statistics and the shared tokenizer, then
pretraining and finetuning rounds with a Flower strategy, then evaluation at every site.
Replies are checked before aggregation, every round is checkpointed, and a run resumes
from its checkpoint. The same code serves simulation and deployment (it only sees a
Flower Grid)."""

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from omegaconf import DictConfig, OmegaConf

from fedclif.server.aggregate import STREAMING, HeaviestHeld, RunningMean
from fedclif.server.checkpoint import (
    load_checkpoint,
    restore_strategy,
    resume_problem,
    save_checkpoint,
)
from fedclif.server.checks import (
    evaluate_reply_problem,
    probe_reply_problem,
    shared_codes,
    site_name,
    sizes_problem,
    stats_problem,
    train_reply_problem,
)
from fedclif.shared.artifact import write_json
from fedclif.shared.config import write_resolved
from fedclif.shared.errors import FedclifError
from fedclif.shared.federation import (
    ARRAYS,
    BASE,
    CONFIG,
    ERRORS,
    EVALUATE_PROBE,
    FLOWER_ERRORS,
    METRICS,
    PROBES,
    QUERY_INFO,
    QUERY_STATS,
    QUERY_TOKENIZE,
    STATS,
    TRAIN_PROBE,
    WEIGHT_KEY,
    WITHHELD,
    from_record,
    to_record,
    weights_id,
)
from fedclif.shared.memory import peak_rss_mib
from fedclif.shared.models import get_weights, save_model, stage_model
from fedclif.shared.stats import merge_stats
from fedclif.shared.tokenizer import Tokenizer, fit_tokenizer

STRATEGIES = {
    "fedavg": flwr_strategy.FedAvg,
    "fedprox": flwr_strategy.FedProx,
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedmedian": flwr_strategy.FedMedian,
    "fedtrimmedavg": flwr_strategy.FedTrimmedAvg,
    "krum": flwr_strategy.Krum,
}
log = logging.getLogger(__name__)


def make_strategy(fed: DictConfig):
    name = str(fed.strategy.name)
    if name not in STRATEGIES:
        raise FedclifError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    n = int(fed.min_sites)
    try:
        return STRATEGIES[name](
            min_train_nodes=n,
            min_evaluate_nodes=n,
            min_available_nodes=n,
            weighted_by_key=WEIGHT_KEY,
            **OmegaConf.to_container(fed.strategy.options),
        )
    except TypeError as e:  # an option the Flower class does not take
        raise FedclifError(f"strategy.options for {name}: {e}") from e


@dataclass
class Pending:
    """Messages sent to the sites and what finishing them needs: `begin_*` returns one,
    the caller sends `msgs` (alone, or batched with other runs' as the study does) and
    passes the replies with it to the matching `end_*`."""

    msgs: list[Message]
    stage: str = ""
    rnd: int = 0
    tok: Tokenizer | None = None
    base: dict | None = None
    strategy: object = None
    current: ArrayRecord | None = None
    t0: float = field(default_factory=time.perf_counter)


def _bytes(records) -> int:
    return sum(r.count_bytes() for r in records)


class FederatedRun:
    """Drives one run of `config` (the tree of shared/federation.py `load_federation`:
    its `federation`, `tokenizer`, `train` and `model` sections). `out` receives tokenizer.json,
    checkpoint/, results.json and, for a whole run, resolved.yaml."""

    def __init__(
        self,
        grid: Grid,
        config: DictConfig,
        out: str | Path,
        resume: bool = False,
        audit: str | Path | None = None,
    ):
        self.grid, self.config, self.out = grid, config, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.federation_cfg, self.train_cfg, self.model_cfg = (
            config.federation,
            config.train,
            config.model,
        )
        self.sites: dict[int, str] = {}
        # Nodes left out of the run (a second node under a site's name), and why.
        self.excluded: dict[int, str] = {}
        self._names: dict[int, str] = {}  # registered names, by node id (`_registered`)
        self.state: dict = {"phase": "statistics", "round": 0, "history": [], "sites": {}}
        self.resume = resume
        self.timeout = float(self.federation_cfg.timeout_s)
        self.streaming = (
            bool(self.federation_cfg.strategy.streaming)
            and self.federation_cfg.strategy.name in STREAMING
        )
        # Every reply's records are written here when set: what left the sites, to inspect.
        self.audit = Path(audit) if audit else None
        self._n_audit = 0

    # --- messaging ---------------------------------------------------------------------

    def _nodes(self) -> list[int]:
        """Connected nodes, waiting (up to the timeout) until `min_sites` are there."""
        t0 = time.monotonic()
        while True:
            nodes = sorted(n for n in self.grid.get_node_ids() if n not in self.excluded)
            if len(nodes) >= int(self.federation_cfg.min_sites):
                return nodes
            if time.monotonic() - t0 > self.timeout:
                raise FedclifError(
                    f"only {len(nodes)} site(s) connected after {self.timeout:.0f} s; "
                    f"the run needs min_sites={self.federation_cfg.min_sites}"
                )
            time.sleep(1.0)

    def _site(self, node: int) -> str:
        return self.sites.get(node, f"node-{node}")

    def _registered(self, node: int) -> dict[int, str]:
        """Node id -> the name it was registered under at the SuperLink (`fedclif site
        register`; none in a simulation), asked again when `node` is not in it yet."""
        if node not in self._names:
            self._names = {n.node_id: n.name for n in self.grid.get_nodes() if n.name}
        return self._names

    def _claim(self, node: int, claimed: str) -> str | None:
        """Name `node`. A registered node is named by its registration, bound to its key,
        whatever it answers; an unregistered one (a simulation's) by its answer, unless
        another node holds that name, registered or connected: the node is then left out
        of the run, whoever came first (two sites under one name would overwrite each
        other's records). A site back under a new node id (a resumed simulation) takes
        its name back."""
        registered = self._registered(node)
        if node in registered:
            name = registered[node]
            if claimed != name:
                log.info("node %d answers as %r; it is registered as %r", node, claimed, name)
            holders = []
        else:
            name = claimed
            holders = [n for n, v in self.sites.items() if n != node and v == name]
            live = set(self.grid.get_node_ids()) if holders else set()
            if name in registered.values() or any(n in live for n in holders):
                self.excluded[node] = why = f"duplicate site name {name!r}"
                log.warning("node %d left out of the run: %s", node, why)
                return why
        for n in holders:
            del self.sites[n]
        self.sites[node] = name
        return None

    def _included(self, msgs) -> list[Message]:
        return [m for m in msgs if m.metadata.dst_node_id not in self.excluded]

    def _send(self, pending: Pending) -> list[Message]:
        """Send a request's messages and wait (up to the timeout) for the replies."""
        return list(self.grid.send_and_receive(pending.msgs, timeout=self.timeout))

    def _stream(self, pending: Pending, poll_s: float = 2.0) -> Iterator[Message]:
        """Send a request's messages; the replies one at a time as they arrive (up to the
        timeout), each pulled alone so that no more than one is held here."""
        waiting = set(self.grid.push_messages(pending.msgs))  # now, not at the first next()

        def replies() -> Iterator[Message]:
            end = time.monotonic() + self.timeout
            while waiting and time.monotonic() < end:
                for mid in list(waiting):
                    for r in self.grid.pull_messages([mid]):
                        waiting.discard(r.metadata.reply_to_message_id)
                        yield r
                if waiting:
                    time.sleep(poll_s)

        return replies()

    def _exchange(self, msgs: list[Message], what: str) -> tuple[list[Message], list[dict]]:
        return self.sort_replies(msgs, self._send(Pending(msgs)), what)

    def sort_replies(
        self, msgs: list[Message], replies: Iterable[Message], what: str
    ) -> tuple[list[Message], list[dict]]:
        """The replies with content, and failures as (site, category), silent sites
        included, each logged by name."""
        failed: list[dict] = []
        return list(self._replies(msgs, replies, what, failed)), failed

    def _replies(
        self, msgs: list[Message], replies: Iterable[Message], what: str, failed: list[dict]
    ) -> Iterator[Message]:
        """The replies with content, as they come; failures go to `failed` (the silent
        sites' once the replies end), each logged by name."""
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        answered, n_failed = set(), len(failed)
        for r in replies:
            self._audit(r, what)
            # Error replies the SuperLink makes for a lost site come from the SuperLink:
            # name the site the message was for.
            node = dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            if r.has_error():
                code = r.error.code
                name = ERRORS.get(code) or FLOWER_ERRORS.get(code, "internal")
                failure = {"site": self._site(node), "error": name}
                if name == "policy":  # the site names the rule its policy applied
                    failure["reason"] = str(r.error.reason)
                failed.append(failure)
            else:
                yield r
        failed += [
            {"site": self._site(m.metadata.dst_node_id), "error": "no_reply"}
            for m in msgs
            if m.metadata.dst_node_id not in answered
        ]
        for f in failed[n_failed:]:
            log.warning("%s: site %s failed (%s)", what, f["site"], f.get("reason", f["error"]))

    def _audit(self, reply: Message, what: str) -> None:
        if self.audit is None:
            return
        self.audit.mkdir(parents=True, exist_ok=True)
        self._n_audit += 1
        base = self.audit / f"{self._n_audit:04d}-{what.replace(' ', '_')}"
        records = {}
        if not reply.has_error():
            c = reply.content
            records = {
                "config": {k: dict(v) for k, v in c.config_records.items()},
                "metrics": {k: dict(v) for k, v in c.metric_records.items()},
                "arrays": {k: sorted(v.keys()) for k, v in c.array_records.items()},
            }
            for k, rec in c.array_records.items():
                np.savez(f"{base}-{k}.npz", **from_record(rec))
        error = (
            {"code": reply.error.code, "reason": reply.error.reason} if reply.has_error() else None
        )
        Path(f"{base}.json").write_text(json.dumps({"records": records, "error": error}))

    def _enough(self, ok: list | int, what: str) -> None:
        n = ok if isinstance(ok, int) else len(ok)
        if n < int(self.federation_cfg.min_sites):
            raise FedclifError(
                f"{what}: {n} valid repl{'y' if n == 1 else 'ies'}, fewer than "
                f"min_sites={self.federation_cfg.min_sites}; the checkpoint of the last round is "
                "kept (resume when the sites are back)"
            )

    def _messages(self, kind: str, content: RecordDict) -> list[Message]:
        """One message of type `kind` with `content` to every site."""
        return [
            Message(content=content.copy(), dst_node_id=n, message_type=kind) for n in self._nodes()
        ]

    def _query(self, kind: str, content: RecordDict) -> list[Message]:
        msgs = self._messages(kind, content)
        ok, _ = self._exchange(msgs, kind)
        self._enough(ok, kind)
        return ok

    # --- phases ------------------------------------------------------------------------

    def collect_stats(self) -> dict[str, dict]:
        """Every site's mergeable statistics, by site name."""
        tok_cfg = self.config.tokenizer
        content = RecordDict(
            {CONFIG: ConfigRecord({"tokenizer": json.dumps(OmegaConf.to_container(tok_cfg))})}
        )
        stats, left_out = {}, []
        sig, most = int(tok_cfg.stats.sig_figs), int(self.federation_cfg.checks.max_codes_per_site)
        for r in self._query(QUERY_STATS, content):
            node = r.metadata.src_node_id
            try:
                name, s = str(r.content[STATS]["site"]), json.loads(str(r.content[STATS]["json"]))
            except Exception:  # a record that is not what a site sends
                name, s = self._site(node), None
            why = self._claim(node, name) or stats_problem(s, sig, most)
            name = self.sites.get(node, name)  # a registered name, whatever it answered
            if why:
                left_out.append({"site": name, "node": node, "reason": why})
                log.warning("statistics: site %s left out of the tokenizer: %s", name, why)
                continue
            stats[name] = s
        self.state["statistics"] = {"sites": sorted(stats), "left_out": left_out}
        self._enough(list(stats), QUERY_STATS)
        return stats

    def name_sites(self) -> dict[int, str]:
        """Ask every site its name (no data is read); node id -> name."""
        for r in self._query(QUERY_INFO, RecordDict()):
            node, name = r.metadata.src_node_id, site_name(r.content)
            if name is None:
                log.warning("info: node %d gave no site name: left unnamed", node)
                continue
            self._claim(node, name)
        return dict(self.sites)

    def begin_tokenize(self, tok: Tokenizer) -> Pending:
        """Ask every site to tokenize its data with `tok` (then `end_tokenize`)."""
        content = RecordDict({CONFIG: ConfigRecord({"tokenizer": json.dumps(tok.to_dict())})})
        return Pending(self._messages(QUERY_TOKENIZE, content), tok=tok)

    def end_tokenize(self, pending: Pending, replies: list[Message]) -> None:
        ok, _ = self.sort_replies(pending.msgs, replies, QUERY_TOKENIZE)
        self._enough(ok, QUERY_TOKENIZE)
        for r in ok:
            node = r.metadata.src_node_id
            if node not in self.sites and self._claim(node, site_name(r.content) or f"node-{node}"):
                continue
            if why := sizes_problem(r.content):
                log.warning("tokenize: site %s: %s: its updates will be refused", node, why)
                continue  # its training replies are then refused by their size cap
            self.state["sites"][self._site(node)] = dict(r.content[METRICS])

    def tokenize(self, tok: Tokenizer) -> None:
        """Every site tokenizes its data with `tok` (cached there by tokenizer hash)."""
        pending = self.begin_tokenize(tok)
        self.end_tokenize(pending, self._send(pending))

    def statistics(self) -> Tokenizer:
        """Every site's mergeable statistics -> one tokenizer -> every site tokenizes."""
        if self.federation_cfg.statistics:
            checks = self.federation_cfg.checks
            stats, trimmed = shared_codes(
                self.collect_stats(), checks.min_sites_per_code, float(checks.max_code_share)
            )
            self.state["statistics"]["trimmed"] = trimmed
            for t in trimmed:
                log.warning(
                    "statistics: %d code(s) of site %s left out of the vocabulary: %s",
                    t["codes_dropped"],
                    t["site"],
                    t["reason"],
                )
            tok = fit_tokenizer(merge_stats(list(stats.values())), self.config.tokenizer)
        else:
            tok = Tokenizer.load(self.federation_cfg.tokenizer)
        tok.save(self.out / "tokenizer.json")
        self.tokenize(tok)
        return tok

    def _config(self, stage: str, rnd: int, tok: Tokenizer, base: dict | None) -> ConfigRecord:
        return ConfigRecord(
            {
                "stage": stage,
                "round": rnd,
                # The part of its phase the round is: picks a staged pretraining's
                # objectives (a one-round run spans every stage).
                "progress": max(rnd - 1, 0) / max(int(self.federation_cfg.rounds[stage]), 1),
                "progress_end": max(rnd, 1) / max(int(self.federation_cfg.rounds[stage]), 1),
                "seed": int(self.federation_cfg.seed) * 100_003 + len(self.state["history"]),
                "train": OmegaConf.to_yaml(self.train_cfg),
                "model": json.dumps(OmegaConf.to_container(self.model_cfg)),
                "tokenizer_hash": tok.hash,
                "base_id": weights_id(base) if base is not None else "",
            }
        )

    def begin_round(
        self,
        stage: str,
        rnd: int,
        tok: Tokenizer,
        weights: dict,
        base: dict | None,
        strategy,
        send_base: bool = False,
    ) -> Pending:
        """Round `rnd` (send its messages, then pass the replies to `end_round`)."""
        current = to_record(weights)
        config = self._config(stage, rnd, tok, base)
        msgs = self._included(strategy.configure_train(rnd, current, config, self.grid))
        if send_base:
            for m in msgs:
                m.content[BASE] = to_record(base)
        return Pending(msgs, stage, rnd, tok, base, strategy, current)

    def end_round(self, pending: Pending, replies: Iterable[Message], n: int) -> dict:
        """Check, aggregate and checkpoint the replies of a round (any iterable: a stream
        is folded in as it comes, see server/aggregate.py); returns the new global
        weights. Rejected and failed sites are logged; too few valid replies end the run
        (its last checkpoint stays)."""
        stage, rnd, current, msgs = pending.stage, pending.rnd, pending.current, pending.msgs
        strategy, what = pending.strategy, f"{stage} round {pending.rnd}"
        sent = sum(_bytes(m.content.array_records.values()) for m in msgs)
        running = RunningMean() if self.streaming else None
        kept, rejected, failed, sites, received, checking = [], [], [], {}, 0, 0.0
        fold = kept.append if running is None else lambda r: running.add(r.content)
        bounded = HeaviestHeld(self.federation_cfg.checks.max_weight_ratio, fold)
        dp = float(self.train_cfg.dp.epsilon) > 0
        for r in self._replies(msgs, replies, what, failed):
            site = self._site(r.metadata.src_node_id)
            received += _bytes(r.content.array_records.values())
            t0 = time.perf_counter()
            why = train_reply_problem(
                r.content,
                current,
                dp,
                self.max_examples(site, stage),
                float(self.federation_cfg.checks.max_update_ratio),
            )
            checking += time.perf_counter() - t0
            if why:
                rejected.append({"site": site, "reason": why})
                log.warning("%s: rejected site %s: %s", what, site, why)
                continue
            sites[site] = dict(r.content[METRICS])
            bounded.add(site, r)  # folded (streaming: and the reply goes), or kept
        capped = bounded.finish()
        if capped:
            log.warning(
                "%s: site %s's weight %.3g capped at %.3g (max_weight_ratio)",
                what,
                capped["site"],
                capped["announced"],
                capped["counted"],
            )
        self._enough(len(sites), what)
        if running is not None:  # the strategy aggregates the one reply of the mean
            kept = [Message(running.result(), dst_node_id=0, message_type="train")]
        agg, metrics = strategy.aggregate_train(rnd, kept)
        # The model's own dtypes (FedOpt computes in float64): sites answer in them.
        weights = {k: v.astype(current[k].dtype, copy=False) for k, v in from_record(agg).items()}
        self.state["history"].append(
            {
                "phase": stage,
                "round": rnd,
                "seconds": time.perf_counter() - pending.t0,
                "ended": time.time(),  # wall clock, to line rounds up with other logs
                "bytes_sent": sent,
                "bytes_received": received,
                "checks_seconds": checking,
                # This process's peak memory so far: flat in the number of sites when
                # streaming (bench/simulate.py).
                "server_peak_mib": peak_rss_mib(),
                "sites": sites,
                "failed": failed,
                "rejected": rejected,
                "capped": [capped] if capped else [],
                # Sites of this run the round could not ask: gone from the SuperLink's
                # nodes (a stopped daemon) before it started.
                "absent": sorted(
                    set(self.sites.values()) - {self._site(m.metadata.dst_node_id) for m in msgs}
                ),
                "metrics": dict(metrics) if metrics else {},
            }
        )
        self.state.update(phase=stage, round=rnd)
        save_checkpoint(self.out, self._state(pending.tok), weights, strategy, pending.base)
        log.info(
            "%s round %d/%d: %d site(s), loss %.3f",
            stage,
            rnd,
            n,
            len(sites),
            dict(metrics or {}).get("train_loss", float("nan")),
        )
        return weights

    def max_examples(self, site: str, stage: str) -> float:
        """The most training examples `site` can have in a round of `stage`, from what it
        announced when it tokenized (stays and tokens, each rounded down by less than its
        minimum cell, which is at most its stays): caps its weight in the aggregate."""
        a = self.state["sites"].get(site, {})
        stays, tokens = float(a.get("stays", 0)), float(a.get("tokens", 0))
        if stage == "finetune":  # a (stay, task) pair each; under DP a patient each
            return 2 * stays * len(self.train_cfg.finetune.tasks)
        blocks = (tokens + stays) / int(self.train_cfg.pretrain.context) + 1
        return max(blocks, 2 * stays)  # packed blocks; under DP a patient each

    def rounds(
        self,
        stage: str,
        n: int,
        tok: Tokenizer,
        weights: dict,
        base: dict | None,
        start: int = 0,
        strategy=None,
    ):
        """Rounds start+1..n of `stage`; returns the final global weights."""
        strategy = strategy or make_strategy(self.federation_cfg)
        for rnd in range(start + 1, n + 1):
            # The LoRA base goes once per server process: sites keep it on disk.
            pending = self.begin_round(
                stage,
                rnd,
                tok,
                weights,
                base,
                strategy,
                send_base=base is not None and rnd == start + 1,
            )
            weights = self.end_round(pending, self._stream(pending), n)
        return weights

    def begin_probes(self, tok: Tokenizer, weights: dict) -> Pending:
        """Ask every site to fit linear probes of the run's tasks on the frozen pretrained
        `weights` (then `end_probes`)."""
        content = RecordDict(
            {ARRAYS: to_record(weights), CONFIG: self._config("pretrain", 0, tok, None)}
        )
        return Pending(self._messages(TRAIN_PROBE, content), "pretrain", tok=tok)

    def end_probes(self, pending: Pending, replies: list[Message]) -> dict[str, dict]:
        """Each site's probes (arrays for `begin_evaluate(probes=...)`), by site name."""
        ok, _ = self.sort_replies(pending.msgs, replies, TRAIN_PROBE)
        tasks, shape = (
            list(self.train_cfg.finetune.tasks),
            self.model_cfg.shapes[self.model_cfg.arch],
        )
        probes = {}
        for r in ok:
            site = self._site(r.metadata.src_node_id)
            if why := probe_reply_problem(r.content, tasks, int(shape.hidden_size)):
                log.warning("%s: rejected site %s: %s", TRAIN_PROBE, site, why)
                continue
            probes[site] = from_record(r.content[ARRAYS])
        self._enough(list(probes), TRAIN_PROBE)
        return probes

    def begin_evaluate(
        self,
        stage: str,
        tok: Tokenizer,
        weights: dict,
        base: dict | None,
        split: str = "test",
        probes: dict | None = None,
    ) -> Pending:
        """Ask every site to evaluate `weights` on its `split` ("all": every stay, for a
        model that never saw the site's data); with `probes`, those linear probes on the
        pretrained `weights` instead of the finetuned model (then `end_evaluate`)."""
        strategy = make_strategy(self.federation_cfg)
        config = self._config(stage, 0, tok, base)
        config["eval_split"] = split
        if probes is None:
            msgs = strategy.configure_evaluate(0, to_record(weights), config, self.grid)
            msgs = self._included(msgs)
        else:
            content = {ARRAYS: to_record(weights), CONFIG: config, PROBES: to_record(probes)}
            msgs = self._messages(EVALUATE_PROBE, RecordDict(content))
        for m in msgs:
            if base is not None:
                m.content[BASE] = to_record(base)
        return Pending(msgs, stage, tok=tok, base=base, strategy=strategy)

    def end_evaluate(self, pending: Pending, replies: list[Message]) -> dict:
        """Per-site and example-weighted metrics of an evaluation, and what each site's
        policy withheld (task -> reason)."""
        ok, failed = self.sort_replies(pending.msgs, replies, "evaluation")
        rejected = []
        for r in list(ok):
            if why := evaluate_reply_problem(r.content):
                rejected.append({"site": self._site(r.metadata.src_node_id), "reason": why})
                log.warning("evaluation: rejected site %s: %s", rejected[-1]["site"], why)
                ok.remove(r)
        per_site = {self._site(r.metadata.src_node_id): dict(r.content[METRICS]) for r in ok}
        withheld = {
            self._site(r.metadata.src_node_id): dict(r.content[WITHHELD])
            for r in ok
            if WITHHELD in r.content.config_records and len(r.content[WITHHELD])
        }
        # The weighted mean covers the sites that sent something to weigh and the metrics
        # each of them sent (Flower's strategies refuse replies with different keys; a
        # site may have withheld a task, or every task).
        # Bootstrap replicates (`*_boot`) resample each site's own stays: nothing to average.
        weighed = [r for r in ok if float(r.content[METRICS].get(WEIGHT_KEY, 0)) > 0]
        common = set.intersection(*(set(r.content[METRICS]) for r in weighed)) if weighed else ()
        common = {k for k in common if not k.endswith("_boot")}
        for r in weighed:
            r.content[METRICS] = MetricRecord(
                {k: v for k, v in r.content[METRICS].items() if k in common}
            )
        agg = pending.strategy.aggregate_evaluate(0, weighed) if weighed else None
        return {
            "stage": pending.stage,
            "sites": per_site,
            "weighted": dict(agg) if agg else {},
            "failed": failed,
            "rejected": rejected,
            "withheld": withheld,
        }

    def evaluate(self, stage: str, tok: Tokenizer, weights: dict, base: dict | None) -> dict:
        pending = self.begin_evaluate(stage, tok, weights, base)
        return self.end_evaluate(pending, self._send(pending))

    def _state(self, tok: Tokenizer) -> dict:
        return {
            **self.state,
            "tokenizer_hash": tok.hash,
            "config": OmegaConf.to_container(self.config),
            "site_names": {str(k): v for k, v in self.sites.items()},
        }

    def model(self, tok: Tokenizer, stage: str, base: dict | None, weights: dict | None):
        """The stage's model: seeded fresh weights, then the pretrained base (finetuning),
        then `weights` when given."""
        return stage_model(
            self.model_cfg,
            tok,
            self.train_cfg,
            stage,
            base,
            weights,
            seed=int(self.federation_cfg.seed),
        )

    def _save_final(self, tok: Tokenizer, stage: str, base: dict | None, weights: dict) -> None:
        """The global model as a fedclif checkpoint in OUT/model (LoRA: adapters and head,
        on the pretrained base in OUT/model-base), ready for `fedclif train finetune
        --from` or `train probe --model` at any site."""
        model = self.model(tok, stage, base, weights)
        lora = stage == "finetune" and self.train_cfg.finetune.peft == "lora"
        if lora:
            save_model(
                self.model(tok, "pretrain", None, base), self.out / "model-base", tok, "pretrain"
            )
        save_model(
            model, self.out / "model", tok, stage, base=self.out / "model-base" if lora else None
        )

    # --- the run -----------------------------------------------------------------------

    def run(self) -> dict:
        write_resolved(self.config, self.out)
        phases = [
            ("pretrain", int(self.federation_cfg.rounds.pretrain)),
            ("finetune", int(self.federation_cfg.rounds.finetune)),
        ]
        weights, base, start, strategy = None, None, 0, None
        if self.resume:
            saved, weights, strat_state, base = load_checkpoint(self.out)
            self.state = {
                k: saved.get(k) for k in ("phase", "round", "history", "sites", "statistics")
            }
            self.sites = {int(k): v for k, v in saved["site_names"].items()}
            tok = Tokenizer.load(self.out / "tokenizer.json")
            if why := resume_problem(saved, OmegaConf.to_container(self.config), tok.hash):
                raise FedclifError(f"cannot resume {self.out}: {why}")
            start = int(saved["round"])
            strategy = make_strategy(self.federation_cfg)
            restore_strategy(strategy, strat_state)
            log.info("resuming after %s round %d", saved["phase"], start)
            # Sites may be back under new node ids (a restarted simulation): this names
            # them again, and tokenizes at a site that lost its timelines (else cached).
            self.tokenize(tok)
        else:
            tok = self.statistics()
        done_phase = self.state["phase"] if self.resume else None
        for stage, n in phases:
            if n == 0:
                continue
            if done_phase == "finetune" and stage == "pretrain":
                continue
            if done_phase != stage:
                if stage == "finetune" and weights is not None and base is None:
                    base = weights  # the pretrained global model becomes the base
                weights = get_weights(
                    self.model(tok, stage, base if stage == "finetune" else None, None)
                )
                start, strategy = 0, None
            weights = self.rounds(stage, n, tok, weights, base, start, strategy)
            done_phase = None
        last = "finetune" if int(self.federation_cfg.rounds.finetune) else "pretrain"
        results = {
            "tokenizer_hash": tok.hash,
            # Which aggregate made the model, and whether it streamed (server/aggregate.py).
            "strategy": {
                "name": str(self.federation_cfg.strategy.name),
                "streaming": self.streaming,
            },
            "statistics": self.state.get("statistics"),
            "sites": self.state["sites"],
            "rounds": self.state["history"],
        }
        if self.federation_cfg.evaluate and weights is not None:
            results["evaluation"] = self.evaluate(last, tok, weights, base)
        write_json(results, self.out / "results.json")
        if weights is not None:
            self._save_final(tok, last, base, weights)
        return results
