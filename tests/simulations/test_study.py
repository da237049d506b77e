"""The transfer study at its quick profile: a real simulation (Flower's engine, Ray
virtual sites) whose results must show what the study exists to show."""

import json

import numpy as np
import polars as pl
import pytest
from safetensors.numpy import load_file

from fedclif.cli import main
from fedclif.shared.clif.schema import load_schemas
from fedclif.shared.clif.site import load_site
from fedclif.shared.config import load_config
from fedclif.shared.errors import FedclifError
from fedclif.shared.evaluation.metrics import paired_difference
from fedclif.shared.tokens.stats import merge_stats, site_stats
from fedclif.shared.tokens.tokenizer import fit_tokenizer
from fedclif.simulations import sites as sim_sites
from fedclif.simulations.commands import load_study
from fedclif.simulations.plan import make_plan
from fedclif.simulations.reference_arms import CEILING_EVALUATIONS
from fedclif.simulations.report import MIN_EVENTS, write_report
from fedclif.simulations.shifts import shifts_table, write_shifts
from fedclif.simulations.sites import study_sites
from fedclif.simulations.study import Study
from fedclif.simulations.truth import truth_path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = root / "out"
    args = ["simulate", "--profile", "quick", "--out", str(out), "--cache", str(root / "cache")]
    assert main(args) == 0
    return out, load_study(None, "quick", []).study


@pytest.mark.slow  # the quick study, once per module
def test_results_hold_every_arm_task_seed_and_interval(study):
    """Every arm, task, seed and share has its AUROC with interval, AUPRC and ROC curve;
    the report and its figures are written."""
    out, cfg = study
    r = json.loads((out / "results.json").read_text())
    rows = r["rows"]
    seeds, tasks = set(cfg.seeds), set(cfg.tasks)
    for arm, setting in [
        ("source_only", "in_distribution"),
        ("source_only", "zero_shot"),
        ("source_only_probe", "in_distribution"),
        ("source_only_probe", "zero_shot"),
        ("source_finetuned", "local_finetune"),
        ("target_only", "local_finetune"),
        ("federated_finetuned", "local_finetune"),
        ("pooled", "pooled"),
    ]:
        sel = [x for x in rows if x["arm"] == arm and x["setting"] == setting]
        assert {(x["seed"], x["task"]) for x in sel} == {(s, t) for s in seeds for t in tasks}
        for x in sel:
            assert x["auroc_low"] <= x["auroc"] <= x["auroc_high"], (arm, x)
            assert 0 <= x["auprc"] <= 1 and len(x["tpr_at_fpr"]) == 21
    # The cross-site matrix: every real site's finetuned model at every real site.
    cross = {(x["train_sites"][0], x["eval_site"]) for x in rows if x["setting"] == "cross_site"}
    assert cross == {
        (a, b) for a in ("source", "target", "third") for b in ("source", "target", "third")
    }
    local = [x for x in rows if x["setting"] == "local_finetune"]
    assert {x["fraction"] for x in local} == set(cfg.fractions)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["done"] == progress["total"] == make_plan(cfg).messages()
    # Event counts come from each site's test split, where the AUROCs in the table are.
    checks = json.loads((out / "summary.json").read_text())["checks"]
    for x in rows:
        if x["eval_split"] == "test":
            small = min(x["prevalence"], 1 - x["prevalence"])
            assert checks["test_events"][x["eval_site"]][x["task"]] == round(x["n"] * small)
    # Every task measurable at every site: at least 30 events of the rarer class.
    assert min(n for ev in checks["test_events"].values() for n in ev.values()) >= 30, checks
    assert checks["tasks_with_enough_target_events"] == [
        t for t in cfg.tasks if checks["test_events"]["target"][t] >= MIN_EVENTS
    ]
    report = (out / "report.md").read_text()
    assert "| paper |" in report
    # Every setting the study used, named by the report and loadable as a --config.
    assert "resolved.yaml" in report
    again = load_study(str(out / "resolved.yaml"), "quick", []).study
    assert again == cfg
    for png in ("auroc_by_arm", "recovery", "roc", "cross_site"):
        assert (out / f"{png}.png").stat().st_size > 5000


