"""The MEDS export (shared/meds/export.py): the demo as a MEDS dataset that the `meds` package's
schemas accept, holding exactly the events fedclif keeps, sharded by patient, with our
splits; and our tasks as MEDS labels that agree with labels.parquet stay by stay."""

import json
from datetime import timedelta
from pathlib import Path

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
    their windows; state changes only): static codes once per patient, and death and
    coded diagnoses at discharge on top."""
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
    want[meds.death_code] = st.filter(pl.col("discharge_category") == "Expired").height
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
        f = out / f"{task}.parquet"
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
        ("no-stay", "no column 'hospitalization_id'"),
    ],
)
def test_bad_meds_input_names_the_file_and_column(exported, tmp_path, capsys, break_it, says):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    shard = bad / "data" / "0.parquet"
    df = pl.read_parquet(shard)
    if break_it == "no-metadata":
        (bad / meds.dataset_metadata_filepath).unlink()
    elif break_it == "text-ids":
        df.with_columns(pl.format("p{}", "subject_id").alias("subject_id")).write_parquet(shard)
    elif break_it == "unsorted":
        df.reverse().write_parquet(shard)
    else:
        df.drop("hospitalization_id").write_parquet(shard)
    assert main(["site", "validate", str(bad)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert says in text, text
    if break_it != "no-metadata":
        assert "0.parquet" in text


def test_the_meds_tab_peer_input_keeps_two_sites_apart(demo_dir, exported, tmp_path, monkeypatch):
    """bench/peer_meds_tab.py's input from the demo as both source and target (the same
    ids at both): subjects renumbered apart, the source by its splits, the target all
    held out, every event and label kept, labels beside their subjects' events."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from bench.peer_meds_tab import OFFSET, SPLITS, assemble

    labels = tmp_path / "labels"
    assert main(["export", "labels", str(demo_dir), "--out", str(labels)]) == 0
    inp = assemble((exported, labels), (exported, labels), ["death"], tmp_path / "input")
    data = {s: pl.read_parquet(inp / "data" / s / "0.parquet") for s in SPLITS}
    death = {s: pl.read_parquet(inp / "labels" / "death" / s / "0.parquet") for s in SPLITS}
    assert sum(d.height for d in data.values()) == 2 * _data(exported).height
    want = pl.read_parquet(labels / "death.parquet").height
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
