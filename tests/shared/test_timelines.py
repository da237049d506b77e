"""Tokenized timelines and labels on the real demo: chain, 24 h cut, unknowns, labels."""

import json
from datetime import timedelta

import numpy as np
import pandas as pd
import polars as pl
import pytest
from conftest import read, run_tokenize, write
from omegaconf import OmegaConf

from fedclif.cli import main
from fedclif.shared.clif.site import load_site
from fedclif.shared.errors import FedclifError
from fedclif.shared.tokens.splits import SPLITS, assign_splits
from fedclif.shared.tokens.stats import merge_stats, site_stats
from fedclif.shared.tokens.timelines import read_timelines, tokenize_site
from fedclif.shared.tokens.timeseries import read_grid, variables
from fedclif.shared.tokens.tokenizer import Tokenizer, fit_tokenizer


def test_labels_match_an_independent_implementation(demo_dir, demo_tokens):
    labels = pl.read_parquet(demo_tokens / "labels.parquet")
    assert labels.height == 272
    got = {c: int(labels[c].sum()) for c in labels.columns if c != "hospitalization_id"}
    assert got["same_admission_death"] == 16
    assert got["long_length_of_stay"] == 99
    assert got["icu_admission"] == 132
    assert got["imv_event"] == 58
    # The same definitions written again in pandas, straight from the parquet files.
    h = pd.read_parquet(demo_dir / "clif_hospitalization.parquet")
    h["los"] = h.discharge_dttm - h.admission_dttm
    stays = h[h.los >= timedelta(hours=24)]
    adt = pd.read_parquet(demo_dir / "clif_adt.parquet")
    rs = pd.read_parquet(demo_dir / "clif_respiratory_support.parquet")
    icu = set(adt.loc[adt.location_category == "icu", "hospitalization_id"])
    imv = set(rs.loc[rs.device_category == "IMV", "hospitalization_id"])
    assert (stays.discharge_category == "Expired").sum() == got["same_admission_death"]
    assert (stays.los > timedelta(days=7)).sum() == got["long_length_of_stay"]
    assert stays.hospitalization_id.isin(icu).sum() == got["icu_admission"]
    assert stays.hospitalization_id.isin(imv).sum() == got["imv_event"]

    def first_24h(events: pd.DataFrame, time: str) -> set:  # stays with an event in 24 h
        e = events.merge(h[["hospitalization_id", "admission_dttm"]])
        return set(e.loc[e[time] < e.admission_dttm + timedelta(hours=24), "hospitalization_id"])

    icu24 = first_24h(adt[adt.location_category == "icu"], "in_dttm")
    imv24 = first_24h(rs[rs.device_category == "IMV"], "recorded_dttm")
    assert stays.hospitalization_id.isin(icu24).sum() == got["icu_admission_24h"]
    assert stays.hospitalization_id.isin(imv24).sum() == got["imv_event_24h"]
    assert 0 < got["imv_event_24h"] < got["imv_event"]  # the window cuts: 24 h, not the stay
    readmit = 0
    for _, s in stays.iterrows():
        other = h[
            (h.patient_id == s.patient_id)
            & (h.admission_dttm > s.discharge_dttm)
            & (h.admission_dttm <= s.discharge_dttm + timedelta(days=30))
        ]
        readmit += not other.empty
    assert readmit == got["readmission_30d"]
    # Death is unknown, not "survived", when the discharge category is Missing.
    missing = set(stays.loc[stays.discharge_category == "Missing", "hospitalization_id"])
    nulls = set(labels.filter(pl.col("same_admission_death").is_null())["hospitalization_id"])
    assert nulls == missing and len(missing) == 19


def test_input_window_is_a_prefix_cut_at_24h(demo_tokens):
    tl, tok = read_timelines(demo_tokens)
    assert tl.height == 272
    end = tok.index["TL_END"]
    for r in tl.iter_rows(named=True):
        n = r["n_tokens_24h"]
        assert r["tokens_24h"] == r["tokens"][:n]
        assert r["types_24h"] == r["types"][:n]
        assert all(h < 24 for h in r["hours_24h"])
        assert n == r["n_tokens"] or r["hours"][n] >= 24
        assert end not in r["tokens_24h"] and r["tokens"][-1] == end
        assert r["hours"] == sorted(r["hours"])