@pytest.mark.slow  # the quick study, once per module
def test_the_study_shows_the_transfer_gap_and_its_recovery(study):
    """What the simulation exists to show, at the quick profile (stated in report.md)."""
    out, cfg = study
    checks = json.loads((out / "summary.json").read_text())["checks"]
    rows = json.loads((out / "results.json").read_text())["rows"]

    def auroc(arm, setting, site, task, frac=1.0):
        """Mean over seeds, from the rows (not from the report's summary)."""
        return np.mean(
            [
                x["auroc"]
                for x in rows
                if (x["arm"], x["setting"], x["eval_site"], x["task"], x["fraction"])
                == (arm, setting, site, task, frac)
            ]
        )

    gap = {
        (site, t): auroc("source_only", "in_distribution", "source", t)
        - auroc("source_only", "zero_shot", site, t)
        for site in ("target", "third")
        for t in cfg.tasks
    }
    # ucmc-like target: zero-shot falls by at least 0.1 AUROC on death or long stay.
    assert max(gap["target", "death"], gap["target", "long_los"]) >= 0.1, gap
    for (site, t), g in gap.items():  # the report's differences are these
        d = checks["zero_shot_drop"][site][t]
        assert d["difference"] == pytest.approx(g) and d["low"] <= g <= d["high"]
        assert d["verdict"] == (
            "beats" if d["low"] > 0 else "worse" if d["high"] < 0 else "no clear difference"
        )
    # shift-none third site (the control): no clear drop from in-distribution on any task
    # (the interval of in-distribution minus zero-shot does not lie above 0).
    assert all(checks["zero_shot_drop"]["third"][t]["low"] <= 0 for t in cfg.tasks)
    # ...while at the ucmc-like target death falls clearly: the whole interval above 0.
    assert checks["zero_shot_drop"]["target"]["death"]["low"] > 0, checks["zero_shot_drop"]
    # AUROC at the target rises with its share of training data, from every starting point
    # (mean over the tasks with enough events there).
    lo, hi = min(cfg.fractions), max(cfg.fractions)
    tasks = [t for t in cfg.tasks if checks["test_events"]["target"][t] >= MIN_EVENTS]
    for arm in ("source_finetuned", "target_only", "federated_finetuned"):
        at = {
            f: np.mean([auroc(arm, "local_finetune", "target", t, f) for t in tasks])
            for f in (lo, hi)
        }
        assert at[hi] > at[lo], (arm, at)
    # The report says whether federated pretraining beat each single-site arm, per share,
    # from a paired bootstrap of the difference on the same stays (same resamples).
    fed = checks["federated_vs_single_site"]
    assert set(fed) == {"0.05", "1"}
    at_target = [x for x in rows if x["setting"] == "local_finetune"]
    assert len({len(x["auroc_boot"]) for x in at_target if x["task"] == "death"}) == 1
    arms = {
        "federated": "federated_finetuned",
        "source_only": "source_finetuned",
        "target_only": "target_only",
    }
    for f, v in fed.items():
        for key, arm in arms.items():
            want = np.mean([auroc(arm, "local_finetune", "target", t, float(f)) for t in tasks])
            assert v[key] == pytest.approx(want), (f, key)
        for other in ("source_only", "target_only"):
            d = v[f"vs_{other}"]
            assert d["low"] <= d["difference"] <= d["high"], d
            assert abs(d["difference"] - (v["federated"] - v[other])) < 1e-9
            assert v[f"beats_{other}"] is (d["low"] > 0)
    report = (out / "report.md").read_text()
    assert "paired bootstrap" in report and "federated - source only" in report
    # AUPRC beside AUROC: a second table of the same cells, each with its interval.
    table = json.loads((out / "summary.json").read_text())["table"]
    death = table["death"]["in-distribution"]
    assert death["auprc_low"] <= death["auprc"] <= death["auprc_high"]
    assert "AUPRC, the same cells" in report
    assert f"| death | {death['auprc']:.3f} [{death['auprc_low']:.2f}" in report


