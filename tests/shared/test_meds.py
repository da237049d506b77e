"""The MEDS export (shared/meds/export.py): the demo as a MEDS dataset that the `meds` package's
schemas accept, holding exactly the events fedclif keeps, sharded by patient, with our
splits; and our tasks as MEDS labels that agree with labels.parquet stay by stay."""

import json
from datetime import timedelta

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import assert_same_tokens, run_tokenize

from fedclif.cli import main
from fedclif.shared.clif.site import load_site
from fedclif.shared.config import load_config
from fedclif.shared.meds.export import NAMESPACES, STATIC
from fedclif.shared.tokens.events import stay_events, stays
from fedclif.shared.tokens.splits import assign_splits
from fedclif.shared.tokens.timelines import LABELS, TIMELINES


@pytest.fixture(scope="module")
def exported(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("meds") / "demo"
    assert main(["export", "meds", str(demo_dir), "--out", str(out)]) == 0
    return out


def _data(root) -> pl.DataFrame:
    return pl.concat(pl.read_parquet(f) for f in sorted((root / "data").glob("*.parquet")))


def test_the_export_passes_the_meds_schemas(exported):
    for f in (exported / "data").glob("*.parquet"):
        meds.DataSchema.validate(pq.read_table(f))
    meds.CodeMetadataSchema.validate(pq.read_table(exported / meds.code_metadata_filepath))
    meds.SubjectSplitSchema.validate(pq.read_table(exported / meds.subject_splits_filepath))
    dataset = json.loads((exported / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(dataset)
    assert dataset["etl_name"] == "fedclif" and dataset["meds_version"] == "0.4.1"
    data = _data(exported)
    codes = pl.read_parquet(exported / meds.code_metadata_filepath)
    assert set(data.get_column("code")) == set(codes.get_column("code"))
    assert "LAB//sodium//mmol/L" in set(codes.get_column("code"))  # the site's unit


def test_the_export_holds_the_events_fedclif_keeps(demo_dir, exported):
    """Rows per namespace equal fedclif's own event stream (every stay, short ones too;
    their windows; state changes only): static codes once per patient, coded diagnoses at
    discharge and each patient's death on top (the demo records no birth dates)."""
    site = load_site(demo_dir, load_config("site"))
    st = stays(site, min_hours=0.0)
    ev = stay_events(site, st).collect()
    prefix = ev.get_column("code").str.extract(r"^(RESP_device|RESP_mode|MEDC_stop|[^_]+)")
    space = dict(NAMESPACES)
    want: dict[str, int] = {}
    for p, n in prefix.value_counts().iter_rows():
        name = "AGE" if p == "AGE" else space[p].split("//")[0]
        want[name] = want.get(name, 0) + (
            st.get_column("patient_id").n_unique() if p in STATIC else n
        )
    dx = site.tables["hospital_diagnosis"].join(
        st.select("hospitalization_id"), on="hospitalization_id"
    )
    want["DIAGNOSIS"] = dx.drop_nulls("diagnosis_code").unique().height
    # One death a patient: at death_dttm (36 demo patients, 19 of them dying after their
    # discharge), else at the discharge of a stay that ended Expired.
    patient = site.tables["patient"].join(st.select("patient_id").unique(), on="patient_id")
    expired = st.filter(pl.col("discharge_category") == "Expired").get_column("patient_id")
    dead = patient.filter(pl.col("death_dttm").is_not_null() | pl.col("patient_id").is_in(expired))
    want[meds.death_code] = dead.height
    assert dead.height > expired.n_unique() > 0
    data = _data(exported)
    got = data.get_column("code").str.split("//").list.first().value_counts()
    assert dict(got.iter_rows()) == want
    # Every stay's admission and discharge, at its times, naive UTC.
    adm = data.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//"))
    times = st.select("hospitalization_id", pl.col("admission_dttm").dt.replace_time_zone(None))
    joined = adm.join(times, on="hospitalization_id")
    assert joined.height == st.height and (joined["time"] == joined["admission_dttm"]).all()
    # Subjects sorted by time within a shard; static rows first.
    for f in (exported / "data").glob("*.parquet"):
        d = pl.read_parquet(f)
        assert d.equals(d.sort("subject_id", "time", nulls_last=False, maintain_order=True))


def test_subject_splits_are_ours_and_a_patient_lives_in_one_shard(demo_dir, tmp_path, exported):
    splits = pl.read_parquet(exported / meds.subject_splits_filepath)
    patients = splits.get_column("subject_id").cast(pl.String).to_numpy()
    ours = assign_splits(patients, load_config("train").split)
    rename = {"train": "train", "val": "tuning", "test": "held_out"}
    assert splits.get_column("split").to_list() == [rename[x] for x in ours]
    # Small shards: whole patients each, the same rows as one shard.
    small = tmp_path / "small"
    assert main(["export", "meds", str(demo_dir), "--out", str(small), "site.chunk_stays=30"]) == 0
    shards = sorted((small / "data").glob("*.parquet"))
    assert len(shards) > 5
    seen: set[int] = set()
    for f in shards:
        ids = set(pl.read_parquet(f, columns=["subject_id"]).get_column("subject_id"))
        assert not ids & seen
        seen |= ids
    key = ["subject_id", "time", "code", "numeric_value", "hospitalization_id"]
    a, b = _data(exported).sort(key, nulls_last=False), _data(small).sort(key, nulls_last=False)
    assert a.equals(b)


def test_labels_agree_with_labels_parquet_stay_by_stay(demo_dir, demo_tokens, tmp_path):
    out = tmp_path / "labels"
    assert main(["export", "labels", str(demo_dir), "--out", str(out)]) == 0
    ours = pl.read_parquet(demo_tokens / LABELS)
    tl = pl.read_parquet(
        demo_tokens / "timelines.parquet",
        columns=["hospitalization_id", "patient_id", "admission_dttm"],
    )
    for task, label, flag in [
        ("death", "same_admission_death", None),
        ("long_los", "long_length_of_stay", None),
        ("icu", "icu_admission", "icu_admission_24h"),
        ("imv", "imv_event", "imv_event_24h"),
        ("readmission", "readmission_30d", None),
    ]:
        f = out / task / "0.parquet"  # one folder per task, as MEDS tools read labels
        meds.LabelSchema.validate(pq.read_table(f))
        got = pl.read_parquet(f)
        want = ours.filter(pl.col(label).is_not_null())
        if flag:  # the 24 h rule: already in the input window, not a label
            want = want.filter(~pl.col(flag).fill_null(False))
        assert got.height == want.height > 0, task
        # A stay is its subject and prediction time (the label schema has no stay column).
        keyed = want.join(tl, on="hospitalization_id").with_columns(
            pl.col("patient_id").cast(pl.Int64).alias("subject_id"),
            (pl.col("admission_dttm").dt.replace_time_zone(None) + timedelta(hours=24))
            .dt.cast_time_unit("us")
            .alias("prediction_time"),
        )
        both = got.join(keyed, on=["subject_id", "prediction_time"])
        assert both.height == want.height
        assert (both["boolean_value"] == both[label]).all(), task


def test_an_export_never_mixes_with_old_files_and_bad_tasks_are_named(demo_dir, exported, capsys):
    assert main(["export", "meds", str(demo_dir), "--out", str(exported)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "labels",
                str(demo_dir),
                "--out",
                str(exported.parent / "x"),
                "--tasks",
                "death,sepsis",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "unknown task 'sepsis'" in err and "long_los" in err


def test_a_meds_site_tokenizes_to_the_timelines_of_its_clif_source(exported, demo_tokens, tmp_path):
    """The demo's MEDS export, given to `site tokenize` in place of its CLIF directory,
    gives the same timelines, labels and hourly grid with the same tokenizer."""
    out = run_tokenize(exported, demo_tokens / "tokenizer.json", tmp_path / "tokens")
    assert pl.read_parquet(out / TIMELINES).height == 272
    assert_same_tokens(demo_tokens, out)


@pytest.mark.parametrize(
    "break_it, says",
    [
        ("no-metadata", "metadata/dataset.json: missing"),
        ("text-ids", "subject_id"),
        ("unsorted", "column 'time' out of order"),
        ("apart", "has rows apart (again at row"),
        ("no-code", "no column 'code'"),
        ("hadm_id", "no column 'hadm_id' (site.meds.stay_column)"),
        ("no-stays", "no stays: no column 'hospitalization_id'"),
    ],
)
def test_bad_meds_input_names_the_file_and_column(exported, tmp_path, capsys, break_it, says):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    shard = bad / "data" / "0.parquet"
    df = pl.read_parquet(shard)
    overrides = []
    if break_it == "no-metadata":
        (bad / meds.dataset_metadata_filepath).unlink()
    elif break_it == "text-ids":
        df.with_columns(pl.format("p{}", "subject_id").alias("subject_id")).write_parquet(shard)
    elif break_it == "unsorted":
        df.reverse().write_parquet(shard)
    elif break_it == "apart":  # the first subject's last row moved to the end
        first = df.get_column("subject_id")[0]
        last = df.with_row_index().filter(pl.col("subject_id") == first).get_column("index")[-1]
        df.filter(pl.int_range(pl.len()) != last).vstack(df[last]).write_parquet(shard)
        says = f"subject {first} has rows apart (again at row {df.height - 1})"
    elif break_it == "no-code":
        df.drop("code").write_parquet(shard)
    elif break_it == "hadm_id":
        overrides = ["site.meds.stay_column=hadm_id"]
    else:  # no stay column, and no admission codes to open stays with
        df.drop("hospitalization_id").filter(
            ~pl.col("code").str.starts_with("HOSPITAL_ADMISSION")
        ).write_parquet(shard)
    assert main(["site", "validate", str(bad), *overrides]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert says in text, text
    assert "MEDS dataset" in text and "read and checked" not in text
    if break_it not in ("no-metadata", "hadm_id", "no-stays"):
        assert "0.parquet" in text


def test_everything_a_meds_dataset_lacks_is_listed_at_once(exported, tmp_path, capsys):
    """No metadata, no vitals and no labs: one validation names all three, in MEDS terms
    (which codes, which setting), with the codes it could not read and their rows."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    (bad / meds.code_metadata_filepath).unlink()
    shard = bad / "data" / "0.parquet"
    df = pl.read_parquet(shard)
    df.with_columns(
        pl.col("code").str.replace(r"^(VITAL|LAB)//", "${1}_X//").alias("code")
    ).write_parquet(shard)
    assert main(["site", "validate", str(bad), "--json", str(tmp_path / "r.json")]) == 1
    text = " ".join(capsys.readouterr().out.split())
    for says in (
        "metadata/codes.parquet: missing",
        "no events for CLIF table vitals: codes VITAL//<vital_category>",
        "no events for CLIF table labs: codes LAB//<lab_category>[//<unit>]",
        "codes fedclif does not read (map them in site.meds.code_map",
        "VITAL_X//map (",
    ):
        assert says in text, (says, text)
    assert "no events for CLIF table adt" not in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["source"] == "meds" and not report["usable"]
    assert len(report["tables"]["site"]["problems"]) == 4


def test_the_meds_tab_peer_input_keeps_two_sites_apart(demo_dir, exported, tmp_path, bench):
    """bench/peer_meds_tab.py's input from the demo as both source and target (the same
    ids at both): subjects renumbered apart, the source by its splits, the target all
    held out, every event and label kept, labels beside their subjects' events."""
    peer = bench("peer_meds_tab")
    OFFSET, SPLITS = peer.OFFSET, peer.SPLITS

    labels = tmp_path / "labels"
    assert main(["export", "labels", str(demo_dir), "--out", str(labels)]) == 0
    inp = peer.assemble((exported, labels), (exported, labels), ["death"], tmp_path / "input")
    data = {s: pl.read_parquet(inp / "data" / s / "0.parquet") for s in SPLITS}
    death = {s: pl.read_parquet(inp / "labels" / "death" / s / "0.parquet") for s in SPLITS}
    assert sum(d.height for d in data.values()) == 2 * _data(exported).height
    want = pl.read_parquet(labels / "death" / "0.parquet").height
    assert sum(d.height for d in death.values()) == 2 * want
    splits = pl.read_parquet(exported / meds.subject_splits_filepath)
    for s in SPLITS:
        ids = data[s]["subject_id"]
        source, target = ids.filter(ids < OFFSET), ids.filter(ids >= OFFSET)
        assert source.n_unique() == splits.filter(pl.col("split") == s).height
        assert target.n_unique() == (splits.height if s == "held_out" else 0)
        assert death[s]["subject_id"].is_in(ids.unique().implode()).all()
        meds.DataSchema.validate(pq.read_table(inp / "data" / s / "0.parquet"))
        meds.LabelSchema.validate(pq.read_table(inp / "labels" / "death" / s / "0.parquet"))
        assert data[s].equals(data[s].sort("subject_id", "time"))


def test_another_tools_edits_to_the_values_win_over_our_exact_column(exported, tmp_path):
    """A round trip through another tool (MEDS-Transforms' outlier occlusion blanks
    `numeric_value`, a unit conversion rescales it): fedclif reads the edit, and its own
    float64 reading only where it still agrees."""
    import shutil

    from fedclif.shared.meds.read import EXACT, read_meds

    ds = tmp_path / "edited"
    shutil.copytree(exported, ds)
    shard = ds / "data" / "0.parquet"
    df = pl.read_parquet(shard).with_row_index("row")
    hr = df.filter(pl.col("code") == "VITAL//heart_rate").get_column("row")
    blanked, doubled = hr[:50], hr[50:100]
    df.with_columns(
        pl.when(pl.col("row").is_in(blanked.implode()))
        .then(None)
        .when(pl.col("row").is_in(doubled.implode()))
        .then(pl.col("numeric_value") * 2)
        .otherwise("numeric_value")
        .alias("numeric_value")
    ).write_parquet(shard)
    got = read_meds(ds, load_config("site").meds).events
    by_row = dict(zip(got.get_column("row"), got.get_column("value"), strict=True))
    exact = dict(zip(df.get_column("row"), df.get_column(EXACT), strict=True))
    assert all(by_row[r] is None for r in blanked if r in by_row)
    assert all(by_row[r] == pytest.approx(2 * exact[r], rel=1e-6) for r in doubled if r in by_row)
    untouched = hr[100:]
    assert all(by_row[r] == exact[r] for r in untouched if r in by_row)  # bit for bit
    assert sum(r in by_row for r in blanked) > 40


def test_births_deaths_and_unknown_outcomes_are_written_as_meds_tools_expect(tmp_path):
    """A synthetic site (birth dates, deaths after discharge, discharges of unknown
    outcome): MEDS_BIRTH at each birth date, one MEDS_DEATH a patient at death_dttm, and
    an unknown outcome as HOSPITAL_DISCHARGE//Missing, which reads back as unknown."""
    from fedclif.shared.meds.export import subject_ids
    from fedclif.shared.meds.read import read_meds
    from fedclif.shared.meds.tables import write_clif
    from fedclif.shared.tokens.labels import outcome_labels
    from fedclif.simulations.synth import load_preset, write_site

    clif = tmp_path / "clif"
    write_site(load_preset("mimic-like"), 300, 5, clif)
    h = pl.read_parquet(clif / "clif_hospitalization.parquet")
    unknown = h.get_column("hospitalization_id")[:20]  # the site does not know how they ended
    h.with_columns(
        pl.when(pl.col("hospitalization_id").is_in(unknown.implode()))
        .then(None)
        .otherwise("discharge_category")
        .alias("discharge_category")
    ).write_parquet(clif / "clif_hospitalization.parquet")
    out = tmp_path / "meds"
    assert main(["export", "meds", str(clif), "--out", str(out)]) == 0
    data = _data(out)
    site = load_site(clif, load_config("site"))
    st = stays(site, min_hours=0.0)
    patient = site.tables["patient"].join(st.select("patient_id").unique(), on="patient_id")
    births = data.filter(pl.col("code") == meds.birth_code)
    assert births.height == patient.get_column("birth_date").is_not_null().sum() > 0
    deaths = data.filter(pl.col("code") == meds.death_code)
    assert deaths.get_column("subject_id").is_unique().all()
    died = patient.drop_nulls("death_dttm")
    died = died.select(
        subject_ids(died.get_column("patient_id")).alias("subject_id"),
        pl.col("death_dttm").dt.replace_time_zone(None).alias("time"),
    )
    assert died.height > 0 and died.join(deaths, on=["subject_id", "time"]).height == died.height
    missing = data.filter(pl.col("code") == "HOSPITAL_DISCHARGE//Missing")
    assert set(unknown) <= set(missing.get_column("hospitalization_id"))
    # Read back, the unknown outcomes are unknown again (not "not dead").
    back = load_site(
        write_clif(read_meds(out, load_config("site").meds), tmp_path / "b"), load_config("site")
    )
    labels = outcome_labels(back, stays(back)).join(
        pl.DataFrame({"hospitalization_id": unknown}), on="hospitalization_id"
    )
    assert (
        labels.height > 0
        and labels.get_column("same_admission_death").null_count() == labels.height
    )
