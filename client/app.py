"""The Flower ClientApp: what a site does when the server asks. It reads its own CLIF
data and tokenized timelines; only arrays, aggregate metrics and mergeable statistics
leave. A failure leaves as an error category (shared/protocol/federation.py ERRORS); its details
stay in the site's work directory (`errors.log`).

Node config (deployment: `flower-supernode --node-config`, written by `fedclif site
serve`): `data-path` (the CLIF directory), `policy-path` (the site's policy, which also
names its work directory and DP limits: client/policy.py) and optional `site-name`. In
simulation, node `partition-id` k takes the k-th entry of the run config's `sites`.
"""

import contextlib
import functools
import hashlib
import json
import os
import secrets
import shutil
import time
import traceback
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file, save_file

from fedclif.client.ledger import Ledger
from fedclif.client.policy import (
    check_dp,
    check_model,
    check_probe_training,
    check_stats,
    check_training,
    coarse_count,
    coarse_sizes,
    load_policy,
    refuse,
    rounded,
    site_settings,
    withhold,
    work_dir,
)
from fedclif.shared.artifact import write_json
from fedclif.shared.clif.site import load_site
from fedclif.shared.errors import FedclifError
from fedclif.shared.protocol.federation import (
    ARRAYS,
    BASE,
    CONFIG,
    ERROR_CODE,
    METRICS,
    PROBES,
    STATS,
    WEIGHT_KEY,
    WITHHELD,
    SiteRefusal,
    from_record,
    received_config,
    to_record,
    weights_id,
)
from fedclif.shared.tokens.events import OPEN_SEP
from fedclif.shared.tokens.stats import site_stats
from fedclif.shared.tokens.timelines import MANIFEST, tokenize_site
from fedclif.shared.tokens.tokenizer import Tokenizer

app = ClientApp()
BOOT_SEED = "boot-seed"
STATS_ANSWER = "stats-answer.json"