@pytest.mark.slow  # the quick study, once per module
def test_the_recipe_sweep_holds_the_tree_to_the_studys_own_rows(study, tmp_path, capsys, bench):
    """bench/recipe.py on the quick study's sites: its tree is the study's gbm arm (the same
    fit on the same split gives the same AUROC, at the source, zero-shot and in-site at the
    target), and a setting's foundation model is scored on every split the table names."""
    recipe = bench("recipe").main

    out, _ = study
    cache = out.parent / "cache"
    args = ["--study", str(out), "--cache", str(cache), "--only", "base", "--seeds", "0"]
    args += ["--shares", "0.25"]
    recipe([*args, "--out", str(tmp_path)])
    got = json.loads((tmp_path / "recipe.json").read_text())
    rows = json.loads((out / "results.json").read_text())["rows"]
    where = {"in_distribution": "source", "zero_shot": "target", "in_site": "target"}
    gbm = {
        (x["setting"], x["task"]): x["auroc"]
        for x in rows
        if x["arm"] == "gbm" and x["eval_site"] == where[x["setting"]]
    }
    cols = {"in_distribution": "source test", "zero_shot": "zero-shot", "in_site": "target test"}
    for task in ("death", "long_los"):
        for setting, col in cols.items():
            assert got["tree (GBM)"][f"{task} {col}"] == pytest.approx(gbm[setting, task])
        for col in ("source val", "source test", "zero-shot", "target test"):
            assert 0 < got["base"][f"{task} {col}"] < 1
    assert got["base"]["pretrain_s"] > 0 and got["base"]["finetune_s"] > 0
    # The recovery curve: a quarter of the target's patients, and all of them.
    every = np.mean([got["base"][f"{task} target test"] for task in ("death", "long_los")])
    assert got["base"]["share 1"] == pytest.approx(every)
    assert 0 < got["base"]["share 0.25"] < 1 and got["base"]["share 0.25"] != every
    printed = capsys.readouterr().out
    assert "| tree (GBM) |" in printed and "| base |" in printed
    assert "| setting | share 0.25 | share 1 |" in printed


