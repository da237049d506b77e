"""The transfer study's design as data: from the `study` section, every job (an arm at a
seed, trained at some sites from some weights) and every evaluation, in the order the
study runs them. `Study.run` (simulations/study.py) executes a plan; the progress bar's
total is the plan's message count. Nothing here touches Flower or data."""

from dataclasses import dataclass

from omegaconf import DictConfig

from fedclif.shared.errors import FedclifError
from fedclif.simulations.objectives_report import arm_name
from fedclif.simulations.sites import POOLED, SOURCE, TARGET, THIRD, site_roles

# The study's tokenizers: the source's own, the target's own, all real sites' (federated
# and pooled arms).
TOKENIZERS = (SOURCE, TARGET, "federated")


@dataclass(frozen=True)
class Job:
    """One arm at one seed: `rounds` rounds of `steps` local steps of `stage` at `sites`,
    with `tokenizer`, from the weights of the pretraining job `init` (None: from scratch),
    on `fraction` of the training patients; `objectives`: its objective set's index;
    `curve`: the global model's validation loss after each round is measured."""

    arm: str
    seed: int
    stage: str
    sites: tuple[str, ...]
    tokenizer: str
    steps: int
    init: str | None = None
    fraction: float = 1.0
    rounds: int = 1
    objectives: int = 0
    curve: bool = False

    @property
    def key(self) -> str:
        """Its name, unique in a plan (and its run directory's)."""
        sites = "+".join(self.sites)
        return f"{self.arm}-{self.stage}-{sites}-f{self.fraction:g}-s{self.seed}"


@dataclass(frozen=True)
class Evaluation:
    """Job `job`'s model (with `probe`: the linear probes fitted on it) at `sites`, in
    `setting` (zero-shot: on every stay, the model never saw the site)."""

    job: str
    sites: tuple[str, ...]
    setting: str
    probe: bool = False


@dataclass(frozen=True)
class Plan:
    sites: tuple[str, ...]  # the real sites
    pretrain: tuple[Job, ...]
    probes: tuple[str, ...]  # pretraining jobs whose frozen model gets linear probes
    finetune: tuple[Job, ...]
    evaluations: tuple[Evaluation, ...]

    def messages(self) -> int:
        """Messages the study sends: names (every site, the pooled one too), the real
        sites' statistics, tokenizing (each tokenizer where it is used), then one per site
        per round of each job, per probe fit, per evaluation at a site and per point of a
        validation curve."""
        real = len(self.sites)
        setup = (real + 1) + real + sum(len(s) for s in self.tokenized().values())
        jobs = [*self.pretrain, *self.finetune]
        rounds = sum(j.rounds * len(j.sites) for j in jobs)
        curves = sum(j.rounds * len(j.sites) for j in jobs if j.curve)
        evaluations = sum(len(e.sites) for e in self.evaluations)
        return setup + rounds + len(self.probes) + evaluations + curves

    def tokenized(self) -> dict[str, tuple[str, ...]]:
        """Where each tokenizer is used: the source's at every real site (its model is
        tried zero-shot there), the target's at the target, the federated one at every
        site with the pooled one."""
        return {SOURCE: self.sites, TARGET: (TARGET,), "federated": (*self.sites, POOLED)}


def objective_seeds(cfg: DictConfig) -> list[int]:
    """The seeds the objectives question runs (`study.objectives_seeds`; null: all)."""
    seeds = [int(s) for s in cfg.seeds]
    if cfg.get("objectives_seeds") is None:
        return seeds
    asked = [int(s) for s in cfg.objectives_seeds]
    if not set(asked) <= set(seeds):
        raise FedclifError(f"study.objectives_seeds {asked} must be among study.seeds {seeds}")
    return asked


