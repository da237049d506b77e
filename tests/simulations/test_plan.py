"""The study's design as data (simulations/plan.py), without Flower: which jobs and
evaluations a study config makes, and how many messages they send."""

from collections import Counter

import pytest
from omegaconf import DictConfig

from fedclif.shared.errors import FedclifError
from fedclif.simulations.commands import load_study
from fedclif.simulations.plan import make_plan
from fedclif.simulations.sites import POOLED, SOURCE, TARGET, THIRD


def closed_form(cfg: DictConfig) -> int:
    """The study's messages counted by hand (the formula the study used before its plan
    was data): an independent count of the plan's."""
    real = 3 if cfg.sites.third else 2
    n_frac, rounds = len(cfg.fractions), int(cfg.pretrain.rounds)
    setup = (real + 1) + real + (real + 1 + real + 1)
    pretrain = 1 + rounds * real + 1 + 1 + real
    finetune = 2 + 3 * n_frac + real - (1 if 1.0 in [float(f) for f in cfg.fractions] else 0)
    evaluate = real + real + 3 * n_frac
    curve = rounds * real
    asked = cfg.objectives_seeds if cfg.get("objectives_seeds") is not None else cfg.seeds
    ablation = (len(cfg.objectives) - 1) * (1 + 1 + 2 + 2 + 3) * len(asked)
    return (
        setup + len(cfg.seeds) * (pretrain + finetune + evaluate) + ablation + real * real + curve
    )


STUDIES = {
    "default": ("default", []),
    "quick": ("quick", []),
    "no third site": ("quick", ["study.sites.third=null"]),
    "no full share": ("quick", ["study.fractions=[0.1,0.5]"]),
    "objectives at one seed": (
        "quick",
        [
            "study.seeds=[0,1]",
            "study.objectives_seeds=[1]",
            "study.objectives=[{name: nt},"
            "{name: ts, objectives: {next_token: 1.0, ts_align: 0.5}}]",
        ],
    ),
}


@pytest.mark.parametrize("name", STUDIES)
def test_the_plans_messages_are_the_hand_count(name):
    profile, overrides = STUDIES[name]
    cfg = load_study(None, profile, overrides).study
    assert make_plan(cfg).messages() == closed_form(cfg)


@pytest.mark.parametrize("name", STUDIES)
def test_every_job_and_evaluation_refers_to_what_the_plan_holds(name):
    profile, overrides = STUDIES[name]
    cfg = load_study(None, profile, overrides).study
    plan = make_plan(cfg)
    keys = [j.key for j in (*plan.pretrain, *plan.finetune)]
    assert len(keys) == len(set(keys))  # one run directory each
    pretrained = {j.key for j in plan.pretrain}
    assert all(j.init in pretrained for j in plan.finetune if j.init is not None)
    assert set(plan.probes) <= pretrained
    for e in plan.evaluations:
        assert e.job in (plan.probes if e.probe else keys)
        assert set(e.sites) <= set(plan.sites) | {POOLED}


def test_the_default_design():
    """Per seed: the source, federated and pooled pretraining (and the source's with each
    further objective set, at the objectives question's seeds); at the target, each share
    of its patients finetuned three ways; the federated model finetuned at every real
    site; the cross-site matrix and the validation curve once, at the first seed."""
    cfg = load_study(None, "default", []).study
    plan = make_plan(cfg)
    seeds, fractions = list(cfg.seeds), [float(f) for f in cfg.fractions]
    assert plan.sites == (SOURCE, TARGET, THIRD)
    # The further objective sets at the first seed alone (the study keeps to 10 minutes).
    assert list(cfg.objectives_seeds) == [seeds[0]]
    further = {f"source_only[{o.name}]": 1 for o in cfg.objectives[1:]}
    assert len(further) == 2
    assert Counter(j.arm for j in plan.pretrain) == {
        "source_only": len(seeds),
        "federated": len(seeds),
        "pooled": len(seeds),
        **further,
    }
    at_target = [j for j in plan.finetune if j.sites == (TARGET,)]
    for s in seeds:
        for arm in ("source_finetuned", "target_only", "federated_finetuned"):
            got = sorted(j.fraction for j in at_target if j.seed == s and j.arm == arm)
            assert got == sorted(fractions), (s, arm)
    fed_ft = {j.sites for j in plan.finetune if j.arm == "federated_finetuned" and j.fraction == 1}
    assert fed_ft == {(s,) for s in plan.sites}
    cross = [e for e in plan.evaluations if e.setting == "cross_site"]
    assert len(cross) == 3 and all(e.sites == plan.sites for e in cross)
    assert {j.seed for j in plan.pretrain if j.curve} == {seeds[0]}
    (target_only,) = {j.init for j in at_target if j.arm == "target_only"}
    assert target_only is None  # from scratch


def test_objective_seeds_must_be_among_the_seeds():
    cfg = load_study(None, "quick", ["study.objectives_seeds=[7]"]).study
    with pytest.raises(FedclifError, match=r"study.objectives_seeds \[7\] must be among"):
        make_plan(cfg)