@pytest.mark.slow  # the quick study, once per module
def test_the_report_holds_calibration_the_published_comparisons_and_the_pretraining_curve(
    study,
):
    """Calibration per arm (raw and recalibrated), the gradient-boosting arm, the
    cross-site penalty and the federated share of pooled (each recomputed here from the
    rows), and the federated pretraining's per-round validation loss."""
    out, cfg = study
    r = json.loads((out / "results.json").read_text())
    rows, summary = r["rows"], json.loads((out / "summary.json").read_text())
    model_rows = [
        x for x in rows if not x["arm"].endswith("_probe") and x["arm"] not in ("gbm", "ceiling")
    ]
    for x in model_rows:
        assert x["brier_low"] <= x["brier"] <= x["brier_high"] and 0 <= x["ece"] <= 1, x
        assert "brier_recal" in x and len(x["reliability_observed"]) == 10, x
    # Zero-shot at the ucmc-like target: the base rate moved, so recalibrating on the
    # target's validation stays lowers the calibration error (mean over seeds and tasks).
    zs = [
        x
        for x in rows
        if x["arm"] == "source_only" and x["setting"] == "zero_shot" and x["eval_site"] == "target"
    ]
    assert np.mean([x["ece_recal"] for x in zs]) < np.mean([x["ece"] for x in zs])
    cal = summary["calibration"]["death"]["zero-shot"]
    assert cal["brier"] == pytest.approx(np.mean([x["brier"] for x in zs if x["task"] == "death"]))
    # The baseline, fitted at the source and scored where the foundation model is; and
    # fitted at the target on its own train split, scored on its test split: the bar.
    gbm = {(x["setting"], x["eval_site"], x["task"]) for x in rows if x["arm"] == "gbm"}
    assert gbm == {
        (s, site, t)
        for t in cfg.tasks
        for s, site in [
            ("in_distribution", "source"),
            ("zero_shot", "target"),
            ("zero_shot", "third"),
            ("in_site", "target"),
        ]
    }
    for x in rows:
        if x["arm"] == "gbm":
            assert x["train_sites"] == ["target" if x["setting"] == "in_site" else "source"]
            if x["setting"] == "in_site":
                assert x["eval_split"] == "test"
                assert summary["table"][x["task"]]["GBM in-site"]["auroc"] == x["auroc"]
    # Each hospital's ceiling where the arms are scored, one copy per seed; every arm a
    # share of it on the same stays; the zero-shot gap's parts add up to the gap.
    ceiling = {
        (x["eval_site"], x["setting"], x["eval_split"], x["task"], x["seed"])
        for x in rows
        if x["arm"] == "ceiling"
    }
    assert ceiling == {
        (site, setting, split, t, seed)
        for site, setting, split in CEILING_EVALUATIONS
        for t in cfg.tasks
        for seed in cfg.seeds
    }
    for t in cfg.tasks:
        cells = summary["table"][t]
        assert cells["ceiling"]["auroc"] > cells["GBM in-site"]["auroc"], t
        share = summary["share_of_ceiling"][t]["local finetune"]
        assert share["percent"] == pytest.approx(
            100 * cells["local finetune"]["auroc"] / cells["ceiling"]["auroc"]
        )
        assert share["low"] <= share["percent"] <= share["high"]
        for site in ("target", "third"):
            parts = summary["gap_split"][site][t]
            drop = summary["checks"]["zero_shot_drop"][site][t]["difference"]
            total = (
                parts["ceiling_difference"]["difference"]
                + parts["transfer_gap"]["difference"]
                - parts["home_shortfall"]["difference"]
            )
            assert total == pytest.approx(drop), (site, t)
    assert "## Each hospital's ceiling" in (out / "report.md").read_text()
    # The recovery against the ceiling and the tree (recomputed from the table's cells):
    # the smallest share reaching the tree's in-site interval; the headline says it.
    fracs = [float(f) for f in cfg.fractions]
    for arm, by_task in summary["recovery_to_ceiling"].items():
        for t, v in by_task.items():
            assert len(v["shares"]) == len(fracs)
            low = summary["table"][t]["GBM in-site"]["auroc_low"]
            cells = summary["recovery"][arm][t]
            reached = [f for f, c in zip(fracs, cells, strict=True) if c["auroc"] >= low]
            assert v["tree_at"] == (reached[0] if reached else None), (arm, t)
            top = v["shares"][-1]
            assert top["percent"] == pytest.approx(
                100 * cells[-1]["auroc"] / summary["table"][t]["ceiling"]["auroc"]
            )
            assert top["low"] <= top["percent"] <= top["high"]
    assert "**Which half of the paper**" in (out / "report.md").read_text()
    tasks = summary["checks"]["tasks_with_enough_target_events"]

    def mean(arm, setting, site, metric="auroc", frac=1.0):
        return np.mean(
            [
                np.mean(
                    [
                        x[metric]
                        for x in rows
                        if x["arm"] == arm
                        and x["setting"] == setting
                        and x["eval_site"] == site
                        and x["task"] == t
                        and x["fraction"] == frac
                    ]
                )
                for t in tasks
            ]
        )

    for label, arm in (("foundation model", "source_only"), ("gradient boosting", "gbm")):
        for site in ("target", "third"):
            for metric in ("auroc", "auprc"):
                d = summary["penalty"][label][site][metric]
                want = mean(arm, "in_distribution", "source", metric) - mean(
                    arm, "zero_shot", site, metric
                )
                assert d["difference"] == pytest.approx(want), (label, site, metric)
                assert d["low"] <= d["difference"] <= d["high"]
    top = max(cfg.fractions)
    for metric in ("auroc", "auprc"):
        share = summary["federated_share"][metric]
        fed = mean("federated_finetuned", "local_finetune", "target", metric, top)
        pooled = mean("pooled", "pooled", "target", metric)
        assert share["percent"] == pytest.approx(100 * fed / pooled)
        assert share["low"] <= share["percent"] <= share["high"]
    report = (out / "report.md").read_text()
    for published in ("0.025", "0.079", "0.027", "0.089", "98-100%", "85%"):
        assert published in report
    assert "## Calibration" in report and "## Where the time goes" in report
    # Federated pretraining: the global model's validation loss after every round, at
    # every real site, falling; the report names the round within 1% of the last.
    curves = r["pretraining_curves"]
    assert set(curves) == {str(cfg.seeds[0])}
    for c in curves.values():
        assert [p["round"] for p in c] == list(range(1, cfg.pretrain.rounds + 1))
        assert set(c[0]["sites"]) == {"source", "target", "third"}
        assert c[-1]["val_loss"] < c[0]["val_loss"]
    last = np.mean([c[-1]["val_loss"] for c in curves.values()])
    first_within = min(
        k + 1
        for k in range(cfg.pretrain.rounds)
        if np.mean([c[k]["val_loss"] for c in curves.values()]) <= 1.01 * last
    )
    assert summary["pretraining"]["within_1pct_of_last"] == first_within
    for png in ("reliability", "pretraining_loss"):
        assert (out / f"{png}.png").stat().st_size > 5000
    # Every phase's site jobs timed themselves.
    assert r["site_seconds"]["pretraining"]["train_seconds"] > 0
    assert r["site_seconds"]["evaluation"]["evaluate_seconds"] > 0


