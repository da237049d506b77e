"""`fedclif site validate`: every bad-input class gives a clear message and the right exit."""

import json

import polars as pl
import pytest
from conftest import read, write

from fedclif.cli import main
from fedclif.shared.clif.site import load_site, read_site


def run(capsys, *args) -> tuple[int, str]:
    code = main(["site", "validate", *map(str, args)])
    cap = capsys.readouterr()
    return code, " ".join((cap.out + cap.err).split())


def kinds(report, severity):
    return {(p.table, p.column, p.kind) for p in report.problems if p.severity == severity}


def test_demo_is_usable(demo_dir, capsys, tmp_path):
    code, text = run(capsys, demo_dir, "--json", tmp_path / "r.json")
    assert code == 0, text
    assert "site usable: 272 stays" in text
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["usable"] and report["usable_stays"] == 272
    assert report["tables"]["vitals"]["rows"] == 94261
    assert report["tables"]["vitals"]["hospitalizations"] == 134


def test_demo_data_drops_index_column(demo_dir):
    for f in demo_dir.glob("clif_*.parquet"):
        assert not any(c.startswith("__index_level_") for c in pl.read_parquet(f).columns), f


def test_missing_directory(tmp_path, capsys):
    code, text = run(capsys, tmp_path / "nope")
    assert code == 1
    assert "does not exist" in text and "Traceback" not in text


def test_missing_required_table(site_dir, capsys):
    (site_dir / "clif_labs.parquet").unlink()
    code, text = run(capsys, site_dir)
    assert code == 1
    assert "required table 'labs' not found" in text and "clif_labs.parquet" in text


def test_missing_optional_table_is_fine(site_dir, capsys):
    (site_dir / "clif_position.parquet").unlink()
    assert run(capsys, site_dir)[0] == 0


def test_corrupt_parquet(site_dir, capsys):
    (site_dir / "clif_vitals.parquet").write_bytes(b"PAR1 this is not parquet")
    code, text = run(capsys, site_dir)
    assert code == 1
    assert "clif_vitals.parquet" in text and "cannot read parquet" in text
    assert "Traceback" not in text


def test_empty_required_table(site_dir, capsys):
    write(site_dir, "adt", read(site_dir, "adt").head(0))
    code, text = run(capsys, site_dir)
    assert code == 1 and "clif_adt.parquet" in text and "no rows" in text


def test_empty_optional_table_is_a_warning(site_dir, site_cfg):
    write(site_dir, "position", read(site_dir, "position").head(0))
    site = read_site(site_dir, site_cfg)
    assert not site.report.fatal
    assert ("position", None, "empty") in kinds(site.report, "warning")
    assert not site.has("position")


def test_missing_column_names_file_column_and_type(site_dir, capsys):
    write(site_dir, "vitals", read(site_dir, "vitals").drop("vital_value"))
    code, text = run(capsys, site_dir)
    assert code == 1
    assert "clif_vitals.parquet column 'vital_value'" in text and "(DOUBLE) is missing" in text


def test_wrong_type_is_fatal(site_dir, capsys):
    h = read(site_dir, "hospitalization")
    write(
        site_dir,
        "hospitalization",
        h.with_columns(pl.col("admission_dttm").dt.to_string("%Y-%m-%d %H:%M")),
    )
    code, text = run(capsys, site_dir)
    assert code == 1
    assert "column 'admission_dttm' has type String, expected DATETIME" in text


def test_integer_ids_are_accepted(site_dir, site_cfg):
    v = read(site_dir, "vitals")
    write(site_dir, "vitals", v.with_columns(pl.col("hospitalization_id").cast(pl.Int64)))
    site = load_site(site_dir, site_cfg)
    assert site.tables["vitals"].schema["hospitalization_id"] == pl.String
    assert site.tables["vitals"].height == v.height


def test_duplicate_hospitalization_ids_are_fatal(site_dir, capsys):
    h = read(site_dir, "hospitalization")
    write(site_dir, "hospitalization", pl.concat([h, h.head(2)]))
    code, text = run(capsys, site_dir)
    assert code == 1
    assert "'hospitalization_id' must be unique" in text and "2 ids appear more than once" in text


def test_timezone_naive_timestamps_are_localised(site_dir, site_cfg):
    v = read(site_dir, "vitals")
    write(site_dir, "vitals", v.with_columns(pl.col("recorded_dttm").dt.replace_time_zone(None)))
    cfg = site_cfg.copy()
    cfg.timezone = "America/Chicago"
    site = load_site(site_dir, cfg)
    assert ("vitals", "recorded_dttm", "timezone-naive") in kinds(site.report, "warning")
    got = site.tables["vitals"].get_column("recorded_dttm")
    assert str(got.dtype.time_zone) == "UTC"
    # 00:00 in Chicago is 05:00 or 06:00 UTC: the shift proves the zone was applied.
    shift = (got - v.get_column("recorded_dttm")).dt.total_hours().unique().to_list()
    assert set(shift) <= {5, 6} and shift


