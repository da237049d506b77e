"""The site decides what leaves: its policy file, the checks every request passes, the
statistics that leave under the default policy, and paths a run cannot choose."""

import hashlib
import json
import re
import stat
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import decile_error
from flwr.app import Context, RecordDict
from flwr.cli.build import build_fab_from_files
from omegaconf import OmegaConf

from fedclif.cli import main
from fedclif.client.app import Node
from fedclif.client.approval import approved
from fedclif.client.ledger import Ledger
from fedclif.client.policy import (
    check_dp,
    check_model,
    check_probe_training,
    check_stats,
    check_training,
    coarse_count,
    load_policy,
    rounded,
    withhold,
    write_policy,
)
from fedclif.shared.clif.site import load_site
from fedclif.shared.config import load_config, load_tree
from fedclif.shared.model.models import count_parameters
from fedclif.shared.protocol.federation import SiteRefusal, load_federation
from fedclif.shared.protocol.flower import app_files, fab_hash
from fedclif.shared.tokens.events import OPEN_SEP, stay_events
from fedclif.shared.tokens.stats import (
    IDENTIFYING,
    MAX_OPEN_LENGTH,
    merge_stats,
    screen_rule,
    site_stats,
)
from fedclif.shared.tokens.tokenizer import Tokenizer, fit_tokenizer
from fedclif.simulations.synth import FREE_TEXT_ANSWERS, load_preset, write_site


def test_policy_init_writes_the_commented_defaults_once(tmp_path, capsys):
    assert main(["site", "policy", "init", str(tmp_path)]) == 0
    path = tmp_path / "policy.yaml"
    text = path.read_text()
    assert (
        "# Nothing standing on fewer patients leaves the site" in text and "timezone: UTC" in text
    )
    assert load_policy(path) == load_policy()  # the packaged defaults
    before = path.read_bytes()
    assert main(["site", "policy", "init", str(tmp_path)]) == 1  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
    assert path.read_bytes() == before
    other = tmp_path / "strict"
    assert main(["site", "policy", "init", str(other), "policy.stats.min_cell_count=20"]) == 0
    assert load_policy(other / "policy.yaml").policy.stats.min_cell_count == 20
    assert main(["site", "policy", "init", str(tmp_path / "x"), "policy.typo=1"]) == 1


def _refused(fn, *args) -> str:
    with pytest.raises(SiteRefusal) as e:
        fn(*args)
    assert e.value.category == "policy"
    return str(e.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stats.min_cell_count=1", "policy: min_cell_count: asked < 10"),
        ("stats.sig_figs=15", "policy: max_sig_figs: asked > 3"),
        ("stats.min_open_code_count=2", "policy: min_open_code_count: asked < 10"),
        ("stats.seed=7", "policy: stats.seed: asked for one (the noise's seed is the site's)"),
    ],
)
def test_statistics_finer_than_the_policy_are_refused(override, message):
    policy = load_policy()
    check_stats(load_config("tokenizer").stats, policy)  # the run's defaults pass
    assert _refused(check_stats, load_config("tokenizer", overrides=[override]).stats, policy) == (
        message
    )


def test_splits_and_models_beyond_the_policy_are_refused():
    policy = load_policy()
    check_training(load_federation().train, policy)
    tiny_test = load_federation(overrides=["train.split.test=0.001"]).train
    assert _refused(check_training, tiny_test, policy) == "policy: splits.min_test: asked < 0.1"
    tiny_val = load_federation(overrides=["train.split.val=0.0"]).train
    assert _refused(check_training, tiny_val, policy) == "policy: splits.min_val: asked < 0.05"
    cap = int(policy.policy.model.max_parameters)
    check_model(cap, 1000, policy)
    assert "model.max_parameters" in _refused(check_model, 100 * cap, 1000, policy)
    assert "model.max_vocab" in _refused(check_model, 1000, 10**6, policy)