@pytest.mark.slow  # the quick study, once per module
def test_the_shifts_profile_runs_every_single_shift_target_and_ucmc(tmp_path, study, capsys):
    """`--profile shifts` names each single-shift preset and ucmc-like as a target; an
    unknown target is refused before anything runs; the table takes each target's summary:
    the gap with its interval and the smallest share reaching the source's in-distribution
    interval (recomputed here)."""
    cfg = load_study(None, "shifts", [])
    assert list(cfg.study.targets) == [
        "shift-case-mix",
        "shift-policy",
        "shift-measurement",
        "shift-documentation",
        "shift-labels",
        "ucmc-like",
    ]
    assert main(["simulate", "--out", str(tmp_path / "x"), "study.targets=[nowhere]"]) == 1
    assert "study.targets: unknown preset 'nowhere'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out, quick = study
    summary = json.loads((out / "summary.json").read_text())
    fracs = [float(f) for f in quick.fractions]
    table = shifts_table({"ucmc-like": summary}, fracs)
    for task, v in table["ucmc-like"].items():
        assert v["gap"] == summary["checks"]["zero_shot_drop"]["target"][task]
        for part in ("ceiling_difference", "transfer_gap"):
            assert v[part] == summary["gap_split"]["target"][task][part]
        low = summary["table"][task]["in-distribution"]["auroc_low"]
        for arm in ("source_finetuned", "federated_finetuned"):
            reached = [
                f
                for f, c in zip(fracs, summary["recovery"][arm][task], strict=True)
                if c.get("auroc", 0) >= low
            ]
            assert v[arm] == (reached[0] if reached else None)
    text = write_shifts(tmp_path, {"ucmc-like": summary}, load_study(None, "quick", []))
    assert "| ucmc-like | death |" in text and (tmp_path / "shifts.png").stat().st_size > 5000


def test_study_train_settings_override_the_federation_defaults(tmp_path):
    """Local finetuning is one whole run: the study's cosine decay, not the federation's
    constant rate for short rounds, is what the site is sent."""
    cfg = load_study(None, "default", [])
    fed = Study(None, cfg, tmp_path)._fed(["target"], 0, "finetune", 100, 1, 0.25)
    assert fed.federation.rounds.finetune == 1 and fed.model.arch == "llama"
    # A finetuning job keeps the study's tasks beside its step budget (both under
    # train.finetune: one once replaced the other).
    quick = load_study(None, "quick", [])
    job = Study(None, quick, tmp_path)._fed(["target"], 0, "finetune", 30, 1, 0.05)
    assert list(job.train.finetune.tasks) == list(quick.study.tasks) == ["death", "long_los"]
    assert job.train.finetune.max_steps == 30
    ft = fed.train.finetune
    assert ft.schedule == cfg.train.finetune.schedule == "cosine"
    assert (ft.max_steps, ft.context, fed.train.split.train_fraction) == (100, 128, 0.25)