def test_dirty_but_usable_rows_are_reported_and_cleaned(site_dir, site_cfg):
    v = read(site_dir, "vitals")
    bad = v.head(5).with_columns(
        ("ghost-" + pl.col("hospitalization_id")).alias("hospitalization_id")
    )
    v = pl.concat([v, bad]).with_columns(
        pl.when(pl.int_range(pl.len()) < 3)
        .then(float("nan"))
        .when(pl.int_range(pl.len()) == 3)
        .then(float("inf"))
        .otherwise(pl.col("vital_value"))
        .alias("vital_value"),
        pl.when(pl.int_range(pl.len()) == 4)
        .then(pl.lit("SBP"))
        .when(pl.int_range(pl.len()) == 5)
        .then(pl.lit("Heart Rate"))
        .when(pl.int_range(pl.len()) == 6)
        .then(pl.lit("pain_score"))
        .otherwise(pl.col("vital_category"))
        .alias("vital_category"),
    )
    write(site_dir, "vitals", v)
    h = read(site_dir, "hospitalization")
    h = h.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(-3)
        .otherwise(pl.col("age_at_admission"))
        .alias("age_at_admission"),
        pl.when(pl.int_range(pl.len()) == 1)
        .then(pl.col("admission_dttm") - pl.duration(days=1))
        .otherwise(pl.col("discharge_dttm"))
        .alias("discharge_dttm"),
    )
    write(site_dir, "hospitalization", h)
    site = load_site(site_dir, site_cfg)
    warnings = {(p.table, p.column, p.kind): p for p in site.report.warnings}
    assert warnings[("vitals", "hospitalization_id", "orphan")].count == 5
    assert warnings[("vitals", "vital_value", "nan")].count == 4
    assert warnings[("vitals", "vital_category", "category-spelling")].count == 2
    assert warnings[("vitals", "vital_category", "unknown-category")].count == 1
    assert warnings[("hospitalization", "age_at_admission", "impossible")].count == 1
    assert warnings[("hospitalization", "discharge_dttm", "impossible")].count == 1
    vit = site.tables["vitals"]
    assert not vit.get_column("hospitalization_id").str.starts_with("ghost-").any()
    assert vit.get_column("vital_value").is_nan().sum() == 0
    written = read(site_dir, "vitals").filter(~pl.col("hospitalization_id").str.starts_with("g"))
    assert (
        vit.filter(pl.col("vital_category") == "sbp").height
        == written.filter(pl.col("vital_category") == "sbp").height + 1
    )  # the "SBP" row
    assert site.tables["hospitalization"].height == h.height - 1
    assert site.tables["hospitalization"].get_column("age_at_admission").null_count() == 1


def test_mostly_orphaned_table_is_fatal(site_dir, capsys):
    labs = read(site_dir, "labs")
    write(site_dir, "labs", labs.with_columns(pl.lit("nobody").alias("hospitalization_id")))
    code, text = run(capsys, site_dir)
    assert code == 1
    assert "clif_labs.parquet column 'hospitalization_id'" in text
    assert "more than 50% of rows" in text


def test_no_usable_stay_is_fatal(site_dir, capsys):
    h = read(site_dir, "hospitalization")
    write(
        site_dir,
        "hospitalization",
        h.with_columns((pl.col("admission_dttm") + pl.duration(hours=2)).alias("discharge_dttm")),
    )
    code, text = run(capsys, site_dir)
    assert code == 1 and "no hospitalization lasts at least 24 h" in text


@pytest.mark.parametrize("junk", [b"", b"\x00" * 100, b"PAR1"])
def test_no_traceback_for_junk_files(site_dir, capsys, junk):
    (site_dir / "clif_patient.parquet").write_bytes(junk)
    code, text = run(capsys, site_dir)
    assert code == 1 and "clif_patient.parquet" in text and "Traceback" not in text


def test_bad_override_is_a_clear_error(demo_dir, capsys):
    code, text = run(capsys, demo_dir, "site.no_such_key=1")
    assert code == 1 and "no_such_key" in text and "known keys" in text
    code, text = run(capsys, demo_dir, "timezone=UTC")
    assert code == 1 and "must start with one of" in text
