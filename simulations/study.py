"""The transfer study as the ServerApp runs it on the simulation engine. Every arm is a
set of federated runs (server/run.py `FederatedRun`) restricted to some of the virtual
sites: pretraining at the source alone, across the real sites, or at the pooled site;
finetuning at one site on a share of its training data; evaluation at any site. Runs of
every seed and arm that can go together are sent together, so Ray keeps every core busy.
Writes `results.json` (one row per arm, seed, task, training and evaluation site) and
`progress.json` (what is done) in the run's out-dir."""

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.serverapp import Grid
from omegaconf import DictConfig, OmegaConf

from fedclif.server.messaging import stream_replies
from fedclif.server.run import FederatedRun, Pending, make_strategy
from fedclif.shared.artifact import write_json
from fedclif.shared.errors import FedclifError
from fedclif.shared.federation import RUN_SECTIONS
from fedclif.shared.models import get_weights
from fedclif.shared.stats import merge_stats
from fedclif.shared.tokenizer import Tokenizer, fit_tokenizer
from fedclif.simulations.objectives_report import arm_name, check_sets, pretrain_override
from fedclif.simulations.sites import POOLED, SOURCE, TARGET, THIRD, site_roles


class SiteGrid:
    """A Flower Grid that shows only some nodes: a FederatedRun (and its strategy's node
    sampling) on a subset of the simulated sites."""

    def __init__(self, grid: Grid, nodes: list[int]):
        self._grid, self._nodes = grid, sorted(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@dataclass
class Lane:
    """One arm at one seed: a FederatedRun on its sites with its weights so far (and, for
    probes, the linear probes fitted on those frozen weights)."""

    arm: str
    seed: int
    run: FederatedRun
    tok: Tokenizer
    stage: str
    weights: dict
    train_sites: list[str]
    rounds: int = 1
    fraction: float = 1.0
    strategy: object = None
    probes: dict | None = None
    # Validation loss of the global model after each round, at the lane's sites (the
    # federated pretraining's curve): one {round, val_loss, sites} per round.
    curve: list | None = None


class Study:
    """The study of `cfg` (the tree of simulations/commands.py `load_study`: its `study`
    section, and the `federation`, `tokenizer`, `train` and `model` every job starts from)."""

    def __init__(self, grid: Grid, cfg: DictConfig, out: str | Path):
        self.grid, self.config, self.out = grid, cfg, Path(out)
        check_sets(cfg.study)
        # The first objective set is the one every arm pretrains with; the others only
        # the objectives question's source-only lanes (`_lane(objectives=...)`).
        self.run_config = OmegaConf.merge(
            OmegaConf.masked_copy(cfg, list(RUN_SECTIONS)),
            {"train": {"pretrain": pretrain_override(cfg.study.objectives[0])}},
        )
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.done, self.total = 0, 0
        self.t0 = self._t = time.monotonic()
        self.phases: dict[str, float] = {}
        # Seconds the sites spent per phase, by kind (simulations/report.py `profile`).
        self.work: dict[str, dict[str, float]] = {}
        self.announced: dict[str, dict] = {}

    # --- plumbing ----------------------------------------------------------------------

    def _fed(
        self,
        sites: list[str],
        seed: int = 0,
        stage: str = "pretrain",
        steps: int = 1,
        rounds: int = 1,
        fraction: float = 1.0,
        objectives: int = 0,
    ) -> DictConfig:
        """One job's config tree (the study's `federation`, `train` and `model` with this
        job's seed, rounds, sites, tasks, share, steps and objective set); with `sites`
        alone, that of a query which trains nothing (names, statistics, tokenizing)."""
        c = self.config.study
        pretrain = pretrain_override(c.objectives[objectives]) if objectives else {}
        return OmegaConf.merge(
            self.run_config,
            {
                "federation": {
                    "seed": seed,
                    "statistics": False,
                    "rounds": {
                        "pretrain": rounds if stage == "pretrain" else 0,
                        "finetune": rounds if stage == "finetune" else 0,
                    },
                    "evaluate": False,
                    "min_sites": len(sites),
                    "timeout_s": float(c.timeout_s),
                },
                "train": {
                    "seed": seed,
                    "split": {"train_fraction": fraction},
                    "finetune": {"tasks": list(c.tasks)},
                },
            },
            # Its own layer: `stage` may be "finetune", a key the layer above has too.
            {"train": {stage: {"max_steps": steps}}},
            # Lists (stages) replace rather than merge: a layer of their own too.
            {"train": {"pretrain": pretrain}},
        )

    def _run(self, name: str, sites: list[str], fed: DictConfig) -> FederatedRun:
        return FederatedRun(
            SiteGrid(self.grid, [self.nodes[s] for s in sites]),
            fed,
            self.out / "runs" / name,
            sites={self.nodes[s]: s for s in sites},
            # What each site announced when it tokenized: caps its examples in every job.
            announced={s: self.announced[s] for s in sites if s in self.announced},
        )

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name], self._t = now - self._t, now

    def _account(self, phase: str, per_site: dict[str, dict]) -> None:
        """Add the site jobs' own timings (`*_seconds` of their replies) to `phase`."""
        w = self.work.setdefault(phase, {"jobs": 0})
        for m in per_site.values():
            w["jobs"] += 1
            for k, v in m.items():
                if k.endswith("_seconds"):
                    w[k] = w.get(k, 0.0) + float(v)

    def _progress(self, what: str) -> None:
        write_json(
            {
                "done": self.done,
                "total": self.total,
                "what": what,
                "seconds": time.monotonic() - self.t0,
            },
            self.out / "progress.json",
        )

    def _send(self, batches: list[tuple[object, Pending]], what: str) -> dict:
        """Send every request's messages at once and collect the replies as they come
        (progress per reply); the replies of each request, by its key."""
        msgs = [m for _, pending in batches for m in pending.msgs]
        timeout = float(self.config.study.timeout_s)
        done, got = self.done, {}
        for r in stream_replies(self.grid, msgs, timeout, poll_s=0.2, one_at_a_time=False):
            got[r.metadata.reply_to_message_id] = r
            self.done = done + len(got)
            self._progress(what)
        self.done = done + len(msgs)
        # Pushing gave each message its id: the replies answer them by it.
        return {
            key: [got[m.metadata.message_id] for m in p.msgs if m.metadata.message_id in got]
            for key, p in batches
        }

    # --- steps -------------------------------------------------------------------------

    def _discover(self) -> dict[str, dict]:
        """Wait for every virtual site and learn its name (data directory); the real
        sites' statistics (the pooled site's would merge to the same)."""
        names = site_roles(self.config.study)
        probe = FederatedRun(self.grid, self._fed(names), self.out / "runs")
        self.nodes = {name: node for node, name in probe.name_sites().items()}
        missing = set(names) - set(self.nodes)
        if missing:
            raise FedclifError(f"sites {sorted(missing)} did not answer")
        real = [n for n in names if n != POOLED]
        return self._run("statistics", real, self._fed(real)).collect_stats()

    def _tokenizers(self, stats: dict[str, dict]) -> dict[str, Tokenizer]:
        """Each arm's tokenizer: the source's own (source-only and its transfer), the
        target's own (target from scratch), all real sites' (federated and pooled: merged
        statistics fit the pooled data's tokenizer)."""
        tok_cfg = self.config.tokenizer
        real = [s for s in (SOURCE, TARGET, THIRD) if s in self.nodes]
        toks = {
            SOURCE: fit_tokenizer(merge_stats([stats[SOURCE]]), tok_cfg),
            TARGET: fit_tokenizer(merge_stats([stats[TARGET]]), tok_cfg),
            "federated": fit_tokenizer(merge_stats([stats[s] for s in real]), tok_cfg),
        }
        # The source's tokens at every real site: its model is tried zero-shot there.
        uses = {SOURCE: real, TARGET: [TARGET], "federated": [*real, POOLED]}
        runs = {key: self._run(f"tokenize-{key}", uses[key], self._fed(uses[key])) for key in toks}
        batches = [(key, runs[key].begin_tokenize(toks[key])) for key in toks]
        pending = dict(batches)
        replies = self._send(batches, "tokenizing")
        self.tokenized: dict[str, dict] = {}
        for key, run in runs.items():
            run.end_tokenize(pending[key], replies[key])
            self.tokenized[key] = run.state["sites"]
            for site, sizes in run.state["sites"].items():  # the largest, of any tokenizer
                old = self.announced.get(site, {})
                self.announced[site] = {k: max(v, old.get(k, 0)) for k, v in sizes.items()}
        return toks

    def _train(self, lanes: list[Lane], what: str) -> None:
        """Every lane's rounds, lanes side by side: round r of all lanes in one send, with
        the validation loss of round r - 1's global model of the lanes that keep a curve."""
        for lane in lanes:
            lane.strategy = make_strategy(lane.run.federation_cfg)
        for r in range(1, max(lane.rounds for lane in lanes) + 2):
            live = [lane for lane in lanes if r <= lane.rounds]
            batches: list[tuple[object, Pending]] = [
                (
                    id(lane),
                    lane.run.begin_round(
                        lane.stage, r, lane.tok, lane.weights, None, lane.strategy
                    ),
                )
                for lane in live
            ]
            curves = [ln for ln in lanes if ln.curve is not None and 1 <= r - 1 <= ln.rounds]
            batches += [
                (("val", id(ln)), ln.run.begin_evaluate(ln.stage, ln.tok, ln.weights, None, "val"))
                for ln in curves
            ]
            if not batches:
                break
            replies = self._send(batches, f"{what}, round {r}" if live else what)
            for lane in live:
                lane.weights = lane.run.end_round(
                    dict(batches)[id(lane)], replies[id(lane)], lane.rounds
                )
                self._account(what, lane.run.state["history"][-1]["sites"])
            for ln in curves:
                key = ("val", id(ln))
                res = ln.run.end_evaluate(dict(batches)[key], replies[key])
                self._account(what, res["sites"])
                sites = {s: float(m["loss"]) for s, m in res["sites"].items()}
                loss = float(res["weighted"].get("loss", float("nan")))
                ln.curve.append({"round": r - 1, "val_loss": loss, "sites": sites})

    def _evaluate(self, jobs: list[tuple[Lane, list[str], str]], what: str) -> None:
        """Each (lane, sites, setting): the lane's model evaluated at those sites, on their
        test splits; zero-shot on every stay (the source's model never saw those sites)."""
        batches, runs = [], {}
        split = {
            i: "all" if setting == "zero_shot" else "test" for i, (*_, setting) in enumerate(jobs)
        }
        for i, (lane, sites, _) in enumerate(jobs):
            # The lane's own run directory: evaluation writes nothing there.
            runs[i] = run = self._run(lane.run.out.name, sites, lane.run.config)
            pending = run.begin_evaluate(
                lane.stage, lane.tok, lane.weights, None, split[i], lane.probes
            )
            batches.append((i, pending))
        replies = self._send(batches, what)
        for i, (lane, _, setting) in enumerate(jobs):
            res = runs[i].end_evaluate(dict(batches)[i], replies[i])
            self._account(what, res["sites"])
            for f in res["failed"]:
                raise FedclifError(f"evaluation of {lane.arm} at {f['site']} failed: {f['error']}")
            for site, metrics in sorted(res["sites"].items()):  # not in the replies' order
                self.rows += _rows(
                    lane, site, setting, metrics, list(self.config.study.tasks), split[i]
                )

    def _lane(
        self,
        arm: str,
        sites: list[str],
        seed: int,
        tok: Tokenizer,
        stage: str,
        init: dict | None,
        fraction: float = 1.0,
        rounds: int = 1,
        steps: int | None = None,
        objectives: int = 0,
    ) -> Lane:
        """A lane whose model starts from `init` (pretrained weights) or from scratch;
        `objectives`: the index of its objective set (its arm is named after it)."""
        c = self.config.study
        if steps is None:
            steps = int(c.finetune_steps)
        fed = self._fed(sites, seed, stage, steps, rounds, fraction, objectives)
        arm = arm_name(arm, objectives, list(c.objectives))
        name = f"{arm}-{stage}-{'+'.join(sites)}-f{fraction:g}-s{seed}"
        run = self._run(name, sites, fed)
        base = init if stage == "finetune" else None
        weights = get_weights(run.model(tok, stage, base, None))
        return Lane(arm, seed, run, tok, stage, weights, sites, rounds, fraction)

    def _probes(self, lanes: list[Lane]) -> list[Lane]:
        """Linear probes of the tasks fitted on each pretrained lane's frozen model at its
        (one) site: a lane `<arm>_probe` per lane, evaluated like any other."""
        batches = [(id(lane), lane.run.begin_probes(lane.tok, lane.weights)) for lane in lanes]
        replies = self._send(batches, "fitting linear probes")
        out = []
        for lane in lanes:
            (probes,) = lane.run.end_probes(dict(batches)[id(lane)], replies[id(lane)]).values()
            out.append(replace(lane, arm=f"{lane.arm}_probe", probes=probes))
        return out

    # --- the study ---------------------------------------------------------------------

    def run(self) -> dict:
        c = self.config.study
        seeds, fractions = [int(s) for s in c.seeds], [float(f) for f in c.fractions]
        real = [SOURCE, TARGET] + ([THIRD] if c.sites.third else [])
        n_rounds, spr = int(c.pretrain.rounds), int(c.pretrain.steps_per_round)
        self.total = planned_messages(c)
        stats = self._discover()
        self.done += len(self.nodes) + len(real)
        toks = self._tokenizers(stats)
        self._phase("statistics and tokenizers")

        fed_tok = toks["federated"]
        pre = {}
        for s in seeds:
            pre[s] = {
                "source": self._lane(
                    "source_only", [SOURCE], s, toks[SOURCE], "pretrain", None, steps=n_rounds * spr
                ),
                # The validation curve of the first seed's: the seeds' curves lie within
                # 0.05 of each other (default study), and each point costs an evaluation.
                "federated": replace(
                    self._lane(
                        "federated", real, s, fed_tok, "pretrain", None, rounds=n_rounds, steps=spr
                    ),
                    curve=[] if s == seeds[0] else None,
                ),
                "pooled": self._lane(
                    "pooled", [POOLED], s, fed_tok, "pretrain", None, steps=n_rounds * spr
                ),
            }
        # The objectives question: the source-only model with each further objective set.
        sets = range(1, len(c.objectives))
        asked = objective_seeds(c)
        for s in asked:
            for k in sets:
                pre[s][k] = self._lane(
                    "source_only",
                    [SOURCE],
                    s,
                    toks[SOURCE],
                    "pretrain",
                    None,
                    steps=n_rounds * spr,
                    objectives=k,
                )
        self._train([lane for p in pre.values() for lane in p.values()], "pretraining")
        self._phase("pretraining")
        probes = self._probes([pre[s][k] for s in seeds for k in ("source", *sets) if k in pre[s]])
        self._phase("probes")

        ft, evals = [], []
        for probe in probes:
            # The objectives question is asked at the target: its lanes go nowhere else.
            away = (
                [r for r in real if r != SOURCE] if probe.arm == "source_only_probe" else [TARGET]
            )
            evals += [(probe, [SOURCE], "in_distribution"), (probe, away, "zero_shot")]
        for s in seeds:
            p = pre[s]
            src = self._lane(
                "source_only", [SOURCE], s, toks[SOURCE], "finetune", p["source"].weights
            )
            pooled = self._lane("pooled", [POOLED], s, fed_tok, "finetune", p["pooled"].weights)
            ft += [src, pooled]
            evals += [
                (src, [SOURCE], "in_distribution"),
                (src, [r for r in real if r != SOURCE], "zero_shot"),
                (pooled, real, "pooled"),
            ]
            fed_at = {}
            for f in fractions:
                for arm, tok, init in (
                    ("source_finetuned", toks[SOURCE], p["source"].weights),
                    ("target_only", toks[TARGET], None),
                    ("federated_finetuned", fed_tok, p["federated"].weights),
                ):
                    lane = self._lane(arm, [TARGET], s, tok, "finetune", init, f)
                    ft.append(lane)
                    evals.append((lane, [TARGET], "local_finetune"))
                    if arm == "federated_finetuned" and f == 1.0:
                        fed_at[TARGET] = lane
            for site in real:  # every site finetunes the federated model on all its data
                if site not in fed_at:
                    fed_at[site] = self._lane(
                        "federated_finetuned",
                        [site],
                        s,
                        fed_tok,
                        "finetune",
                        p["federated"].weights,
                    )
                    ft.append(fed_at[site])
            if s == seeds[0]:  # the cross-site matrix, once: n_sites^2 evaluations
                evals += [(fed_at[site], real, "cross_site") for site in real]
            for k in sets if s in asked else ():  # at the source, and a share at target
                at_src = self._lane(
                    "source_only", [SOURCE], s, toks[SOURCE], "finetune", p[k].weights, objectives=k
                )
                share = float(c.ablation_fraction)
                at_tgt = self._lane(
                    "source_finetuned",
                    [TARGET],
                    s,
                    toks[SOURCE],
                    "finetune",
                    p[k].weights,
                    share,
                    objectives=k,
                )
                ft += [at_src, at_tgt]
                evals += [
                    (at_src, [SOURCE], "in_distribution"),
                    (at_src, [TARGET], "zero_shot"),
                    (at_tgt, [TARGET], "local_finetune"),
                ]
        self._train(ft, "finetuning")
        self._phase("finetuning")
        self._evaluate(evals, "evaluation")
        self._phase("evaluation")

        results = {
            "config": OmegaConf.to_container(self.config),
            "sites": {k: {**v} for k, v in self.tokenized["federated"].items()},
            "tokenizers": {k: t.hash for k, t in toks.items()},
            "rows": self.rows,
            "pretraining_curves": {str(seeds[0]): pre[seeds[0]]["federated"].curve},
            "seconds": time.monotonic() - self.t0,
            "phase_seconds": self.phases,
            "site_seconds": self.work,
            "cpus": os.cpu_count(),
        }
        write_json(results, self.out / "results.json")
        self._progress("done")
        return results