def test_lora_adapters_count_against_the_parameter_cap(demo_tokens):
    """A LoRA finetune's size is its base and its adapters: a rank of 20,000 makes a model
    of millions of parameters out of a base the cap allows (it counted 115,161 of 14.4 M
    built), and the site refuses it."""
    fed = load_federation(overrides=["train.finetune.peft=lora", "train.lora.r=20000"])
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    base = count_parameters(fed.model, tok, fed.train.pretrain)
    small = count_parameters(fed.model, tok, fed.train.pretrain, load_federation().train.lora)
    huge = count_parameters(fed.model, tok, fed.train.pretrain, fed.train.lora)
    assert base < small < 2 * base and huge > 50 * base
    # A site whose cap is ten times the run's model.
    policy = load_tree(("policy", "site"), (), None, [f"policy.model.max_parameters={10 * base}"])
    check_model(small, len(tok.vocab), policy)
    refusal = _refused(check_model, huge, len(tok.vocab), policy)
    assert refusal == f"policy: model.max_parameters: asked > {10 * base}"


def test_a_deployed_site_takes_no_path_from_the_run_config(tmp_path):
    """`work-root` in the run config is the simulation engine's; a deployed site's work
    directory is its policy's, created private (0700)."""
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    node_config = {"data-path": str(tmp_path / "clif"), "policy-path": str(policy)}
    run_config = {"work-root": str(tmp_path / "elsewhere"), "sites": str(tmp_path / "x")}
    node = Node(Context(1, 1, node_config, RecordDict(), run_config))
    assert node.work == (tmp_path / "work").resolve()
    assert stat.S_IMODE(node.work.stat().st_mode) == 0o700
    assert not (tmp_path / "elsewhere").exists()


def test_default_statistics_hold_no_count_under_ten(tmp_path):
    d = tmp_path / "site"
    write_site(load_preset("mimic-like"), 400, 5, d)
    stats = site_stats(load_site(d, load_config("site")), load_config("tokenizer"))
    assert min(stats["codes"].values()) >= 10
    for h in stats["numeric"].values():
        assert min(h["counts"]) >= 10
        assert h["suppressed"] == 0 or h["suppressed"] >= 10
    assert stats["n_stays"] % 10 == 0 and stats["n_stays"] > 0
    assert OmegaConf.create(stats["config"]).min_cell_count == 10


def test_metrics_on_too_few_stays_or_events_are_withheld():
    policy = load_policy()
    flat = {
        "num_examples": 215.0,
        "death_n": 15.0,
        "death_prevalence": 0.4,
        "death_auroc": 0.7,  # 15 stays < 20
        "imv_n": 100.0,
        "imv_prevalence": 0.05,
        "imv_auroc": 0.9,  # 5 events < 10
        "long_los_n": 100.0,
        "long_los_prevalence": 0.3,
        "long_los_auroc": 0.8,
        "long_los_roc": [0.0, 0.5, 1.0],
    }
    kept, why = withhold(flat, ["death", "imv", "long_los"], policy)
    assert why == {
        "death": "policy: metrics.min_test_stays (fewer than 20)",
        "imv": "policy: metrics.min_events (fewer than 10)",
    }
    assert not any(k.startswith(("death_", "imv_")) for k in kept)
    assert kept["long_los_roc"] == [0.0, 0.5, 1.0] and kept["num_examples"] == 100
    assert withhold({"num_examples": 9.0, "loss": 2.0}, ["death"], policy)[0]["num_examples"] == 9


