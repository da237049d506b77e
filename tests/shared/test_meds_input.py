"""Any MEDS dataset as a site (shared/meds/read.py, shared/meds/codemap.py): data built by
`meds-testing-helpers`' own generator (random `static//`/`dynamic//` codes, birth and
death, no stays and no CLIF names) becomes a tokenized site in one command from the
dataset and a code map the site owns; what it lacks is listed at once; valid MEDS that
is unlike fedclif's own export is accepted."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
from meds_testing_helpers import dataset_generator as mth
from meds_testing_helpers import rvs

from fedclif.cli import main

# The generated codes' meaning at this site: stays open at dynamic//0 and close at
# dynamic//1; dynamic//6 and //7 stay unmapped (counted as dropped). The generator's
# values are standard normal: the map puts heart rate and sodium in their units.
CODE_MAP = """code,table,category,unit,scale,offset
dynamic//0,hospitalization.admission_type_category,ed,
dynamic//1,hospitalization.discharge_category,Home,
dynamic//2,vitals,heart_rate,,10,80
dynamic//3,labs,sodium,mmol/L,3,140
dynamic//4,adt,icu,
dynamic//5,adt,ward,
static//0,patient.sex_category,Female,
static//1,patient.sex_category,Male,
"""


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """200 subjects from meds-testing-helpers' generator: events every ~3 h, 30-90 a
    subject, 8 dynamic codes with values, 2 static ones, births, 30% deaths."""
    days = [np.datetime64(f"19{y}-01-01", "us") for y in (50, 60, 70)]
    gen = mth.MEDSDataDFGenerator(
        birth_datetime_per_subject=rvs.DatetimeGenerator(days),
        start_data_datetime_per_subject=rvs.DatetimeGenerator([np.datetime64("2020-01-01", "us")]),
        time_between_birth_and_data_per_subject=rvs.PositiveTimeDeltaGenerator(
            [np.timedelta64(50 * 365, "D"), np.timedelta64(60 * 365, "D")]
        ),
        time_between_data_and_death_per_subject=rvs.PositiveTimeDeltaGenerator(
            [np.timedelta64(2, "h")]
        ),
        time_between_data_events_per_subject=rvs.PositiveTimeDeltaGenerator(
            [np.timedelta64(3, "h")]
        ),
        num_events_per_subject=rvs.PositiveIntGenerator(list(range(30, 91))),
        num_measurements_per_event=rvs.PositiveIntGenerator([1, 2, 3]),
        num_static_measurements_per_subject=rvs.PositiveIntGenerator([1]),
        frac_dynamic_code_occurrences_with_value=rvs.ProportionGenerator([1.0]),
        frac_static_code_occurrences_with_value=rvs.ProportionGenerator([0.0]),
        static_vocab_size=2,
        dynamic_vocab_size=8,
        frac_subjects_with_death=0.3,
        frac_subjects_with_birth=1.0,
    )
    root = tmp_path_factory.mktemp("mth") / "dataset"
    mth.MEDSDatasetGenerator(data_generator=gen, shard_size=50).sample(
        200, np.random.default_rng(0)
    ).write(root)
    code_map = root.parent / "map.csv"
    code_map.write_text(CODE_MAP)
    return root, code_map


def _copy(src, dst, edit):
    """A copy of dataset `src` with every shard edited by `edit(frame)`."""
    shutil.copytree(src, dst)
    for f in sorted((dst / "data").rglob("*.parquet")):
        edit(pl.read_parquet(f)).write_parquet(f)
    return dst


def test_a_generated_dataset_and_a_code_map_make_a_tokenized_site(generated, tmp_path, capsys):
    root, code_map = generated
    out = tmp_path / "site"
    args = ["quickstart", "--site", str(root), "--out", str(out)]
    assert main([*args, f"site.meds.code_map={code_map}"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"MEDS dataset {root}" in text and "MEDS codes by namespace" in text
    timelines = pl.read_parquet(out / "tokens" / "timelines.parquet")
    assert timelines.height > 50
    # The mapped codes are tokens: heart rate, sodium, the ICU, sex (not the UNK tokens).
    vocab = json.loads((out / "tokenizer.json").read_text())["vocab"]
    for code in ("VTL_heart_rate", "LAB_sodium", "XFR-IN_icu", "SEX_Female"):
        assert any(v.startswith(code) for v in vocab), code


def test_codes_are_surveyed_and_a_starting_map_is_written(generated, tmp_path, capsys):
    root, code_map = generated
    start = tmp_path / "start.csv"
    assert main(["site", "meds-codes", str(root), "--out", str(start)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "dynamic//0" in text and "dropped" in text and "wrote" in text
    rows = pl.read_csv(start)
    assert rows.columns == ["code", "table", "category", "unit", "scale", "offset"]
    assert set(rows.get_column("table")) == {"drop"} and rows.height == 10  # 8 dynamic, 2 static
    # With the site's map: each mapped code is read as fedclif's, the rest still dropped.
    assert main(["site", "meds-codes", str(root), f"site.meds.code_map={code_map}"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "VITAL//heart_rate" in text and "LAB//sodium//mmol/L" in text
    assert "mapped" in text


def test_what_the_dataset_lacks_is_listed_at_once_in_meds_terms(generated, tmp_path, capsys):
    """Without a map: no stays and no ADT, vitals or labs, in one report; with a map of
    the stays alone, the three tables, with the codes that could fill them."""
    root, _ = generated
    assert main(["site", "validate", str(root), "--json", str(tmp_path / "r.json")]) == 1
    text = " ".join(capsys.readouterr().out.split())
    for says in (
        "no stays: no column 'hospitalization_id'",
        "admission codes (codes starting HOSPITAL_ADMISSION, ADMISSION",
        "no events for CLIF table adt: codes ADT//<location_category>",
        "no events for CLIF table vitals",
        "no events for CLIF table labs",
        "codes fedclif does not read",
        "dynamic//",
    ):
        assert says in text, (says, text)
    assert "CLIF 2.1 site" not in text and "read and checked" not in text
    # Counted even so: every row of the dataset, by namespace, dropped.
    counts = json.loads((tmp_path / "r.json").read_text())["meds_codes"]
    assert counts["dynamic"]["dropped"] == counts["dynamic"]["rows"] > 0
    stays_only = tmp_path / "stays.yaml"
    stays_only.write_text(
        "- {code: dynamic//0, table: hospitalization.admission_type_category, category: ed}\n"
    )
    assert main(["site", "validate", str(root), f"site.meds.code_map={stays_only}"]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "no stays" not in text
    assert text.count("no events for CLIF table") == 3


def test_every_code_is_counted_by_namespace_in_the_report(generated, tmp_path):
    root, code_map = generated
    report = tmp_path / "r.json"
    args = ["site", "validate", str(root), f"site.meds.code_map={code_map}"]
    assert main([*args, "--json", str(report)]) == 0
    got = json.loads(report.read_text())["meds_codes"]
    data = pl.concat(pl.read_parquet(f) for f in sorted((root / "data").rglob("*.parquet")))
    ns = data.get_column("code").str.splitn("//", 2).struct.field("field_0").value_counts()
    assert {k: got[k]["rows"] for k in got} == dict(ns.iter_rows())
    for c in got.values():
        assert c["rows"] == c["read"] + c["mapped"] + c["unknown"] + c["dropped"]
    # dynamic//6 and //7 are unmapped: dropped with the rows outside every stay.
    unmapped = data.filter(pl.col("code").is_in(["dynamic//6", "dynamic//7"])).height
    assert got["dynamic"]["dropped"] >= unmapped > 0 and got["dynamic"]["mapped"] > 0
    assert got["MEDS_BIRTH"]["read"] == 200 and got["static"]["mapped"] > 0


@pytest.mark.parametrize("edit", ["no-numeric-value", "subjects-descending", "hadm_id"])
def test_valid_meds_unlike_our_export_is_read(generated, tmp_path, edit):
    """MEDS 0.4 lets `numeric_value` be absent and subjects come in any order (each
    subject's rows together); a stay column may have any name (`site.meds.stay_column`)."""
    root, code_map = generated
    settings = [f"site.meds.code_map={code_map}"]
    if edit == "no-numeric-value":
        ds = _copy(root, tmp_path / "d", lambda df: df.drop("numeric_value"))
    elif edit == "subjects-descending":
        ds = _copy(
            root,
            tmp_path / "d",
            lambda df: df.sort("subject_id", descending=True, maintain_order=True),
        )
    else:  # stays as a column of their own, named as MIMIC-IV's MEDS names them
        ds = _copy(
            root,
            tmp_path / "d",
            lambda df: df.with_columns(
                pl.when(pl.col("time").is_not_null())
                .then(pl.col("subject_id") * 10)
                .otherwise(None)
                .alias("hadm_id")
            ),
        )
        settings.append("site.meds.stay_column=hadm_id")
    report = tmp_path / "r.json"
    assert main(["site", "validate", str(ds), *settings, "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["usable"] and got["source"] == "meds"
    if edit == "no-numeric-value":  # read as MEDS says: no value
        from fedclif.shared.config import load_tree
        from fedclif.shared.meds.read import read_meds

        cfg = load_tree(["site"], overrides=settings).site.meds
        values = read_meds(ds, cfg).events.get_column("value")
        assert values.len() > 0 and values.null_count() == values.len()
    elif edit == "hadm_id":  # one stay a subject
        assert got["tables"]["hospitalization"]["rows"] == 200


def test_a_stay_column_the_shards_lack_is_named_with_the_columns_they_have(
    generated, tmp_path, capsys
):
    root, code_map = generated
    args = ["site", "validate", str(root), f"site.meds.code_map={code_map}"]
    assert main([*args, "site.meds.stay_column=visit_id"]) == 1
    text = " ".join(capsys.readouterr().out.split())
    says = "no column 'visit_id' (site.meds.stay_column) in the data shards; their columns: "
    assert says + "subject_id, time, code, numeric_value" in text, text


def test_the_static_sample_opens_stays_at_its_own_admission_codes(tmp_path, capsys):
    """meds-testing-helpers' shipped sample (`ADMISSION//CARDIAC`, a bare `DISCHARGE`,
    `HR`, `TEMP`): stays open and close at its codes by default (site.meds.*_codes), and
    what it still lacks is named, with its unread codes."""
    from pathlib import Path

    from meds_testing_helpers.dataset import MEDSDataset
    from meds_testing_helpers.static_sample_data import SIMPLE_STATIC_SHARDED_BY_SPLIT

    from fedclif.shared.config import load_config
    from fedclif.shared.meds.read import survey

    root = Path(tmp_path / "sample")
    MEDSDataset.from_yaml(SIMPLE_STATIC_SHARDED_BY_SPLIT).write(root)
    codes = {c: (s, b) for _, c, _, s, b in survey(root, load_config("site").meds).iter_rows()}
    assert codes["ADMISSION//CARDIAC"] == ("unknown", "HOSPITAL_ADMISSION//CARDIAC")
    assert codes["HR"] == ("dropped", None) and codes["MEDS_BIRTH"][0] == "read"
    assert main(["site", "validate", str(root)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "no stays" not in text and text.count("no events for CLIF table") == 3
    assert "HR (16 rows), TEMP (16 rows)" in text


def test_a_map_row_converts_its_codes_values_to_the_clif_unit(generated, tmp_path):
    """`scale` and `offset` convert a code's values (`value * scale + offset`, as from
    degrees Fahrenheit to Celsius) and no other code's."""
    from fedclif.shared.config import load_tree
    from fedclif.shared.meds.read import read_meds

    root, code_map = generated
    unconverted = tmp_path / "map.csv"
    unconverted.write_text(CODE_MAP.replace("heart_rate,,10,80", "heart_rate,,,"))

    def values(path):
        cfg = load_tree(["site"], overrides=[f"site.meds.code_map={path}"]).site.meds
        ev = read_meds(root, cfg).events
        return {
            c: ev.filter(pl.col("source_code") == c).get_column("value").to_numpy()
            for c in ("dynamic//2", "dynamic//3")
        }

    raw, got = values(unconverted), values(code_map)
    assert len(got["dynamic//2"]) > 100
    np.testing.assert_allclose(got["dynamic//2"], raw["dynamic//2"] * 10 + 80, rtol=1e-6)
    np.testing.assert_array_equal(got["dynamic//3"], raw["dynamic//3"])


@pytest.mark.parametrize(
    "row, says",
    [
        (
            "dynamic//2,vitals,hr,",
            "category 'hr' for code 'dynamic//2' is not a CLIF vitals.vital_category",
        ),
        (
            "dynamic//2,vital_signs,heart_rate,",
            "table 'vital_signs' for code 'dynamic//2'; expected one of",
        ),
        (",vitals,heart_rate,", "no code (a code of the dataset, or a prefix ending in *)"),
        ("dynamic//0,drop,,", "code 'dynamic//0' already mapped in row 1"),
        ("dynamic//6,vitals,temp_c,,0,", "scale '0' is not a finite number other than 0"),
        ("dynamic//6,vitals,temp_c,,nan,", "scale 'nan' is not a finite number other than 0"),
        ("dynamic//6,vitals,temp_c,,1,-x", "offset '-x' is not a finite number (blank: 0)"),
    ],
)
def test_a_bad_code_map_row_is_named_by_file_and_row(generated, tmp_path, capsys, row, says):
    root, _ = generated
    bad = tmp_path / "map.csv"
    bad.write_text(CODE_MAP + row + "\n")
    assert main(["site", "validate", str(root), f"site.meds.code_map={bad}"]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert f"{bad} row 9" in text and says in text, text  # the map's header is row 0


def test_a_stay_runs_from_its_admission_to_its_discharge_else_its_first_to_last_event():
    """Stays from a stay column: the window is the earliest admission code to the latest
    discharge code, and a stay with neither runs from its first to its last event; the
    categories are read from the codes (null where none says)."""
    from datetime import datetime

    from fedclif.shared.config import load_config
    from fedclif.shared.meds.stays import meds_stays

    h = [datetime(2020, 1, 1, x) for x in range(10)]
    rows = [  # (subject, stay, hour, code)
        (1, "a", 0, "LAB//sodium"),
        (1, "a", 1, "HOSPITAL_ADMISSION//ed"),
        (1, "a", 2, "HOSPITAL_ADMISSION//elective"),
        (1, "a", 3, "HOSPITAL_DISCHARGE//Home"),
        (1, "a", 4, "HOSPITAL_DISCHARGE//Expired"),
        (1, "a", 5, "VITAL//heart_rate"),
        (2, "b", 6, "VITAL//heart_rate"),
        (2, "b", 7, "VITAL//heart_rate"),
        (2, "b", 8, "LAB//sodium"),
    ]
    events = pl.DataFrame(
        [(s, hid, h[t], c) for s, hid, t, c in rows],
        schema=["subject_id", "stay", "time", "code"],
        orient="row",
    )
    cfg = load_config("site").meds.copy()
    cfg.stay_column = "stay"
    problems = []
    _, stays = meds_stays(events, events.columns, cfg, problems)
    assert not problems
    assert stays.rows() == [
        ("a", "1", h[1], "ed", h[4], "Expired"),
        ("b", "2", h[6], None, h[8], None),
    ]