class Node:
    """This site as its node config and policy describe it. A deployed site (its node
    config names its data) takes nothing from the run config: its policy file, its data
    and its work directory are its own. A simulation's virtual site (partition k of the
    run config's `sites`) runs under the packaged default policy, its files under the run
    config's `work-root` (the researcher's own machine)."""

    def __init__(self, context: Context):
        nc, rc = context.node_config, context.run_config
        self.deployed = "data-path" in nc
        if self.deployed:
            self.data = Path(str(nc["data-path"]))
            self.name = str(nc.get("site-name", self.data.name))
            self.policy = load_policy(str(nc["policy-path"]) if "policy-path" in nc else None)
            self.work = work_dir(self.policy, self.name)
        elif "partition-id" in nc and "sites" in rc:
            paths = [p for p in str(rc["sites"]).split(",") if p]
            self.data = Path(paths[int(nc["partition-id"])])
            self.name = self.data.name
            self.policy = load_policy()
            self.work = Path(str(rc["work-root"])) / self.name
            self.work.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            raise SiteRefusal("invalid_data", "no data-path in the node config")

    def boot_seed(self) -> int:
        """The seed of this site's bootstrap resamples. A deployed site's is drawn once,
        kept in its work directory and never sent: every evaluation there pairs with
        every other (the same resamples), but a coordinator that does not know them
        cannot solve per-resample metrics for each stay's outcome, as it could with a
        known seed. A simulation's virtual sites (the researcher's own data) use 0, the
        seed of every local evaluation, so the study pairs its arms with the local ones
        (the gradient-boosted baseline)."""
        if not self.deployed:
            return 0
        path = self.work / BOOT_SEED
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(str(secrets.randbits(63)))
        return int(path.read_text())

    def data_fingerprint(self) -> str:
        """The export as it is now (each file's path, size and modification time, a MEDS
        directory's nested files too): a new export is new data, with a statistics answer
        of its own."""
        files = sorted(p for p in self.data.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for p in files:
            h.update(
                f"{p.relative_to(self.data)}:{p.stat().st_size}:{p.stat().st_mtime_ns};".encode()
            )
        return h.hexdigest()

    def answered(self, asked: str) -> str | None:
        """A deployed site's statistics answer, one per export: a request asked again gets
        the same answer (the same noise: nothing to average away), and one asked with other
        settings is refused (two answers at two cell sizes or grids, differenced, would
        give the cells each suppressed). None: no answer yet (or a simulation's site)."""
        kept = self._kept_answer()
        if kept is None or kept["data"] != self.data_fingerprint():
            return None
        if kept["asked"] != asked:
            why = f"this export's statistics went out under other settings ({STATS_ANSWER})"
            refuse("stats.one_answer", why)
        return kept["answer"]

    def _kept_answer(self) -> dict | None:
        """A deployed site's kept statistics answer (`answer`), or None."""
        path = self.work / STATS_ANSWER
        if not self.deployed or not path.is_file():
            return None
        return json.loads(path.read_text())

    def answer(self, asked: str, answer: str) -> str:
        """Keep a deployed site's statistics answer (`answered`); returns it."""
        if self.deployed:
            kept = {"data": self.data_fingerprint(), "asked": asked, "answer": answer}
            write_json(kept, self.work / STATS_ANSWER)
        return answer

    def own_vocabulary(self, tok: Tokenizer) -> Tokenizer:
        """`tok` as a deployed site encodes with it: a free-text entry (an assessment
        answer) that this site neither released in its statistics answer nor allows by
        name (`stats.allow_open`) is encoded as its table's unknown token here. A
        coordinator-made entry (an answer charted once at the site, "ASMT_cam_total=Maria
        Lopez") then never appears in the site's timelines, and its embedding row moves
        no differently from a decoy's. Which sites sent an entry cannot be checked here
        (the coordinator writes the tokenizer); what this site released can."""
        if not self.deployed:
            return tok
        kept = self._kept_answer()  # the codes of this site's one statistics answer
        released = set(json.loads(kept["answer"])["codes"]) if kept else set()
        allowed = set(self.policy.policy.stats.allow_open)
        foreign = {
            t
            for t in tok.vocab
            if OPEN_SEP in t and t not in released and t.split(OPEN_SEP, 1)[1] not in allowed
        }
        return tok.encoding_none_of(foreign)

    def tokens(self, tok_hash: str) -> Path:
        return self.work / f"tokens-{tok_hash[:16]}"

    def keep(self, used: Path, pattern: str, kind: str) -> None:
        """Mark `used` as just used, and remove the least recently used of the work
        directory's `pattern` beyond the policy's `keep.<kind>`."""
        used.touch()
        old = sorted(self.work.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
        for p in old[int(self.policy.policy.keep[kind]) :]:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def site(self):
        """The site's CLIF data, read and checked."""
        return load_site(self.data, self.policy.site)


def _category(e: BaseException) -> str:
    if isinstance(e, SiteRefusal):
        return e.category
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's
        return "out_of_memory"
    if isinstance(e, FedclifError):
        return "invalid_data"
    return "internal"


def guarded(fn):
    """Reply with an error category instead of raising: Flower would send the exception's
    text, which may quote data. The traceback is kept at the site."""

    @functools.wraps(fn)
    def handler(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except Exception as e:
            cat = _category(e)
            with contextlib.suppress(Exception):  # the reply matters more than the log
                log = Node(context).work / "errors.log"
                with log.open("a") as f:
                    f.write(f"--- {msg.metadata.message_type} ({cat})\n{traceback.format_exc()}")
            # A policy refusal names the rule and the values compared (the request's and
            # the site's own), never data; anything else leaves as its category alone.
            reason = str(e) if cat == "policy" else cat
            return Message(Error(code=ERROR_CODE[cat], reason=reason), reply_to=msg)

    return handler


def _reply(msg: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=msg)


@app.query("info")
@guarded
def info(msg: Message, context: Context) -> Message:
    """The site's name only (a simulation learns which virtual node holds which site)."""
    return _reply(msg, **{CONFIG: ConfigRecord({"site": Node(context).name})})


@app.query("stats")
@guarded
def stats(msg: Message, context: Context) -> Message:
    node = Node(context)
    raw = json.loads(str(msg.content[CONFIG]["tokenizer"]))
    tok_cfg = received_config(raw, "tokenizer")
    check_stats(tok_cfg.stats, node.policy)
    asked = json.dumps(raw, sort_keys=True)
    text = node.answered(asked)
    if text is None:
        s = site_stats(node.site(), tok_cfg, list(node.policy.policy.stats.allow_open))
        text = node.answer(asked, json.dumps(s))
    return _reply(msg, **{STATS: ConfigRecord({"json": text, "site": node.name})})


@app.query("tokenize")
@guarded
def tokenize(msg: Message, context: Context) -> Message:
    node = Node(context)
    tok = Tokenizer.from_dict(json.loads(str(msg.content[CONFIG]["tokenizer"])), "the server")
    out = node.tokens(tok.hash)  # tokenize_site keeps a copy of the tokenizer there
    if not (out / MANIFEST).is_file():
        tokenize_site(node.site(), node.own_vocabulary(tok), out)
    node.keep(out, "tokens-*", "token_sets")
    m = json.loads((out / MANIFEST).read_text())
    sizes = {k: coarse_count(m[k], k, node.policy) for k in ("stays", "tokens")}
    return _reply(
        msg,
        **{
            METRICS: MetricRecord(sizes),
            CONFIG: ConfigRecord({"site": node.name}),
        },
    )


def _model(msg: Message, node: Node, full_data: bool):
    """The model of this round's stage with the global weights in, and the site's data."""
    c = msg.content[CONFIG]
    stage = str(c["stage"])
    cfg = received_config(str(c["train"]), "train")
    check_training(cfg, node.policy)
    if node.deployed:
        cfg = site_settings(cfg, node.policy)
    # Imported here: each message runs in a fresh process, and statistics, tokenizing and
    # refusals need none of torch, transformers or peft (seconds of imports per message).
    from fedclif.shared.model.models import (
        count_parameters,
        quiet_transformers,
        stage_model,
        uses_lora,
    )
    from fedclif.shared.model.sequences import load_site_data

    quiet_transformers()
    tokens = node.tokens(str(c["tokenizer_hash"]))
    if not (tokens / MANIFEST).is_file():
        raise SiteRefusal("tokenizer_mismatch", f"no timelines for tokenizer {tokens.name}")
    node.keep(tokens, "tokens-*", "token_sets")
    data = load_site_data(tokens, cfg.split, full=full_data)
    model_cfg = received_config(json.loads(str(c["model"])), "model")
    lora = cfg.lora if stage == "finetune" and uses_lora(cfg) else None
    n_params = count_parameters(model_cfg, data.tok, cfg.pretrain, lora)
    check_model(n_params, len(data.tok.vocab), node.policy)
    base = None
    # A finetuning round names its pretrained base; LoRA rounds need it (only adapters and
    # head travel), full finetuning sends every weight that matters and may go without.
    if stage == "finetune" and (str(c["base_id"]) or uses_lora(cfg)):
        base_file = node.work / f"base-{c['base_id']}.safetensors"
        if BASE in msg.content.array_records:  # sent once per run: kept at the site
            base = from_record(msg.content[BASE])
            if weights_id(base) != str(c["base_id"]):
                raise SiteRefusal("missing_base", "the base received does not match its id")
            save_file(base, str(base_file))
        elif base_file.is_file():
            base = load_file(str(base_file))
        else:
            raise SiteRefusal("missing_base", "the pretrained base was never received")
        node.keep(base_file, "base-*.safetensors", "bases")
    weights = from_record(msg.content[ARRAYS])
    model = stage_model(model_cfg, data.tok, cfg, stage, base, weights)
    return model, data, cfg, stage


@app.train()
@guarded
def train(msg: Message, context: Context) -> Message:
    node = Node(context)
    c = msg.content[CONFIG]
    t_load = time.perf_counter()
    model, data, cfg, stage = _model(msg, node, full_data=str(c["stage"]) == "pretrain")
    t_load = time.perf_counter() - t_load
    ledger, entry = Ledger(node.work), None
    patients = data.stays[data.rows("train")].get_column("patient_id").n_unique()
    if check_dp(cfg, stage, patients, node.policy):
        # Charged before training, for good: a round that dies midway spent something.
        limit = float(node.policy.policy.dp.max_epsilon_lifetime)
        entry = ledger.reserve(
            context.run_id,
            stage,
            int(c["round"]),
            float(cfg.dp.epsilon),
            float(cfg.dp.delta),
            limit,
        )
    mu = float(c.get("proximal-mu", 0.0))
    from fedclif.client.local import train_round

    t0 = time.perf_counter()
    res = train_round(
        model,
        data,
        cfg,
        stage,
        seed=int(c["seed"]),
        proximal_mu=mu,
        progress=(float(c.get("progress", 0.0)), float(c.get("progress_end", 1.0))),
    )
    n = coarse_count(res.metrics["num_examples"], "training examples", node.policy)
    metrics = {
        # The exact count stays here: it leaves once, rounded, as FedAvg's weight.
        **{k: v for k, v in res.metrics.items() if k != "num_examples"},
        WEIGHT_KEY: n,
        # Where a round's time goes (data and model, then training); the rest is the
        # protocol's, the engine's and process start-up.
        "load_seconds": t_load,
        "train_seconds": time.perf_counter() - t0,
    }
    if entry is not None:
        ledger.settle(entry, float(res.metrics["epsilon"]))
        del metrics["train_loss"]  # not covered by DP-SGD's noise: it stays here
    return _reply(msg, **{ARRAYS: to_record(res.weights), METRICS: MetricRecord(metrics)})


def _eval_split(msg: Message, node: Node) -> str:
    """The split an evaluation asks for: a deployed site's test or validation split, or
    (a simulation's sites) every stay too, for a model that never saw the site."""
    split = str(msg.content[CONFIG].get("eval_split", "test"))
    allowed = ("test", "val") if node.deployed else ("test", "val", "all")
    if split not in allowed:
        refuse("metrics.eval_split", f"asked for none of {', '.join(allowed)}")
    return split


def _metrics_reply(msg: Message, m: dict, node: Node, tasks: list[str]) -> Message:
    """Evaluation metrics as the policy lets them leave: a task measured on too few stays
    or events is withheld, and the reply says which and why (WITHHELD)."""
    m, withheld = withhold(m, tasks, node.policy)
    if node.deployed:
        m = coarse_sizes(m, tasks, node.policy)
    else:  # the researcher's own data: the study's local arms (the gradient-boosted
        # baseline) are scored on the same stays, with their exact sizes
        m["num_examples"] = rounded(m["num_examples"], node.policy)
    m = {
        WEIGHT_KEY: m.pop("num_examples"),
        **{k: v if isinstance(v, list) else float(v) for k, v in m.items()},
    }
    records = {METRICS: MetricRecord(m)}
    if withheld:
        records[WITHHELD] = ConfigRecord(withheld)
    return _reply(msg, **records)


@app.evaluate()
@guarded
def evaluate(msg: Message, context: Context) -> Message:
    node = Node(context)
    split = _eval_split(msg, node)  # refused before anything is read
    t0 = time.perf_counter()
    model, data, cfg, stage = _model(
        msg, node, full_data=str(msg.content[CONFIG]["stage"]) == "pretrain"
    )
    from fedclif.client.local import evaluate_round

    t1 = time.perf_counter()
    m = evaluate_round(model, data, cfg, stage, split, node.boot_seed())
    m |= {"load_seconds": t1 - t0, "evaluate_seconds": time.perf_counter() - t1}
    return _metrics_reply(msg, m, node, list(cfg.finetune.tasks))


def _representations(msg: Message, node: Node, split: str):
    """The frozen pretrained model's last first-24 h state of every stay of `split`, those
    stays' outcomes, the run's tasks (name -> label column) and the training config."""
    from fedclif.client.probe import representations
    from fedclif.shared.tokens.labels import TASKS

    model, data, cfg, _ = _model(msg, node, full_data=False)
    rows = data.rows(split)
    rep = representations(model, data, rows, int(cfg.finetune.context))["last"]
    return rep, data.labels[rows], {t: TASKS[t] for t in cfg.finetune.tasks}, cfg


@app.train("probe")
@guarded
def fit_probe(msg: Message, context: Context) -> Message:
    """Linear probes fitted on this site's train split; only their coefficients (and the
    standardization's means and scales) leave."""
    from fedclif.client.probe import fit_probes

    node = Node(context)
    if node.policy.policy.dp.required:  # a probe's means and coefficients are not DP
        refuse("dp.required", "asked for linear probes, which are not DP-SGD")
    rep, labels, names, cfg = _representations(msg, node, "train")
    check_probe_training(len(rep), node.policy)
    probes = fit_probes(rep, labels, names, float(cfg.probe.C))
    n = coarse_count(len(rep), "probe training stays", node.policy)
    return _reply(msg, **{ARRAYS: to_record(probes), METRICS: MetricRecord({"num-examples": n})})


@app.evaluate("probe")
@guarded
def evaluate_probe(msg: Message, context: Context) -> Message:
    """Another site's probes (or this site's) scored on this site's `eval_split`."""
    from fedclif.client.probe import score_probes
    from fedclif.shared.evaluation.metrics import flat_metrics

    node = Node(context)
    rep, labels, names, cfg = _representations(msg, node, _eval_split(msg, node))
    res = score_probes(
        from_record(msg.content[PROBES]),
        rep,
        labels,
        names,
        int(cfg.probe.n_boot),
        node.boot_seed(),
    )
    return _metrics_reply(msg, flat_metrics(res), node, list(names))