def test_a_reliability_curve_leaves_only_with_bins_of_at_least_the_minimum_cell():
    """Each of the curve's 10 equal-mass bins holds calibration_n // 10 stays: under the
    policy's minimum cell (10) the curve stays home, its Brier score and ECE leave."""
    policy = load_policy()
    curve = {"reliability_predicted": [0.1] * 10, "reliability_observed": [0.1] * 10}
    flat = {
        "num_examples": 300.0,
        "death_n": 200.0,
        "death_prevalence": 0.2,
        "death_calibration_n": 99,
        "death_brier": 0.1,
        **{f"death_{k}": v for k, v in curve.items()},
        "imv_n": 100.0,
        "imv_prevalence": 0.2,
        "imv_calibration_n": 100,
        "imv_calibration_n_recal": 100,
        **{f"imv_{k}{s}": v for k, v in curve.items() for s in ("", "_recal")},
    }
    kept, why = withhold(flat, ["death", "imv"], policy)
    assert why == {}
    assert kept["death_brier"] == 0.1 and not any("death_reliability" in k for k in kept)
    assert all(f"imv_{k}{s}" in kept for k in curve for s in ("", "_recal"))
    check_probe_training(50, policy)
    with pytest.raises(SiteRefusal, match=r"^policy: probes\.min_train_stays: fewer than 50$"):
        check_probe_training(3, policy)


def test_the_dp_ledger_spans_runs_and_stops_at_the_lifetime_budget(tmp_path):
    """One ledger per site across runs and resumes: a new run does not start at zero, a
    round is charged before it trains, and the lifetime cap refuses the round past it."""
    ledger = Ledger(tmp_path)
    first = ledger.reserve(1, "finetune", 1, 4.0, 1e-5, limit=10.0)
    ledger.settle(first, 3.5)
    Ledger(tmp_path).reserve(2, "finetune", 1, 4.0, 1e-5, limit=10.0)  # died: stays charged
    assert Ledger(tmp_path).spent() == 7.5
    with pytest.raises(SiteRefusal) as e:
        Ledger(tmp_path).reserve(3, "finetune", 1, 4.0, 1e-5, limit=10.0)
    assert e.value.category == "dp_budget_exhausted"
    assert str(e.value) == "policy: dp.max_epsilon_lifetime: this round would pass 10"
    assert [x["status"] for x in Ledger(tmp_path).entries()] == ["spent", "reserved"]


def test_dp_rules_of_the_policy():
    strict = load_tree(("policy", "site"), (), None, ["policy.dp.required=true"])
    off = load_federation().train
    on = load_federation(overrides=["train.dp.epsilon=1", "train.dp.delta=1e-5"]).train
    assert check_dp(on, "finetune", 1000, strict) is True
    assert "dp.required" in _refused(check_dp, off, "finetune", 1000, strict)
    assert "dp.required" in _refused(check_dp, off, "pretrain", 1000, strict)
    assert check_dp(on, "pretrain", 1000, strict) is True  # pretraining is DP-SGD too
    assert check_dp(off, "finetune", 1000, load_policy()) is False
    # delta at most 1 / the patients of the site's training split by default
    assert check_dp(on, "finetune", 1000, load_policy()) is True  # 1e-5 <= 1e-3
    million = _refused(check_dp, on, "finetune", 10**6, load_policy())
    # The default bound is the site's patient count: named, never given.
    assert million == "policy: dp.max_delta: asked > 1 / the training patients"


def test_site_ledger_prints_what_was_spent(tmp_path, capsys):
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    Ledger(tmp_path / "work").reserve(5, "finetune", 2, 1.25, 1e-5, limit=10.0)
    assert main(["site", "ledger", "--policy", str(policy)]) == 0
    text = capsys.readouterr().out
    assert "total epsilon 1.25 of the lifetime 10" in text and "reserved" in text


