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
from fedclif.shared.model.models import get_weights
from fedclif.shared.protocol.federation import RUN_SECTIONS
from fedclif.shared.tokens.stats import merge_stats
from fedclif.shared.tokens.tokenizer import Tokenizer, fit_tokenizer
from fedclif.simulations.objectives_report import check_sets, pretrain_override
from fedclif.simulations.plan import Job, Plan, make_plan
from fedclif.simulations.sites import POOLED, SOURCE, TARGET, site_roles


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

    def _tokenizers(self, stats: dict[str, dict], plan: Plan) -> dict[str, Tokenizer]:
        """Each arm's tokenizer: the source's own (source-only and its transfer), the
        target's own (target from scratch), all real sites' (federated and pooled: merged
        statistics fit the pooled data's tokenizer), each sent where the plan uses it."""
        tok_cfg = self.config.tokenizer
        toks = {
            SOURCE: fit_tokenizer(merge_stats([stats[SOURCE]]), tok_cfg),
            TARGET: fit_tokenizer(merge_stats([stats[TARGET]]), tok_cfg),
            "federated": fit_tokenizer(merge_stats([stats[s] for s in plan.sites]), tok_cfg),
        }
        uses = {k: list(v) for k, v in plan.tokenized().items()}
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

    def _lane(self, job: Job, tok: Tokenizer, init: dict | None) -> Lane:
        """Job `job` ready to train: its run, and its model's first weights (from `init`,
        pretrained weights, or from scratch)."""
        fed = self._fed(
            list(job.sites),
            job.seed,
            job.stage,
            job.steps,
            job.rounds,
            job.fraction,
            job.objectives,
        )
        run = self._run(job.key, list(job.sites), fed)
        base = init if job.stage == "finetune" else None
        weights = get_weights(run.model(tok, job.stage, base, None))
        return Lane(
            job.arm,
            job.seed,
            run,
            tok,
            job.stage,
            weights,
            list(job.sites),
            job.rounds,
            job.fraction,
            curve=[] if job.curve else None,
        )

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
        """Execute the study's plan (simulations/plan.py): names and statistics, the
        tokenizers, pretraining, probes, finetuning, evaluation; writes results.json."""
        plan = make_plan(self.config.study)
        self.total = plan.messages()
        stats = self._discover()
        self.done += len(self.nodes) + len(plan.sites)
        toks = self._tokenizers(stats, plan)
        self._phase("statistics and tokenizers")

        lanes = {j.key: self._lane(j, toks[j.tokenizer], None) for j in plan.pretrain}
        self._train(list(lanes.values()), "pretraining")
        self._phase("pretraining")
        probed = self._probes([lanes[k] for k in plan.probes])
        probes = dict(zip(plan.probes, probed, strict=True))
        self._phase("probes")

        for j in plan.finetune:
            init = lanes[j.init].weights if j.init else None
            lanes[j.key] = self._lane(j, toks[j.tokenizer], init)
        self._train([lanes[j.key] for j in plan.finetune], "finetuning")
        self._phase("finetuning")
        jobs = [
            ((probes if e.probe else lanes)[e.job], list(e.sites), e.setting)
            for e in plan.evaluations
        ]
        self._evaluate(jobs, "evaluation")
        self._phase("evaluation")

        first = next(j for j in plan.pretrain if j.curve)
        results = {
            "config": OmegaConf.to_container(self.config),
            "sites": {k: {**v} for k, v in self.tokenized["federated"].items()},
            "tokenizers": {k: t.hash for k, t in toks.items()},
            "rows": self.rows,
            "pretraining_curves": {str(first.seed): lanes[first.key].curve},
            "seconds": time.monotonic() - self.t0,
            "phase_seconds": self.phases,
            "site_seconds": self.work,
            "cpus": os.cpu_count(),
        }
        write_json(results, self.out / "results.json")
        self._progress("done")
        return results


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