def test_one_real_stay_decoded_by_hand(demo_tokens, capsys):
    """Stay 25563031 (patient 10001725), checked against the raw tables.

    Admitted 2110-04-11 20:08 from the ED, female, White, non-Hispanic, 46 years (below the
    first age cut, 48). Ward at 20:09:36 (+2 min: no time token), weight 72.2 kg and height
    157 cm at 20:52 (+42 min: T_15m-1h), ICU at 20:52:22, heart rate at 20:54, code status
    Full at 21:01, nasal cannula 2 L/min at 21:07; discharged home 04-14 20:00 (71.87 h).
    """
    tl, tok = read_timelines(demo_tokens)
    r = tl.filter(pl.col("hospitalization_id") == "25563031").row(0, named=True)
    toks = tok.decode(r["tokens"])
    assert toks[:12] == [
        "TL_START",
        "SEX_Female",
        "RACE_White",
        "ETH_Non-Hispanic",
        "AGE_Q0",
        "ADM_ed",
        "XFR-IN_ward",
        "T_15m-1h",
        "VTL_height_cm_Q0",
        "VTL_weight_kg_Q2",
        "XFR-IN_icu",
        "VTL_heart_rate_Q0",
    ]
    assert tok.cuts["VTL_weight_kg"][1] <= 72.2 < tok.cuts["VTL_weight_kg"][2]
    assert tok.cuts["VTL_height_cm"][0] > 157 and tok.cuts["AGE"][0] > 46
    assert round(r["hours"][6], 3) == round(96 / 3600, 3)
    assert "CODE_Full" in toks[12:40] and "RESP_device_Nasal Cannula" in toks[12:45]
    assert toks[-2:] == ["DSCG_Home", "TL_END"] and round(r["hours"][-1], 2) == 71.87
    assert r["age"] == 46 and r["hosp_index"] == 0
    assert main(["site", "inspect", str(demo_tokens), "--id", "25563031"]) == 0
    shown = capsys.readouterr().out
    assert "VTL_weight_kg_Q2" in shown and "TL_END" not in shown and "icu_admission=True" in shown


def _tokenize(d, site_cfg, tok_cfg, out, tok=None):
    site = load_site(d, site_cfg)
    tok = tok or fit_tokenizer(merge_stats([site_stats(site, tok_cfg)]), tok_cfg)
    tokenize_site(site, tok, out)
    return read_timelines(out)


def test_unknown_codes_keep_their_event_and_missing_values_are_not_binned(
    site_dir, demo_dir, site_cfg, tok_cfg, tmp_path
):
    v = read(site_dir, "vitals")
    first = v.filter(pl.col("hospitalization_id") == "25563031").sort("recorded_dttm")
    at = first["recorded_dttm"][0]
    extra = first.head(2).with_columns(
        pl.Series("vital_category", ["pain_score", "sbp"]),
        pl.Series("vital_value", [3.0, None], dtype=pl.Float64),
        pl.lit(at + timedelta(hours=5)).alias("recorded_dttm"),
    )
    write(site_dir, "vitals", pl.concat([v, extra]))
    base = load_site(demo_dir, site_cfg)
    tok = fit_tokenizer(merge_stats([site_stats(base, tok_cfg)]), tok_cfg)
    tl, tok = _tokenize(site_dir, site_cfg, tok_cfg, tmp_path / "out", tok)
    r = tl.filter(pl.col("hospitalization_id") == "25563031").row(0, named=True)
    adm = (
        load_site(demo_dir, site_cfg)
        .tables["hospitalization"]
        .filter(pl.col("hospitalization_id") == "25563031")["admission_dttm"][0]
    )
    hours = (at + timedelta(hours=5) - adm).total_seconds() / 3600
    there = [
        t for t, h in zip(tok.decode(r["tokens"]), r["hours"], strict=True) if abs(h - hours) < 1e-3
    ]
    assert "VTL_UNK" in there  # unknown category: kept, at its time
    assert "VTL_sbp" in there  # missing value: category token, no bin