def test_site_approve_adds_a_bundle_beside_the_release(tmp_path, capsys):
    """The release's bundle is approved without a step; `site approve` adds a reviewed one
    by its .fab file or its hash; anything else, or no way to find the work directory, is
    an error that names what to pass."""
    policy = write_policy(tmp_path / "site", [f"policy.work_dir={tmp_path / 'work'}"])
    release = fab_hash(app_files())
    assert approved(tmp_path / "work") == {release: "the installed fedclif release"}
    fab = tmp_path / "other.fab"
    fab.write_bytes(build_fab_from_files({**app_files(), "extra.py": b"x = 1\n"})[0])
    other = hashlib.sha256(fab.read_bytes()).hexdigest()
    assert main(["site", "approve", str(fab), "--policy", str(policy), "--note", "v2"]) == 0
    assert main(["site", "approve", "ab" * 32, "--policy", str(policy)]) == 0
    assert approved(tmp_path / "work") == {
        release: "the installed fedclif release",
        other: "v2",
        "ab" * 32: "approved by the site",
    }
    assert main(["site", "approve", "not-a-hash", "--policy", str(policy)]) == 1
    assert "neither a .fab file nor a SHA-256" in capsys.readouterr().err
    bare = write_policy(tmp_path / "bare")
    assert main(["site", "approve", "ab" * 32, "--policy", str(bare)]) == 1
    assert "pass --name" in capsys.readouterr().err


def _rows_of_patients(site_dir: Path, n: int, category: str) -> pl.DataFrame:
    """One answered assessment row of each of `n` patients (each in its own stay's time),
    moved to `category`."""
    a = pl.read_parquet(site_dir / "clif_patient_assessments.parquet")
    who = pl.read_parquet(site_dir / "clif_hospitalization.parquet")
    answered = pl.col("categorical_value").is_not_null() & pl.col("numerical_value").is_null()
    rows = a.filter(answered).join(
        who.select("hospitalization_id", "patient_id"), on="hospitalization_id"
    )
    rows = rows.unique("patient_id", keep="first", maintain_order=True).head(n)
    assert rows.height == n
    return rows.drop("patient_id").with_columns(pl.lit(category).alias("assessment_category"))


def _chart(site_dir: Path, answers: list[str], patients: int = 12) -> str:
    """Each answer charted once each for `patients` patients, under an assessment that
    has free-text answers; returns that assessment."""
    path = site_dir / "clif_patient_assessments.parquet"
    assessments = pl.read_parquet(path)
    answered = pl.col("categorical_value").is_not_null() & pl.col("numerical_value").is_null()
    code = assessments.filter(answered)["assessment_category"][0]
    rows = _rows_of_patients(site_dir, patients, code)
    extra = [rows.with_columns(pl.lit(a).alias("categorical_value")) for a in answers]
    pl.concat([assessments, *extra]).write_parquet(path)
    return code


def _opened(stats: dict, code: str) -> set[str]:
    return {c.split(OPEN_SEP, 1)[1] for c in stats["codes"] if c.startswith(f"ASMT_{code}=")}


def test_free_text_answers_leave_only_when_the_policy_names_them(site_dir, site_cfg):
    """Deny by default: an answer of 12 patients that reads like a category ("calm") stays
    home as surely as a record number, until the policy's allow-list names it exactly;
    a reviewed answer leaves whatever it reads like ("Grade 1000"); the default policy's
    list lets the standard assessments' answers out, and nothing else."""
    answers = ["MRN 4452231", "2110-04-12", "Dr. Smith", "Grade 1000", "calm", "Calm"]
    code = _chart(site_dir, answers)
    site, cfg = load_site(site_dir, site_cfg), load_config("tokenizer")
    assert _opened(site_stats(site, cfg), code) == set()
    assert not any(OPEN_SEP in c for c in site_stats(site, cfg)["codes"])
    assert _opened(site_stats(site, cfg, ["calm", "Grade 1000"]), code) == {"calm", "Grade 1000"}
    default = list(load_policy().policy.stats.allow_open)
    opened = {
        c.split(OPEN_SEP, 1)[1] for c in site_stats(site, cfg, default)["codes"] if OPEN_SEP in c
    }
    assert opened and opened <= set(default) and {"Yes", "No", "Negative"} <= opened