@pytest.mark.slow  # the quick study, once per module
def test_the_report_stands_with_cells_a_site_withheld(study, tmp_path):
    """A site's policy withholds a task's metrics on too few events: the report marks the
    cells missing and still judges the rest."""
    out, _ = study
    r = json.loads((out / "results.json").read_text())
    r["rows"] = [
        x for x in r["rows"] if not (x["task"] == "long_los" and x["eval_site"] != "source")
    ]
    summary = write_report(tmp_path, r)
    assert np.isnan(summary["table"]["long_los"]["target only"].get("auroc", np.nan))
    assert "| long_los | " in (tmp_path / "report.md").read_text()
    assert (tmp_path / "recovery.png").is_file()


def test_each_site_is_generated_once_for_every_study_that_names_it(tmp_path, monkeypatch):
    """Studies of two targets share the source's generated directory (the `shifts`
    profile generates it once) but not their pooled site or the virtual sites' work
    directories, where each site caches the timelines of its own data."""
    small = ["study.sites.source.stays=60", "study.sites.target.stays=60", "study.sites.third=null"]
    a = load_study(None, "default", small).study
    # shift-documentation lacks two optional tables: the pooled site holds the others'.
    b = load_study(None, "default", [*small, "study.sites.target.preset=shift-documentation"]).study
    sites_a, work_a = study_sites(a, tmp_path)
    sites_b, work_b = study_sites(b, tmp_path)
    assert [p.name for p in sites_a] == ["source", "target", "pooled"]
    assert sites_a[0] == sites_b[0] and sites_a[1] != sites_b[1]
    assert sites_a[2] != sites_b[2] and work_a != work_b
    src = pl.read_parquet(sites_a[0] / "clif_hospitalization.parquet")
    for pooled, target in ((sites_a[2], sites_a[1]), (sites_b[2], sites_b[1])):
        hosp = pl.read_parquet(pooled / "clif_hospitalization.parquet")
        want = src.height + pl.read_parquet(target / "clif_hospitalization.parquet").height
        assert hosp.height == want
    assert not (sites_b[1] / "clif_position.parquet").exists()
    assert (sites_b[2] / "clif_position.parquet").is_file()
    # A site written by other generator code is not served: the site is written anew,
    # its truth beside it.
    changed = tmp_path / "synth_next.py"
    changed.write_text("# the generator, changed\n")
    monkeypatch.setattr(sim_sites, "GENERATOR_CODE", (*sim_sites.GENERATOR_CODE, str(changed)))
    sites_c, _ = study_sites(a, tmp_path)
    assert sites_c[0] != sites_a[0] and (sites_c[0] / ".complete").is_file()
    assert truth_path(sites_c[0]).is_file() and truth_path(sites_a[0]).is_file()


