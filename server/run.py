"""One federated run as the server drives it: statistics and the shared tokenizer, then
pretraining and finetuning rounds with a Flower strategy, then evaluation at every site.
Replies are checked before aggregation, every round is checkpointed, and a run resumes
from its checkpoint. The same code serves simulation and deployment (it only sees a
Flower Grid)."""

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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
from fedclif.server.messaging import Messenger
from fedclif.shared.artifact import write_json
from fedclif.shared.config import write_resolved
from fedclif.shared.errors import FedclifError
from fedclif.shared.memory import peak_rss_mib
from fedclif.shared.model.models import get_weights, save_model, stage_model
from fedclif.shared.protocol.federation import (
    ARRAYS,
    BASE,
    CONFIG,
    EVALUATE_PROBE,
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
from fedclif.shared.tokens.stats import merge_stats
from fedclif.shared.tokens.tokenizer import Tokenizer, fit_tokenizer

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
    """Messages sent to the sites, waiting for their replies: `begin_*` returns one, the
    caller sends `msgs` (alone, or batched with other runs' as the study does) and passes
    the replies with it to the matching `end_*`. Tokenizing and probes need no more."""

    msgs: list[Message]


@dataclass
class RoundPending(Pending):
    """A training round's: what checking, aggregating and checkpointing its replies need."""

    stage: str
    rnd: int
    tok: Tokenizer
    base: dict | None
    strategy: object
    current: ArrayRecord
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class EvaluationPending(Pending):
    """An evaluation's: the stage it scores and the strategy that weighs its metrics."""

    stage: str
    strategy: object


@dataclass
class RoundTally:
    """A round's replies as checked: the valid ones kept for the strategy (or their
    running mean), each site's metrics, and what failed, was rejected or capped."""

    kept: list[Message] = field(default_factory=list)
    sites: dict[str, dict] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    capped: dict | None = None
    received: int = 0
    checking: float = 0.0


def _bytes(records) -> int:
    return sum(r.count_bytes() for r in records)


class FederatedRun:
    """Drives one run of `config` (the tree of shared/protocol/federation.py `load_federation`:
    its `federation`, `tokenizer`, `train` and `model` sections). `out` receives tokenizer.json,
    checkpoint/, results.json and, for a whole run, resolved.yaml."""

    def __init__(
        self,
        grid: Grid,
        config: DictConfig,
        out: str | Path,
        resume: bool = False,
        audit: str | Path | None = None,
        sites: dict[int, str] | None = None,
        announced: dict[str, dict] | None = None,
    ):
        """`sites` (node id -> name) and `announced` (site -> the sizes it announced when
        it tokenized) are given when they are already known (a study's jobs); a whole run
        learns them from the sites' answers."""
        self.grid, self.config, self.out = grid, config, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.federation_cfg, self.train_cfg, self.model_cfg = (
            config.federation,
            config.train,
            config.model,
        )
        self.link = Messenger(
            grid, self.federation_cfg.timeout_s, self.federation_cfg.min_sites, audit, sites
        )
        self.state: dict = {
            "phase": "statistics",
            "round": 0,
            "history": [],
            "sites": dict(announced or {}),
        }
        self.resume = resume
        self.streaming = (
            bool(self.federation_cfg.strategy.streaming)
            and self.federation_cfg.strategy.name in STREAMING
        )

    @property
    def sites(self) -> dict[int, str]:
        """The run's sites: node id -> name."""
        return self.link.sites

    # --- rules -------------------------------------------------------------------------

    def _enough(self, ok: list | int, what: str) -> None:
        n = ok if isinstance(ok, int) else len(ok)
        if n < int(self.federation_cfg.min_sites):
            raise FedclifError(
                f"{what}: {n} valid repl{'y' if n == 1 else 'ies'}, fewer than "
                f"min_sites={self.federation_cfg.min_sites}; the checkpoint of the last round is "
                "kept (resume when the sites are back)"
            )

    def _query(self, kind: str, content: RecordDict) -> list[Message]:
        msgs = self.link.messages(kind, content)
        ok, _ = self.link.sort(msgs, self.link.send(msgs), kind)
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
                name, s = self.link.site(node), None
            why = self.link.claim(node, name) or stats_problem(s, sig, most)
            name = self.link.sites.get(node, name)  # a registered name, whatever it answered
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
            self.link.claim(node, name)
        return dict(self.sites)

    def begin_tokenize(self, tok: Tokenizer) -> Pending:
        """Ask every site to tokenize its data with `tok` (then `end_tokenize`)."""
        content = RecordDict({CONFIG: ConfigRecord({"tokenizer": json.dumps(tok.to_dict())})})
        return Pending(self.link.messages(QUERY_TOKENIZE, content))

    def end_tokenize(self, pending: Pending, replies: list[Message]) -> None:
        ok, _ = self.link.sort(pending.msgs, replies, QUERY_TOKENIZE)
        self._enough(ok, QUERY_TOKENIZE)
        for r in ok:
            node = r.metadata.src_node_id
            if node not in self.sites and self.link.claim(
                node, site_name(r.content) or f"node-{node}"
            ):
                continue
            if why := sizes_problem(r.content):
                log.warning("tokenize: site %s: %s: its updates will be refused", node, why)
                continue  # its training replies are then refused by their size cap
            self.state["sites"][self.link.site(node)] = dict(r.content[METRICS])

    def tokenize(self, tok: Tokenizer) -> None:
        """Every site tokenizes its data with `tok` (cached there by tokenizer hash)."""
        pending = self.begin_tokenize(tok)
        self.end_tokenize(pending, self.link.send(pending.msgs))

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
    ) -> RoundPending:
        """Round `rnd` (send its messages, then pass the replies to `end_round`)."""
        current = to_record(weights)
        config = self._config(stage, rnd, tok, base)
        msgs = self.link.included(strategy.configure_train(rnd, current, config, self.grid))
        if send_base:
            for m in msgs:
                m.content[BASE] = to_record(base)
        return RoundPending(msgs, stage, rnd, tok, base, strategy, current)

    def end_round(self, pending: RoundPending, replies: Iterable[Message], n: int) -> dict:
        """Check, aggregate and checkpoint the replies of a round (any iterable: a stream
        is folded in as it comes, see server/aggregate.py); returns the new global
        weights. Rejected and failed sites are logged; too few valid replies end the run
        (its last checkpoint stays)."""
        what = f"{pending.stage} round {pending.rnd}"
        tally = self._check_and_fold(pending, replies, what)
        self._enough(len(tally.sites), what)
        agg, metrics = pending.strategy.aggregate_train(pending.rnd, tally.kept)
        # The model's own dtypes (FedOpt computes in float64): sites answer in them.
        current = pending.current
        weights = {k: v.astype(current[k].dtype, copy=False) for k, v in from_record(agg).items()}
        self._record_round(pending, tally, dict(metrics) if metrics else {})
        save_checkpoint(self.out, self._state(pending.tok), weights, pending.strategy, pending.base)
        loss = dict(metrics or {}).get("train_loss", float("nan"))
        log.info("%s/%d: %d site(s), loss %.3f", what, n, len(tally.sites), loss)
        return weights

    def _check_and_fold(
        self, pending: RoundPending, replies: Iterable[Message], what: str
    ) -> RoundTally:
        """Check each reply as it comes and fold the valid ones into the round's mean
        (streaming: each reply goes once folded) or keep them for the strategy."""
        tally = RoundTally()
        running = RunningMean() if self.streaming else None
        fold = tally.kept.append if running is None else lambda r: running.add(r.content)
        bounded = HeaviestHeld(self.federation_cfg.checks.max_weight_ratio, fold)
        dp = float(self.train_cfg.dp.epsilon) > 0
        max_ratio = float(self.federation_cfg.checks.max_update_ratio)
        for r in self.link.replies(pending.msgs, replies, what, tally.failed):
            site = self.link.site(r.metadata.src_node_id)
            tally.received += _bytes(r.content.array_records.values())
            t0 = time.perf_counter()
            cap = self.max_examples(site, pending.stage)
            why = train_reply_problem(r.content, pending.current, dp, cap, max_ratio)
            tally.checking += time.perf_counter() - t0
            if why:
                tally.rejected.append({"site": site, "reason": why})
                log.warning("%s: rejected site %s: %s", what, site, why)
                continue
            tally.sites[site] = dict(r.content[METRICS])
            bounded.add(site, r)  # folded (streaming: and the reply goes), or kept
        tally.capped = bounded.finish()
        if tally.capped:
            c = tally.capped
            log.warning(
                "%s: site %s's weight %.3g capped at %.3g (max_weight_ratio)",
                *(what, c["site"], c["announced"], c["counted"]),
            )
        if running is not None and tally.sites:  # the strategy aggregates one reply: the mean
            tally.kept = [Message(running.result(), dst_node_id=0, message_type="train")]
        return tally

    def _record_round(self, pending: RoundPending, tally: RoundTally, metrics: dict) -> None:
        """The round in the run's history (results.json) and state."""
        msgs = pending.msgs
        self.state["history"].append(
            {
                "phase": pending.stage,
                "round": pending.rnd,
                "seconds": time.perf_counter() - pending.t0,
                "ended": time.time(),  # wall clock, to line rounds up with other logs
                "bytes_sent": sum(_bytes(m.content.array_records.values()) for m in msgs),
                "bytes_received": tally.received,
                "checks_seconds": tally.checking,
                # This process's peak memory so far: flat in the number of sites when
                # streaming (bench/simulate.py).
                "server_peak_mib": peak_rss_mib(),
                "sites": tally.sites,
                "failed": tally.failed,
                "rejected": tally.rejected,
                "capped": [tally.capped] if tally.capped else [],
                # Sites of this run the round could not ask: gone from the SuperLink's
                # nodes (a stopped daemon) before it started.
                "absent": sorted(
                    set(self.sites.values())
                    - {self.link.site(m.metadata.dst_node_id) for m in msgs}
                ),
                "metrics": metrics,
            }
        )
        self.state.update(phase=pending.stage, round=pending.rnd)

    def max_examples(self, site: str, stage: str) -> float:
        """The most training examples `site` can have in a round of `stage`, from what it
        announced when it tokenized (stays and tokens, each rounded down by less than its
        minimum cell, which is at most its stays): caps its weight in the aggregate."""
        a = self.state["sites"].get(site, {})
        stays, tokens = float(a.get("stays", 0)), float(a.get("tokens", 0))
        if stage == "finetune":  # a stay each (all its tasks in one); under DP a patient each
            return 2 * stays
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
            weights = self.end_round(pending, self.link.stream(pending.msgs), n)
        return weights

    def begin_probes(self, tok: Tokenizer, weights: dict) -> Pending:
        """Ask every site to fit linear probes of the run's tasks on the frozen pretrained
        `weights` (then `end_probes`)."""
        content = RecordDict(
            {ARRAYS: to_record(weights), CONFIG: self._config("pretrain", 0, tok, None)}
        )
        return Pending(self.link.messages(TRAIN_PROBE, content))

    def end_probes(self, pending: Pending, replies: list[Message]) -> dict[str, dict]:
        """Each site's probes (arrays for `begin_evaluate(probes=...)`), by site name."""
        ok, _ = self.link.sort(pending.msgs, replies, TRAIN_PROBE)
        tasks, shape = (
            list(self.train_cfg.finetune.tasks),
            self.model_cfg.shapes[self.model_cfg.arch],
        )
        probes = {}
        for r in ok:
            site = self.link.site(r.metadata.src_node_id)
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
    ) -> EvaluationPending:
        """Ask every site to evaluate `weights` on its `split` ("all": every stay, for a
        model that never saw the site's data); with `probes`, those linear probes on the
        pretrained `weights` instead of the finetuned model (then `end_evaluate`)."""
        strategy = make_strategy(self.federation_cfg)
        config = self._config(stage, 0, tok, base)
        config["eval_split"] = split
        if probes is None:
            msgs = strategy.configure_evaluate(0, to_record(weights), config, self.grid)
            msgs = self.link.included(msgs)
        else:
            content = {ARRAYS: to_record(weights), CONFIG: config, PROBES: to_record(probes)}
            msgs = self.link.messages(EVALUATE_PROBE, RecordDict(content))
        for m in msgs:
            if base is not None:
                m.content[BASE] = to_record(base)
        return EvaluationPending(msgs, stage, strategy)

    def end_evaluate(self, pending: EvaluationPending, replies: list[Message]) -> dict:
        """Per-site and example-weighted metrics of an evaluation, and what each site's
        policy withheld (task -> reason)."""
        ok, failed = self.link.sort(pending.msgs, replies, "evaluation")
        rejected = []
        for r in list(ok):
            if why := evaluate_reply_problem(r.content):
                rejected.append({"site": self.link.site(r.metadata.src_node_id), "reason": why})
                log.warning("evaluation: rejected site %s: %s", rejected[-1]["site"], why)
                ok.remove(r)
        per_site = {self.link.site(r.metadata.src_node_id): dict(r.content[METRICS]) for r in ok}
        withheld = {
            self.link.site(r.metadata.src_node_id): dict(r.content[WITHHELD])
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
        return self.end_evaluate(pending, self.link.send(pending.msgs))

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
            self.link.remember({int(k): v for k, v in saved["site_names"].items()})
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