def test_policy_review_lists_the_answers_a_reviewer_decides_on(site_dir, tmp_path, capsys):
    """`site policy review`: every answer of at least the floor of patients with its
    patients, what the screen flags, and whether it leaves under the policy or a proposed
    allow-list; answers under the floor are counted, never listed; `site stats` with the
    site's policy file sends exactly what the review says leaves."""
    code = _chart(site_dir, ["calm", "MRN 4452231"])
    _chart(site_dir, ["rare answer"], patients=3)
    out = tmp_path / "review.json"
    assert main(["site", "policy", "review", "--data", str(site_dir), "--json", str(out)]) == 0
    rows = {(r["code"], r["answer"]): r for r in json.loads(out.read_text())["answers"]}
    assert "rare answer" not in capsys.readouterr().out
    calm, mrn = rows[f"ASMT_{code}=calm", "calm"], rows[f"ASMT_{code}=MRN 4452231", "MRN 4452231"]
    assert (calm["patients"], calm["screen"], calm["leaves"]) == (12, None, False)
    assert (mrn["screen"], mrn["leaves"]) == ("digits", False)
    assert (
        all(r["patients"] >= 10 for r in rows.values())
        and ("ASMT_cam_total=Negative", "Negative") in rows
    )
    assert not any(a == "rare answer" for _, a in rows)
    proposal = "policy.stats.allow_open=[calm,Negative]"
    assert (
        main(["site", "policy", "review", "--data", str(site_dir), "--json", str(out), proposal])
        == 0
    )
    leaving = {r["code"] for r in json.loads(out.read_text())["answers"] if r["leaves"]}
    assert leaving == {f"ASMT_{code}=calm", "ASMT_cam_total=Negative"}
    policy = tmp_path / "p" / "policy.yaml"
    assert main(["site", "policy", "init", str(policy.parent), proposal]) == 0
    sent = tmp_path / "stats.json"
    assert main(["site", "stats", str(site_dir), "--out", str(sent), "--config", str(policy)]) == 0
    assert {c for c in json.loads(sent.read_text())["codes"] if OPEN_SEP in c} == leaving


def test_one_patient_charting_an_answer_often_is_one_patient(site_dir, site_cfg):
    """The finding: one stay charting "John Smith", "Dr.Smith", "14/02", "42 Elm St" 12
    times each sent all four out with count 12. Counts are of patients: each is one, and
    none leaves even when allowed; "calm" charted once each for 12 patients does."""
    assessments = pl.read_parquet(site_dir / "clif_patient_assessments.parquet")
    answered = pl.col("categorical_value").is_not_null() & pl.col("numerical_value").is_null()
    row = assessments.filter(answered).head(1)
    one = ["John Smith", "Dr.Smith", "14/02", "42 Elm St"]
    repeated = [
        row.with_columns(pl.lit(a).alias("categorical_value")) for a in one for _ in range(12)
    ]
    pl.concat([assessments, *repeated]).write_parquet(site_dir / "clif_patient_assessments.parquet")
    code = _chart(site_dir, ["calm"])
    assert code == row["assessment_category"][0]
    stats = site_stats(load_site(site_dir, site_cfg), load_config("tokenizer"), [*one, "calm"])
    assert _opened(stats, code) == {"calm"}
    assert stats["codes"][f"ASMT_{code}=calm"] >= 12