def test_tokenize_refuses_mismatched_tokenizer(demo_tokens, tmp_path, demo_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_tokens, copy)
    other = tmp_path / "other.json"
    assert (
        main(
            ["tokenizer", "fit", "--data", str(demo_dir), "--out", str(other), "tokenizer.n_bins=4"]
        )
        == 0
    )
    shutil.copy(other, copy / "tokenizer.json")
    with pytest.raises(FedclifError, match="was made with tokenizer"):
        read_timelines(copy)


def test_split_mode_timelines(demo_dir, site_cfg, tok_cfg, tmp_path):
    tok_cfg.fused = False
    tl, tok = _tokenize(demo_dir, site_cfg, tok_cfg, tmp_path / "split")
    toks = tok.decode(tl.filter(pl.col("hospitalization_id") == "25563031")["tokens"][0].to_list())
    i = toks.index("VTL_weight_kg")
    assert toks[i + 1] == "Q2"


def test_inspect_shows_the_input_window_or_with_full_the_whole_stay(demo_tokens, capsys):
    tl, _ = read_timelines(demo_tokens)
    r = tl.filter(pl.col("hospitalization_id") == "25563031").row(0, named=True)
    shown = {}
    for flag in ([], ["--full"]):
        assert main(["site", "inspect", str(demo_tokens), "--id", "25563031", *flag]) == 0
        text = capsys.readouterr().out
        rows = [line.split("│") for line in text.splitlines() if line.count("│") >= 4]
        shown[bool(flag)] = [float(x[2]) for x in rows if x[1].strip().isdigit()]
    assert len(shown[False]) == r["n_tokens_24h"] and max(shown[False]) < 24
    assert len(shown[True]) == r["n_tokens"] and max(shown[True]) > 24


def test_inspect_unknown_stay(demo_tokens, capsys):
    assert main(["site", "inspect", str(demo_tokens), "--id", "nope"]) == 1
    assert "no stay 'nope'" in capsys.readouterr().err