class _Design:
    """The study `cfg`'s jobs seed by seed: what each phase adds to the plan."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.seeds = [int(s) for s in cfg.seeds]
        self.real = tuple(s for s in site_roles(cfg) if s in (SOURCE, TARGET, THIRD))
        self.others = tuple(s for s in self.real if s != SOURCE)
        self.rounds, self.spr = int(cfg.pretrain.rounds), int(cfg.pretrain.steps_per_round)
        self.ft_steps = int(cfg.finetune_steps)
        self.asked = objective_seeds(cfg)

    def arm(self, name: str, k: int = 0) -> str:
        return arm_name(name, k, list(self.cfg.objectives))

    def pretraining(self, s: int) -> tuple[Job, Job, Job, list[Job]]:
        """Seed `s`'s source-only, federated and pooled pretraining, and the source's
        with each further objective set (the objectives question, at its seeds)."""
        whole = self.rounds * self.spr  # one site: every step in one round
        source = Job(self.arm("source_only"), s, "pretrain", (SOURCE,), SOURCE, whole)
        # The validation curve of the first seed's federated model: the seeds' curves lie
        # within 0.05 of each other (default study), and each point costs an evaluation.
        first = s == self.seeds[0]
        federated = Job(
            "federated",
            s,
            "pretrain",
            self.real,
            "federated",
            self.spr,
            rounds=self.rounds,
            curve=first,
        )
        pooled = Job("pooled", s, "pretrain", (POOLED,), "federated", whole)
        sets = range(1, len(self.cfg.objectives)) if s in self.asked else ()
        objective = [
            Job(self.arm("source_only", k), s, "pretrain", (SOURCE,), SOURCE, whole, objectives=k)
            for k in sets
        ]
        return source, federated, pooled, objective

    def probing(self, job: Job) -> list[Evaluation]:
        """The linear probes on `job`'s frozen model, at the source and away from it (the
        objectives question is asked at the target: its probes go nowhere else)."""
        away = self.others if job.objectives == 0 else (TARGET,)
        return [
            Evaluation(job.key, (SOURCE,), "in_distribution", probe=True),
            Evaluation(job.key, away, "zero_shot", probe=True),
        ]

    def finetuning(
        self, source: Job, federated: Job, pooled: Job
    ) -> tuple[list[Job], list[Evaluation]]:
        """A seed's finetuning from its pretrained models, and where each is evaluated."""
        s, steps, real = source.seed, self.ft_steps, self.real
        src = Job(self.arm("source_only"), s, "finetune", (SOURCE,), SOURCE, steps, source.key)
        pool = Job("pooled", s, "finetune", (POOLED,), "federated", steps, pooled.key)
        jobs = [src, pool]
        evals = [
            Evaluation(src.key, (SOURCE,), "in_distribution"),
            Evaluation(src.key, self.others, "zero_shot"),
            Evaluation(pool.key, real, "pooled"),
        ]
        fed_at = {}
        for f in [float(f) for f in self.cfg.fractions]:
            for name, tok, init in (
                ("source_finetuned", SOURCE, source.key),
                ("target_only", TARGET, None),
                ("federated_finetuned", "federated", federated.key),
            ):
                job = Job(name, s, "finetune", (TARGET,), tok, steps, init, f)
                jobs.append(job)
                evals.append(Evaluation(job.key, (TARGET,), "local_finetune"))
                if name == "federated_finetuned" and f == 1.0:
                    fed_at[TARGET] = job
        for site in real:  # every site finetunes the federated model on all its data
            if site not in fed_at:
                fed_at[site] = Job(
                    "federated_finetuned", s, "finetune", (site,), "federated", steps, federated.key
                )
                jobs.append(fed_at[site])
        if s == self.seeds[0]:  # the cross-site matrix, once: n_sites^2 evaluations
            evals += [Evaluation(fed_at[site].key, real, "cross_site") for site in real]
        return jobs, evals

    def objectives(self, job: Job) -> tuple[list[Job], list[Evaluation]]:
        """The objectives question's finetuning of `job`: at the source, and on a share
        of the target."""
        k, s, steps, share = (
            job.objectives,
            job.seed,
            self.ft_steps,
            float(self.cfg.ablation_fraction),
        )
        at_src = Job(
            self.arm("source_only", k),
            s,
            "finetune",
            (SOURCE,),
            SOURCE,
            steps,
            job.key,
            objectives=k,
        )
        at_tgt = Job(
            self.arm("source_finetuned", k),
            s,
            "finetune",
            (TARGET,),
            SOURCE,
            steps,
            job.key,
            share,
            objectives=k,
        )
        evals = [
            Evaluation(at_src.key, (SOURCE,), "in_distribution"),
            Evaluation(at_src.key, (TARGET,), "zero_shot"),
            Evaluation(at_tgt.key, (TARGET,), "local_finetune"),
        ]
        return [at_src, at_tgt], evals


def make_plan(cfg: DictConfig) -> Plan:
    """The plan of the study `cfg` (its `study` section), in the order the study runs it:
    every seed's pretraining, the probes, every seed's finetuning; the probes' evaluations
    first."""
    d = _Design(cfg)
    pretrain, probes, probe_evals, finetune, evals = [], [], [], [], []
    for s in d.seeds:
        source, federated, pooled, objective = d.pretraining(s)
        pretrain += [source, federated, pooled, *objective]
        for job in (source, *objective):
            probes.append(job.key)
            probe_evals += d.probing(job)
        jobs, ev = d.finetuning(source, federated, pooled)
        for job in objective:
            more, more_ev = d.objectives(job)
            jobs, ev = jobs + more, ev + more_ev
        finetune += jobs
        evals += ev
    return Plan(d.real, tuple(pretrain), tuple(probes), tuple(finetune), (*probe_evals, *evals))
