"""A stay's admission-level codes: the targets of MedHMP's admission objectives
(`masked_codes`, `code_contrast`), never model inputs.

Diagnoses (CLIF `hospital_diagnosis`) are coded at discharge: a code known only after the
stay must not enter a first-24 h input, so they never become timeline tokens. Drugs are
the medication categories of the stay's own events (given at any time within it). A code
is `DX_<ICD-10-CM, dots removed, first n characters>` or `DRUG_<med_category>`; statistics
count the stays holding each (with the same suppression as every other code) and the
tokenizer keeps the common ones as its `targets`, beside the vocabulary, not in it.
"""

import polars as pl
from omegaconf import DictConfig

from fedclif.shared.clif.site import Site
from fedclif.shared.tokens.events import UNK

TARGET_PREFIXES = ("DX", "DRUG")


def admission_codes(
    site: Site, st: pl.DataFrame, cfg: DictConfig | dict, events: pl.DataFrame
) -> pl.DataFrame:
    """Distinct (stay, code) pairs of the stays in `st`: diagnoses from the site's table,
    drugs from the stays' own events (`events`: shared/tokens/events.py `stay_events`, collected;
    so only what was given within the stay's window). `cfg` is the tokenizer config's
    `codes` section (`diagnosis_format`, `diagnosis_chars`)."""
    drug = pl.col("code").str.extract(r"^MED[CI]_(.+)$")
    parts: list[pl.LazyFrame] = [
        events.lazy()
        .filter(drug.is_not_null() & ~pl.col("code").str.starts_with("MEDC_stop_"))
        .select("stay", (pl.lit("DRUG_") + drug).alias("code"))
    ]
    if site.has("hospital_diagnosis"):
        dx = site.tables["hospital_diagnosis"].lazy()
        fmt = str(cfg["diagnosis_format"])
        if "diagnosis_code_format" in site.tables["hospital_diagnosis"].columns:
            # ICD-9 and ICD-10 truncations would collide (`428` vs `I50`): keep one coding.
            norm = pl.col("diagnosis_code_format").str.to_uppercase().str.replace_all("-", "")
            dx = dx.filter(norm == fmt.upper().replace("-", ""))
        code = (
            pl.col("diagnosis_code")
            .str.replace_all(".", "", literal=True)
            .str.strip_chars()
            .str.to_uppercase()
            .str.slice(0, int(cfg["diagnosis_chars"]))
        )
        parts.append(
            dx.filter(pl.col("diagnosis_code").is_not_null())
            .select("hospitalization_id", (pl.lit("DX_") + code).alias("code"))
            .join(st.lazy().select("hospitalization_id", "stay"), on="hospitalization_id")
            .select("stay", "code")
        )
    return (
        pl.concat(parts)
        .filter((pl.col("code") != f"DX_{UNK}") & (pl.col("code") != f"DRUG_{UNK}"))
        .filter(~pl.col("code").str.ends_with("_"))
        .unique()
        .collect()
    )


def is_target(code: str) -> bool:
    return code.split("_", 1)[0] in TARGET_PREFIXES


def target_lists(pairs: pl.DataFrame, st: pl.DataFrame, targets: tuple[str, ...]) -> pl.Series:
    """Per stay of `st` (in order), the sorted indices into `targets` of its codes
    (`admission_codes` output); codes outside `targets` (too rare) are dropped."""
    index = pl.DataFrame({"code": list(targets), "target": range(len(targets))})
    per_stay = (
        pairs.join(index.with_columns(pl.col("target").cast(pl.Int32)), on="code")
        .group_by("stay")
        .agg(pl.col("target").sort())
    )
    out = st.select("stay").join(per_stay, on="stay", how="left", maintain_order="left")
    return out.get_column("target").fill_null([]).alias("codes")