@pytest.mark.slow  # the quick study, once per module
def test_the_objectives_question_compares_each_set_with_next_token_alone(study):
    """The quick profile's two objective sets: the source-only model pretrained with the
    time-series objectives (its heads trained and kept), evaluated like next-token alone
    in and out of distribution, probed and finetuned on 5% of the target; each comparison
    recomputed from the rows' replicates, the table and objectives.png written."""
    out, cfg = study
    assert [s.name for s in cfg.objectives] == ["next_token", "ts"]
    r = json.loads((out / "results.json").read_text())
    rows, tasks = r["rows"], set(cfg.tasks)
    asked = set(cfg.objectives_seeds)  # the quick profile asks it at one seed
    for arm, setting, site, frac in [
        ("source_only[ts]", "in_distribution", "source", 1.0),
        ("source_only[ts]", "zero_shot", "target", 1.0),
        ("source_only[ts]_probe", "zero_shot", "target", 1.0),
        ("source_finetuned[ts]", "local_finetune", "target", cfg.ablation_fraction),
    ]:
        sel = [x for x in rows if (x["arm"], x["setting"], x["eval_site"]) == (arm, setting, site)]
        assert {(x["seed"], x["task"]) for x in sel} == {(s, t) for s in asked for t in tasks}
        assert all(x["fraction"] == frac for x in sel)
    # The lane pretrained with the objectives: their heads are in its weights; the
    # next-token lanes have none.
    heads = load_file(
        str(
            out
            / "runs"
            / "source_only[ts]-pretrain-source-f1-s0"
            / "checkpoint"
            / "weights.safetensors"
        )
    )
    assert any(k.startswith("pretrain_heads.ts_in") for k in heads)
    plain = load_file(
        str(
            out
            / "runs"
            / "source_only-pretrain-source-f1-s0"
            / "checkpoint"
            / "weights.safetensors"
        )
    )
    assert not any(k.startswith("pretrain_heads") for k in plain)
    ab = json.loads((out / "summary.json").read_text())["objectives"]
    assert set(ab) == {"next_token", "ts"}
    for t in tasks:
        d = ab["ts"][t]["vs_first"]["zero-shot"]

        def reps(arm: str, t: str = t) -> np.ndarray:
            sel = {
                x["seed"]: x
                for x in rows
                if x["arm"] == arm
                and x["task"] == t
                and x["setting"] == "zero_shot"
                and x["eval_site"] == "target"
            }
            return np.mean([sel[s]["auroc_boot"] for s in sorted(asked)], 0)  # seed by seed

        ref = paired_difference(0, 0, reps("source_only[ts]"), reps("source_only"))
        assert (d["low"], d["high"]) == pytest.approx((ref["low"], ref["high"]))
        assert d["verdict"] == ref["verdict"]
        assert (d["verdict"] == "beats") == (d["low"] > 0), d
        assert ab["ts"][t]["gap"]["difference"] == pytest.approx(
            ab["ts"][t]["cells"]["in-distribution"]["auroc"]
            - ab["ts"][t]["cells"]["zero-shot"]["auroc"]
        )
    report = (out / "report.md").read_text()
    assert (
        "## Pretraining objectives" in report and "| ts | next_token+ts_align+ts_recon |" in report
    )
    assert (out / "objectives.png").stat().st_size > 5000


def test_a_study_site_in_clif_3_0_makes_a_mixed_federation_with_one_vocabulary(tmp_path):
    """`study.sites.<role>.clif=3.0` writes that hospital in CLIF 3.0: it is read as 3.0,
    the pooled site holds its data in 2.1 terms (every column fedclif reads as in the
    all-2.1 study's pooled site), and
    the federation's statistics fit the tokenizer (hash) the all-2.1 federation fits."""
    small = ["study.sites.source.stays=80", "study.sites.target.stays=80", "study.sites.third=null"]
    mixed = load_study(None, "default", [*small, "study.sites.target.clif=3.0"]).study
    plain = load_study(None, "default", small).study
    (src, tgt3, pool3), _ = study_sites(mixed, tmp_path)
    (src2, tgt2, pool2), _ = study_sites(plain, tmp_path)
    assert src == src2 and tgt3 != tgt2  # the source is generated once for both
    assert set(pl.read_parquet(tgt3 / "clif_patient.parquet")["sex_category"]) <= {"male", "female"}
    site_cfg, tok_cfg = load_config("site"), load_config("tokenizer")
    sites3 = [load_site(d, site_cfg) for d in (src, tgt3)]
    assert [s.report.clif_version for s in sites3] == ["2.1", "3.0"]
    for name, schema in load_schemas().items():  # every column fedclif reads
        if (pool2 / schema.file_name).is_file():
            cols = [c for c in schema.read if c in pl.read_parquet_schema(pool2 / schema.file_name)]
            a, b = (pl.read_parquet(p / schema.file_name, columns=cols) for p in (pool3, pool2))
            assert a.equals(b), name
    hashes = [
        fit_tokenizer(merge_stats([site_stats(s, tok_cfg) for s in sites]), tok_cfg).hash
        for sites in (sites3, [load_site(d, site_cfg) for d in (src2, tgt2)])
    ]
    assert hashes[0] == hashes[1]
    bad = load_study(None, "default", [*small, "study.sites.target.clif=3.1"]).study
    with pytest.raises(FedclifError, match=r"study.sites.target.clif='3\.1'.*2\.1, 3\.0"):
        study_sites(bad, tmp_path)