@pytest.mark.slow  # the installed console script, its own process
def test_console_script_quickstart(tmp_path):
    import subprocess

    r = subprocess.run(
        ["fedclif", "quickstart", "--out", str(tmp_path / "qs")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "site usable: 272 stays" in r.stdout
    assert (tmp_path / "qs" / "tokens" / "timelines.parquet").is_file()
    assert "label same_admission_death │ 16" in r.stdout


def test_chunked_tokenization_matches_one_pass(demo_dir, demo_tokens, site_cfg, tmp_path):
    from fedclif.shared.tokens.tokenizer import Tokenizer

    site_cfg.chunk_stays = 50
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    done = []
    manifest = tokenize_site(
        load_site(demo_dir, site_cfg),
        tok,
        tmp_path / "c",
        on_chunk=lambda d, n: done.append((d, n)),
    )
    assert done == [(50, 272), (100, 272), (150, 272), (200, 272), (250, 272), (272, 272)]
    a, _ = read_timelines(demo_tokens)
    b, _ = read_timelines(tmp_path / "c")
    assert a.equals(b)
    assert manifest == json.loads((demo_tokens / "manifest.json").read_text())


def test_splits_are_by_patient_stable_and_nested_by_train_fraction():
    """Every stay of a patient lands in one split, whatever the order or the other
    patients; the shares follow the config; `train_fraction` keeps a subset of the train
    patients (nested: 5% holds 1%) and never touches val or test."""
    rng = np.random.default_rng(0)
    patients = rng.integers(0, 3000, 12000).astype(str)  # ~4 stays per patient
    cfg = OmegaConf.create({"val": 0.1, "test": 0.2, "salt": "fedclif"})
    split = assign_splits(patients, cfg)
    per_patient = (
        pl.DataFrame({"p": patients, "s": split}).group_by("p").agg(pl.col("s").n_unique())
    )
    assert per_patient.get_column("s").max() == 1
    order = rng.permutation(patients.size)
    assert np.array_equal(assign_splits(patients[order], cfg), split[order])
    assert np.array_equal(assign_splits(patients[:100], cfg), split[:100])
    shares = {s: np.unique(patients[split == s]).size / np.unique(patients).size for s in SPLITS}
    assert shares == pytest.approx({"train": 0.7, "val": 0.1, "test": 0.2}, abs=0.03)
    kept = {}
    for f in (0.01, 0.05, 0.25, 1.0):
        s = assign_splits(patients, OmegaConf.merge(cfg, {"train_fraction": f}))
        assert np.array_equal(s == "test", split == "test")
        assert np.array_equal(s == "val", split == "val")
        assert set(s[split == "train"]) <= {"train", "unused"}
        kept[f] = set(patients[s == "train"])
        assert len(kept[f]) / len(set(patients[split == "train"])) == pytest.approx(f, abs=0.03)
    assert kept[0.01] <= kept[0.05] <= kept[0.25] <= kept[1.0]
    with pytest.raises(FedclifError, match="train_fraction"):
        assign_splits(patients, OmegaConf.merge(cfg, {"train_fraction": 0.0}))


def test_state_changes_are_tokenized_once_and_pre_admission_events_sit_at_admission(
    site_dir, demo_dir, site_cfg, tok_cfg, tmp_path
):
    """A device charted four times is one token (the demo's stay 25563031 on nasal
    cannula); a change in between adds one token per change, read off the rows' run
    lengths. A vital 3 h before admission (the ED) sits at hour 0; one 30 h before is
    not part of the stay."""
    sid = "25563031"
    base, tok = _tokenize(demo_dir, site_cfg, tok_cfg, tmp_path / "base")

    def decoded(tl) -> list[tuple[str, float]]:
        r = tl.filter(pl.col("hospitalization_id") == sid).row(0, named=True)
        return list(zip(tok.decode(r["tokens"]), r["hours"], strict=True))

    rs = read(site_dir, "respiratory_support")
    mine = rs.filter(pl.col("hospitalization_id") == sid).sort("recorded_dttm")
    assert mine["device_category"].to_list() == ["Nasal Cannula"] * 4
    assert [t for t, _ in decoded(base)].count("RESP_device_Nasal Cannula") == 1
    devices = ["Nasal Cannula", "Nasal Cannula", "IMV", "Nasal Cannula"]
    changed = mine.with_columns(pl.Series("device_category", devices))
    write(
        site_dir,
        "respiratory_support",
        pl.concat([rs.filter(pl.col("hospitalization_id") != sid), changed]),
    )
    adm = read(demo_dir, "hospitalization").filter(pl.col("hospitalization_id") == sid)
    adm = adm["admission_dttm"][0]
    v = read(site_dir, "vitals")
    hr = v.filter(
        (pl.col("hospitalization_id") == sid) & (pl.col("vital_category") == "heart_rate")
    )
    early = hr.head(2).with_columns(
        pl.Series("recorded_dttm", [adm - timedelta(hours=3), adm - timedelta(hours=30)]),
        pl.Series("vital_value", [80.0, 81.0]),
    )
    write(site_dir, "vitals", pl.concat([v, early]))
    after = decoded(_tokenize(site_dir, site_cfg, tok_cfg, tmp_path / "after", tok)[0])
    runs = [d for i, d in enumerate(devices) if i == 0 or d != devices[i - 1]]
    got = [t.removeprefix("RESP_device_") for t, _ in after if t.startswith("RESP_device_")]
    assert got == runs == ["Nasal Cannula", "IMV", "Nasal Cannula"]
    hr_tokens = [(t, h) for t, h in after if t.startswith("VTL_heart_rate")]
    before = [(t, h) for t, h in decoded(base) if t.startswith("VTL_heart_rate")]
    assert len(hr_tokens) == len(before) + 1  # the ED reading; the one 30 h out is not
    assert min(h for _, h in before) > 0 and min(h for _, h in hr_tokens) == 0.0
    assert all(h >= 0 for _, h in after)


def test_the_time_series_view_is_hourly_means_normalised_by_the_federated_cuts(
    demo_dir, demo_tokens, site_cfg
):
    """`site tokenize` writes the hourly grid beside the timelines: for three hand-picked
    stays and a vital or a lab each, the value in hour h is the mean of the stay's readings
    in [h, h + 1) since admission (computed here from the site's CLIF table), centred on
    the federated median cut and scaled by the outer cuts' spread; an hour without a
    reading is missing (mask False, value 0), not imputed."""
    tok = Tokenizer.load(demo_tokens / "tokenizer.json")
    site = load_site(demo_dir, site_cfg)
    names = variables(tok)
    assert {"LAB_creatinine", "LAB_lactate"} <= set(names)
    picked = [  # stay, table, time column, category column, category, value column
        ("25563031", "vitals", "recorded_dttm", "vital_category", "heart_rate", "vital_value"),
        ("22987108", "vitals", "recorded_dttm", "vital_category", "sbp", "vital_value"),
        ("28258130", "labs", "lab_result_dttm", "lab_category", "creatinine", "lab_value_numeric"),
    ]
    for sid, table, time, cat, name, value in picked:
        adm = site.tables["hospitalization"].filter(pl.col("hospitalization_id") == sid)
        start, end = adm["admission_dttm"][0], adm["discharge_dttm"][0]
        raw = (
            site.tables[table]
            .filter((pl.col("hospitalization_id") == sid) & (pl.col(cat) == name))
            .drop_nulls(value)
            .filter((pl.col(time) >= start - timedelta(hours=24)) & (pl.col(time) <= end))
            .with_columns(
                ((pl.col(time) - start).dt.total_seconds() // 3600)
                .clip(lower_bound=0)
                .cast(pl.Int64)
                .alias("hour")
            )
            .group_by("hour")
            .agg(pl.col(value).mean())
            .sort("hour")
        )
        code = f"{'VTL' if table == 'vitals' else 'LAB'}_{name}"
        cuts = tok.cuts[code]  # deciles: 10% ... 90%
        loc, scale = cuts[4], (cuts[8] - cuts[0]) / (2 * 1.2815516)
        hours = int(raw["hour"].max()) + 1
        values, mask = read_grid(demo_tokens, [sid], hours, tok)
        col = names.index(code)
        want = dict(zip(raw["hour"].to_list(), raw[value].to_list(), strict=True))
        assert len(want) >= 3 and set(np.flatnonzero(mask[0, :, col])) == set(want), sid
        for h, v in want.items():
            assert values[0, h, col] == pytest.approx((v - loc) / scale, abs=1e-4), (sid, h)
        empty = [h for h in range(hours) if h not in want]
        assert empty and not mask[0, empty, col].any() and not values[0, empty, col].any()
    manifest = json.loads((demo_tokens / "manifest.json").read_text())
    assert manifest["timeseries_variables"] == names


def test_timelines_do_not_depend_on_the_order_of_table_rows(site_dir, demo_tokens, tmp_path):
    """The same tables with their rows in reverse order tokenize to the same timelines
    (readings of one code at one time are ordered by value, not by row)."""
    for table in ("vitals", "labs", "medication_admin_continuous", "patient_assessments"):
        f = site_dir / f"clif_{table}.parquet"
        pl.read_parquet(f).reverse().write_parquet(f)
    out = run_tokenize(site_dir, demo_tokens / "tokenizer.json", tmp_path / "out")
    cols = ["hospitalization_id", "tokens", "hours", "tokens_24h"]
    a = pl.read_parquet(demo_tokens / "timelines.parquet", columns=cols).sort("hospitalization_id")
    b = pl.read_parquet(out / "timelines.parquet", columns=cols).sort("hospitalization_id")
    assert a.equals(b)
