"""CLIF 3.0 sites (shared/clif/versions.py): the demo written as CLIF 3.0 through clifpy's
crosswalk is told apart from 2.1, checked against the 3.0 schemas, and speaks the same
vocabulary: the same statistics, tokenizer and timelines as the 2.1 demo. (The mixed
2.1/3.0 federation on real Flower processes is test_federation.py's: its site b is 3.0.)"""

import json

import polars as pl
import pytest
from conftest import DEMO_CELLS, assert_same_tokens, read, run_tokenize, write

from fedclif.cli import main
from fedclif.shared.clif.schema import load_schemas
from fedclif.shared.clif.site import load_site, read_site
from fedclif.shared.clif.versions import (
    _crosswalk,
    normalize_category_value,
    site_version,
    vocabulary_terms,
)
from fedclif.shared.config import load_config
from fedclif.shared.errors import FedclifError
from fedclif.shared.tokens.events import stay_events
from fedclif.shared.tokens.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo30(tmp_path_factory):
    d = tmp_path_factory.mktemp("clif30") / "clif"
    assert main(["demo-data", "--clif", "3.0", str(d)]) == 0
    return d


def test_the_3_0_demo_is_in_3_0_terms_and_validates_as_3_0(demo30, tmp_path):
    assert set(read(demo30, "patient")["sex_category"]) == {"male", "female"}
    assert "hfnc" in set(read(demo30, "respiratory_support")["device_category"])
    assert "expired" in set(read(demo30, "hospitalization")["discharge_category"])
    report = tmp_path / "report.json"
    assert main(["site", "validate", str(demo30), "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["clif_version"] == "3.0" and r["usable"] and r["usable_stays"] == 272
    # Checked against 3.0's schema: `room_id` is a 3.0 column the 2.1 demo never had.
    missing = [p["column"] for p in r["tables"]["adt"]["problems"] if p["kind"] == "missing-column"]
    assert "room_id" in missing


def test_the_version_is_told_from_the_data_or_taken_from_the_config(demo_dir, demo30):
    assert site_version("auto", demo_dir) == "2.1"
    assert site_version("auto", demo30) == "3.0"
    assert site_version("2.1", demo30) == "2.1"  # the config's word wins
    with pytest.raises(FedclifError, match=r"site.clif_version='3\.1'.*auto"):
        site_version("3.1", demo30)


def test_a_3_0_site_gives_the_events_and_timelines_of_its_2_1_source(
    demo_dir, demo30, demo_tokens, tmp_path
):
    """Same event, same token: the crosswalked 3.0 demo has the 2.1 demo's event stream,
    statistics (so the tokenizer hash) and, with the same tokenizer, timelines, labels
    and hourly grid."""
    cfg = load_config("site")
    a, b = load_site(demo_dir, cfg), load_site(demo30, cfg)
    assert b.tables["respiratory_support"]["device_category"].is_in(["High Flow NC"]).any()
    key = ["stay", "hours", "prio", "code", "value"]
    ea, eb = (stay_events(s).collect().sort(key, nulls_last=True) for s in (a, b))
    assert ea.height > 200_000 and ea.equals(eb)
    stats = {}
    for d in (demo_dir, demo30):
        stats[d] = tmp_path / f"{d.parent.name}.json"
        assert main(["site", "stats", str(d), DEMO_CELLS, "--out", str(stats[d])]) == 0
    sa, sb = (json.loads(stats[d].read_text()) for d in (demo_dir, demo30))
    assert sa["clif_version"] == sb["clif_version"] == "2.1"  # the vocabulary's terms
    assert sa["codes"] == sb["codes"] and sa["numeric"] == sb["numeric"]
    # A 2.1 + 3.0 federation fits the tokenizer that two 2.1 copies fit.
    hashes = []
    for pair in ((demo_dir, demo30), (demo_dir, demo_dir)):
        tok = tmp_path / f"tokenizer-{len(hashes)}.json"
        assert (
            main(
                [
                    "tokenizer",
                    "fit",
                    "--out",
                    str(tok),
                    "--stats",
                    *map(str, (stats[d] for d in pair)),
                ]
            )
            == 0
        )
        hashes.append(Tokenizer.load(tok).hash)
    assert hashes[0] == hashes[1]
    out = run_tokenize(demo30, demo_tokens / "tokenizer.json", tmp_path / "tokens")
    assert_same_tokens(demo_tokens, out)


def test_3_0_terms_without_a_2_1_term_are_codes_of_their_own(site_dir, site_cfg):
    """A value only 3.0 has (`bnp`) is a code at any site, not UNK; albumin's 3.0
    concentration split folds back into 2.1's `albumin`; free text is still UNK."""
    assert {"bnp", "sodium"} <= vocabulary_terms("labs", "lab_category")
    labs = read(site_dir, "labs")
    labs = labs.with_columns(
        pl.when(pl.int_range(pl.len()) < 3)
        .then(pl.lit("bnp"))
        .when(pl.int_range(pl.len()) < 5)
        .then(pl.lit("my_lab"))
        .otherwise(pl.col("lab_category"))
        .alias("lab_category")
    )
    write(site_dir, "labs", labs)
    site = load_site(site_dir, site_cfg)
    kinds = {(p.column, p.kind): p.count for p in site.report.warnings if p.table == "labs"}
    assert kinds[("lab_category", "category-version")] == 3
    assert kinds[("lab_category", "unknown-category")] == 2
    codes = stay_events(site).collect().get_column("code")
    assert codes.is_in(["LAB_bnp"]).any() and codes.is_in(["LAB_UNK"]).any()
    assert not codes.is_in(["LAB_my_lab"]).any()


def test_a_3_0_concentration_split_folds_into_the_2_1_term(demo30, tmp_path, site_cfg):
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    for f in demo30.glob("clif_*.parquet"):
        (site_dir / f.name).write_bytes(f.read_bytes())
    meds = read(site_dir, "medication_admin_continuous")
    meds = meds.with_columns(
        pl.when(pl.int_range(pl.len()) < 4)
        .then(pl.lit("albumin_25"))
        .otherwise(pl.col("med_category"))
        .alias("med_category")
    )
    write(site_dir, "medication_admin_continuous", meds)
    site = read_site(site_dir, site_cfg)
    assert site.report.clif_version == "3.0" and not site.report.fatal
    got = site.tables["medication_admin_continuous"].head(4)["med_category"].to_list()
    assert got == ["albumin"] * 4


def test_the_restated_normaliser_and_crosswalk_are_clifpys():
    """versions.py restates clifpy's normaliser and reads its crosswalk file (importing
    clifpy costs every site process ~0.5 s): both held equal to clifpy's own."""
    from clifpy.utils import crosswalk

    values = {"Heart Rate", " l&d ", "DNR/DNI", "pulmonary vasodilators (IV)", "a--b__c"}
    for version in ("2.1", "3.0"):
        for schema in load_schemas(version).values():
            values |= {v for c in schema.columns.values() for v in c.permissible or ()}
    assert len(values) > 500
    for v in values:
        assert normalize_category_value(v) == crosswalk.normalize_category_value(v), v
    theirs = crosswalk.load_crosswalk()
    assert _crosswalk() == {k: theirs[k] for k in ("renames", "unresolved")}