def test_default_policy_statistics_hold_no_small_count_and_no_identifying_answer(tmp_path):
    """Two synthetic sites of 2,000 stays, whose free-text SBT answers include names, dates
    and record numbers as common as real answers: under the default policy no count under
    10 leaves and no answer the policy does not name; under a reviewed list of the honest
    reasons, those leave and no other; and the merged tokenizer's deciles
    are within 1 percentile point of the pooled data's as closely as a fit on the pooled
    data itself (every code: a decile no cut marks counts)."""
    sites = []
    for i, preset in enumerate(("mimic-like", "ucmc-like")):
        free_text = ["documentation.free_text_share=0.3"]
        write_site(load_preset(preset, free_text), 2000, i + 1, tmp_path / preset)
        sites.append(load_site(tmp_path / preset, load_config("site")))
    cfg, policy = load_config("tokenizer"), load_policy()
    default = list(policy.policy.stats.allow_open)
    honest = list(FREE_TEXT_ANSWERS)[:4]
    stats = [site_stats(s, cfg, default) for s in sites]
    for site, st in zip(sites, stats, strict=True):
        cells = [c for h in st["numeric"].values() for c in h["counts"]]
        dropped = [h["suppressed"] for h in st["numeric"].values() if h["suppressed"]]
        assert min([*st["codes"].values(), *cells, *dropped, st["n_stays"]]) >= 10
        answers = {c.split(OPEN_SEP, 1)[1] for c in st["codes"] if OPEN_SEP in c}
        assert answers == {"Positive", "Negative"}  # the synthetic CAM-ICU's, allowed
        reviewed = site_stats(site, cfg, [*default, *honest])["codes"]
        reasons = {c.split(OPEN_SEP, 1)[1] for c in reviewed if "sbt_fail_reason" in c}
        assert reasons == set(honest)
        # Common enough that the count rule alone would have let them out.
        raw = stay_events(site).filter(pl.col("code").str.starts_with("ASMT_sbt_fail_reason"))
        counts = raw.group_by("code").len().collect()
        assert counts.filter(pl.col("len") >= 10).height == len(FREE_TEXT_ANSWERS)
    tok = fit_tokenizer(merge_stats(stats), cfg)
    # The pooled fit: the two sites' tables in one place, one site's statistics.
    pooled_dir = tmp_path / "pooled"
    pooled_dir.mkdir()
    for f in sorted((tmp_path / "mimic-like").glob("clif_*.parquet")):
        frames = [pl.read_parquet(tmp_path / p / f.name) for p in ("mimic-like", "ucmc-like")]
        pl.concat(frames, how="diagonal_relaxed").write_parquet(pooled_dir / f.name)
    pooled_site = load_site(pooled_dir, load_config("site"))
    pooled_tok = fit_tokenizer(merge_stats([site_stats(pooled_site, cfg)]), cfg)
    values = pl.concat(stay_events(s).select("code", "value").collect() for s in sites)
    values = values.drop_nulls("value").partition_by("code", as_dict=True)
    assert tok.cuts.keys() == pooled_tok.cuts.keys() and len(tok.cuts) >= 30
    for code, cuts in tok.cuts.items():  # every code, collapsed deciles included
        x = np.sort(values[(code,)]["value"].to_numpy())
        fed, pooled = decile_error(cuts, x), decile_error(pooled_tok.cuts[code], x)
        assert fed <= pooled + 0.01, (code, fed, pooled)


def test_sizes_leave_rounded_down_to_the_minimum_cell():
    policy = load_policy()  # min_cell_count 10
    assert rounded(57, policy) == 50 and rounded(9, policy) == 0
    assert coarse_count(57, "training examples", policy) == 50
    with pytest.raises(SiteRefusal) as e:
        coarse_count(7, "training examples", policy)
    assert e.value.category == "policy"
    assert str(e.value) == "policy: stats.min_cell_count: fewer than 10 training examples"


# Each identifying-text pattern with answers that only it catches (the finding's evasions
# among them), and honest answers every pattern must let pass.
SCREEN = {
    "digits": ["00482913", "bed 412"],
    "digit groups": ["55 12 34 56", "44 20 79 46"],
    "date": ["14/02", "2/14", "12 Feb", "14th February", "Feb 12", "see note 4-3-17"],
    "e-mail": ["jdoe@example.org", "jdoe(at)example.org", "j.doe [at] mail [dot] com"],
    "title": ["Dr.Smith", "per Dr. Alvarez", "Pt. Garcia", "Nurse Kelly", "Mrs Jones"],
    "identifier": ["dob unknown", "acct on file"],
    "address": ["42 Elm St", "7 Oak Avenue"],
    "place": ["Chicago IL", "Austin, TX"],
}
HONEST = [
    "Very Limited",
    "calm",
    "tachypnea",
    "hemodynamic instability",
    "Grade 1",
    "Alert",
    "Completely Limited",
    "nurse notified",
    "RASS -2",
    "Occasionally Moist",
    "4 = no pain",
    "IN PROGRESS",
    "Yes",
]