def planned_messages(cfg: DictConfig) -> int:
    """Messages the study (its `study` section: `cfg`) sends, its progress bar's total."""
    real = 3 if cfg.sites.third else 2
    n_frac, rounds = len(cfg.fractions), int(cfg.pretrain.rounds)
    # names; statistics of the real sites; tokenizing with three tokenizers
    setup = (real + 1) + real + (real + 1 + real + 1)
    # source, federated and pooled pretraining; probes fitted at the source, evaluated
    # at every real site
    pretrain = 1 + rounds * real + 1 + 1 + real
    # source and pooled; three arms per fraction; the federated model at the other sites
    finetune = 2 + 3 * n_frac + real - (1 if 1.0 in [float(f) for f in cfg.fractions] else 0)
    evaluate = real + real + 3 * n_frac  # source everywhere, pooled, the target's arms
    curve = rounds * real  # the first seed's federated model on the sites' val splits
    # Per further objective set: pretraining and probes at the source (evaluated there and
    # at the target), finetuning at the source and on a share of the target, evaluated
    # there and at the target.
    ablation = (len(cfg.objectives) - 1) * (1 + 1 + 2 + 2 + 3) * len(objective_seeds(cfg))
    return (
        setup + len(cfg.seeds) * (pretrain + finetune + evaluate) + ablation + real * real + curve
    )


def objective_seeds(cfg: DictConfig) -> list[int]:
    """The seeds the objectives question runs (`study.objectives_seeds`; null: all)."""
    seeds = [int(s) for s in cfg.seeds]
    if cfg.get("objectives_seeds") is None:
        return seeds
    asked = [int(s) for s in cfg.objectives_seeds]
    if not set(asked) <= set(seeds):
        raise FedclifError(f"study.objectives_seeds {asked} must be among study.seeds {seeds}")
    return asked


def _rows(
    lane: Lane, site: str, setting: str, metrics: dict, tasks: list[str], split: str
) -> list[dict]:
    """One row per task from a site's flat evaluation metrics (`<task>_<metric>`)."""
    rows = []
    for t in tasks:
        m = {k[len(t) + 1 :]: v for k, v in metrics.items() if k.startswith(f"{t}_")}
        if "auroc" not in m:
            continue
        rows.append(
            {
                "arm": lane.arm,
                "setting": setting,
                "seed": lane.seed,
                "task": t,
                "fraction": lane.fraction,
                "train_sites": lane.train_sites,
                "eval_site": site,
                "eval_split": split,
                **{k: (list(v) if isinstance(v, list) else float(v)) for k, v in m.items()},
            }
        )
    return rows
