"""The transfer study at its quick profile: a real simulation (Flower's engine, Ray
virtual sites) whose results must show what the study exists to show."""

import json

import numpy as np
import pytest

from fedclif.cli import main
from fedclif.simulations.commands import load_study
from fedclif.simulations.report import MIN_EVENTS, write_report
from fedclif.simulations.study import Study, planned_messages


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = root / "out"
    args = ["simulate", "--profile", "quick", "--out", str(out), "--cache", str(root / "cache")]
    assert main(args) == 0
    return out, load_study(None, "quick", []).study


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
    assert progress["done"] == progress["total"] == planned_messages(cfg)
    # Event counts come from each site's test split, where the AUROCs in the table are.
    checks = json.loads((out / "summary.json").read_text())["checks"]
    for x in rows:
        if x["eval_split"] == "test":
            small = min(x["prevalence"], 1 - x["prevalence"])
            assert checks["test_events"][x["eval_site"]][x["task"]] == round(x["n"] * small)
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


def test_the_study_shows_the_transfer_gap_and_its_recovery(study):
    """What the simulation exists to show, at the quick profile (stated in report.md)."""
    out, _ = study
    checks = json.loads((out / "summary.json").read_text())["checks"]
    # ucmc-like target: zero-shot falls by at least 0.1 AUROC on death or long stay.
    assert checks["zero_shot_drop_at_least_0.1"]["target"], checks["zero_shot_gap"]
    # shift-none third site (the control): no clear drop from in-distribution on any task
    # (the interval of in-distribution minus zero-shot does not lie above 0).
    assert all(checks["zero_shot_no_clear_drop"]["third"].values()), checks["zero_shot_drop"]
    # ...while at the ucmc-like target death falls clearly: the whole interval above 0.
    assert checks["zero_shot_drop"]["target"]["death"]["low"] > 0, checks["zero_shot_drop"]
    # AUROC at the target rises with its share of training data, from every starting point.
    assert all(checks["rises_with_target_fraction"].values()), checks
    # The report says whether federated pretraining beat each single-site arm, per share,
    # from a paired bootstrap of the difference on the same stays (same resamples).
    fed = checks["federated_vs_single_site"]
    assert set(fed) == {"0.05", "1"}
    rows = json.loads((out / "results.json").read_text())["rows"]
    at_target = [x for x in rows if x["setting"] == "local_finetune"]
    assert len({len(x["auroc_boot"]) for x in at_target if x["task"] == "death"}) == 1
    for v in fed.values():
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