@pytest.mark.parametrize("pattern", SCREEN)
def test_each_identifying_text_pattern_catches_its_own_cases(pattern):
    """Each case is flagged for the reviewer, and by this pattern alone: deleting the
    pattern lets it pass unflagged."""
    others = [re.compile(p) for k, p in IDENTIFYING.items() if k != pattern]
    for answer in SCREEN[pattern]:
        assert screen_rule(answer) == pattern, answer
        assert not any(o.search(answer) for o in others), answer


def test_honest_answers_pass_the_screen_and_its_length_limit_holds():
    assert [a for a in HONEST if screen_rule(a)] == []
    assert MAX_OPEN_LENGTH == 60  # the limit the policy's comment states
    assert screen_rule("x" * 60) is None and screen_rule("x" * 61) == "longer than 60"
    # A bare name is not caught (a pattern for it takes "Very Limited" too): the allow-list
    # and the count rule guard it.
    assert screen_rule("John Smith") is None


@pytest.mark.parametrize(
    ("n", "prevalence", "withheld_by"),
    [
        (20, 0.5, None),  # exactly the minimum of stays
        (19, 0.5, "metrics.min_test_stays"),  # one under
        (100, 0.10, None),  # exactly 10 events
        (100, 0.09, "metrics.min_events"),  # 9 events
        (100, 0.95, "metrics.min_events"),  # a rare negative class: 5 non-events
        (100, 0.90, None),  # exactly 10 non-events
    ],
)
def test_the_metrics_floors_at_their_boundaries(n, prevalence, withheld_by):
    """Each floor holds at exactly its value and refuses one under; the event floor counts
    the rarer class, positive or negative."""
    flat = {
        "num_examples": float(n),
        "death_n": float(n),
        "death_prevalence": prevalence,
        "death_auroc": 0.7,
    }
    kept, why = withhold(flat, ["death"], load_policy())
    if withheld_by is None:
        assert why == {} and kept["death_auroc"] == 0.7
    else:
        assert why["death"].startswith(f"policy: {withheld_by} ")
        assert "death_auroc" not in kept and kept["num_examples"] == 0


def test_the_minimum_cell_holds_at_its_boundary():
    policy = load_policy()  # min_cell_count 10
    assert coarse_count(10, "stays", policy) == 10
    with pytest.raises(SiteRefusal, match="fewer than 10 stays"):
        coarse_count(9, "stays", policy)


def test_free_text_needs_its_own_floor_of_patients(site_dir, site_cfg):
    """`min_open_code_count` is a floor of its own: an allowed answer of 12 patients leaves
    under 10 and stays home under 15, while codes that are no free text keep the cell
    floor; with noise, no answer under 15 patients leaves."""
    code = _chart(site_dir, ["calm"])
    site = load_site(site_dir, site_cfg)
    loose = site_stats(site, load_config("tokenizer"), ["calm"])["codes"]
    strict_cfg = load_config("tokenizer", overrides=["stats.min_open_code_count=15"])
    strict = site_stats(site, strict_cfg, ["calm"])
    assert f"ASMT_{code}=calm" in loose and f"ASMT_{code}=calm" not in strict["codes"]
    closed = {c for c in loose if "=" not in c}
    assert closed == {c for c in strict["codes"] if "=" not in c}
    noisy_cfg = load_config(
        "tokenizer", overrides=["stats.min_open_code_count=15", "stats.noise_scale=3"]
    )
    allowed = list(load_policy().policy.stats.allow_open)
    for _ in range(5):
        codes = site_stats(site, noisy_cfg, allowed)["codes"]
        assert min(n for c, n in codes.items() if OPEN_SEP in c) >= 15
