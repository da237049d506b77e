"""Bag-of-tokens baseline on small synthetic sites."""

import json

import pytest
from conftest import run_tokenize

from fedclif.cli import main
from fedclif.simulations.synth import load_preset, write_site


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    for i, name in enumerate(("mimic-like", "shift-none")):
        write_site(load_preset(name), 800, i, root / name)
        assert main(["site", "stats", str(root / name), "--out", str(root / f"{name}.json")]) == 0
    assert (
        main(
            [
                "tokenizer",
                "fit",
                "--stats",
                str(root / "mimic-like.json"),
                str(root / "shift-none.json"),
                "--out",
                str(root / "tok.json"),
            ]
        )
        == 0
    )
    for name in ("mimic-like", "shift-none"):
        run_tokenize(root / name, root / "tok.json", root / f"{name}-tok")
    return root


def test_baseline_cli_reports_auroc_with_intervals(two_sites, capsys):
    out = two_sites / "res.json"
    assert (
        main(
            [
                "baseline",
                "--train",
                str(two_sites / "mimic-like-tok"),
                "--test",
                str(two_sites / "shift-none-tok"),
                "--labels",
                "same_admission_death,long_length_of_stay",
                "--boot",
                "100",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "AUROC" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert {(r["model"], r["label"]) for r in res} == {
        (m, lab)
        for m in ("logreg", "gbm")
        for lab in ("same_admission_death", "long_length_of_stay")
    }
    for r in res:
        assert r["auroc_low"] <= r["auroc"] <= r["auroc_high"]
        assert 0.6 < r["auroc"] <= 1.0, r  # learns something, even at this size
    assert len({r["test"] for r in res}) == 2  # in-site (out of fold) + shift-none


def test_baseline_refuses_mixed_tokenizers(two_sites, demo_dir, tmp_path, capsys):
    other = tmp_path / "demo-tok"
    assert (
        main(["tokenizer", "fit", "--data", str(demo_dir), "--out", str(tmp_path / "t.json")]) == 0
    )
    run_tokenize(demo_dir, tmp_path / "t.json", other)
    capsys.readouterr()
    assert (
        main(["baseline", "--train", str(two_sites / "mimic-like-tok"), "--test", str(other)]) == 1
    )
    assert "another tokenizer" in capsys.readouterr().err
    assert main(["baseline", "--train", str(other), "--labels", "bogus"]) == 1


@pytest.fixture(scope="module")
def transfer(tmp_path_factory):
    """mimic-like, shift-none and ucmc-like sites sharing one tokenizer (small: seconds)."""
    from fedclif.shared.clif.site import load_site
    from fedclif.shared.config import load_config
    from fedclif.shared.evaluation.baseline import load_dataset
    from fedclif.shared.tokens.stats import merge_stats, site_stats
    from fedclif.shared.tokens.timelines import tokenize_site
    from fedclif.shared.tokens.tokenizer import fit_tokenizer

    root = tmp_path_factory.mktemp("transfer")
    names = ("mimic-like", "shift-none", "ucmc-like")
    sites = {}
    for i, name in enumerate(names):
        write_site(load_preset(name), 2500, 100 + i, root / name)
        sites[name] = load_site(root / name, load_config("site"))
    cfg = load_config("tokenizer")
    tok = fit_tokenizer(merge_stats([site_stats(s, cfg) for s in sites.values()]), cfg)
    for name, site in sites.items():
        tokenize_site(site, tok, root / f"{name}-tok")
    return {name: load_dataset(root / f"{name}-tok") for name in names}


def test_transfer_ordering(transfer):
    """In-site death and long-stay AUROC are realistic (not trivially perfect); a site from
    the same distribution shows no clear difference (its interval overlaps the in-site
    one: each site's AUROC has its own sampling noise); ucmc-like scores lower on both."""
    from fedclif.shared.evaluation.baseline import run_baseline

    res = run_baseline(
        transfer["mimic-like"],
        [transfer["shift-none"], transfer["ucmc-like"]],
        labels=("same_admission_death", "long_length_of_stay"),
        models=("logreg",),
        n_boot=200,
    )
    by = {(r["label"], r["test"].split("/")[-1]): r for r in res}
    for label in ("same_admission_death", "long_length_of_stay"):
        home = by[(label, "mimic-like-tok (in-site, 5-fold)")]
        same = by[(label, "shift-none-tok")]
        assert 0.72 <= home["auroc"] <= 0.93, home
        assert same["auroc_high"] >= home["auroc_low"], (home, same)
        assert same["auroc_low"] <= home["auroc_high"], (home, same)
    drop = {
        label: by[(label, "shift-none-tok")]["auroc"] - by[(label, "ucmc-like-tok")]["auroc"]
        for label in ("same_admission_death", "long_length_of_stay")
    }
    # Lower on both (deterministic sites; measured 2026-12-05 with ucmc-like's respiratory
    # stays +6 days: death 0.037, long stay 0.013; at +5 days 0.045 and -0.014). Through
    # the pooled tokenizer the shift is milder than the study's (its tree test:
    # tests/simulations/test_synth.py::test_the_target_loses_to_shift_that_its_own_data_repairs).
    assert drop["same_admission_death"] >= 0.03 and drop["long_length_of_stay"] > 0, drop
