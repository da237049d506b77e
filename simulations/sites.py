"""The study's hospitals on disk: each synthetic site generated once and reused by every
study that names it (under a hash of its role, generator config, stays and seed, and the
generator's code), plus the pooled site, every table of the real sites concatenated (ids
carry each hospital's prefix), and the virtual sites' work directories, both under a
hash of all the sites."""

import hashlib
from pathlib import Path

import polars as pl
from omegaconf import DictConfig, OmegaConf

from fedclif.shared.clif import versions
from fedclif.shared.clif.versions import (
    VERSIONS,
    VOCABULARY_VERSION,
    to_vocabulary,
    write_clif_3,
)
from fedclif.shared.errors import FedclifError
from fedclif.shared.ui import console
from fedclif.simulations import synth, truth
from fedclif.simulations.synth import load_preset, write_site
from fedclif.simulations.truth import write_truth

# Virtual sites: the study's data directories carry these names.
SOURCE, TARGET, THIRD, POOLED = "source", "target", "third", "pooled"
# The code that writes a site, its truth and its CLIF 3.0 tables: part of a cached site's
# key, so a site written by older code is never served as this code's (a changed
# generator once left stale truth files in every cache).
GENERATOR_CODE = (synth.__file__, truth.__file__, versions.__file__)


def site_roles(cfg: DictConfig) -> list[str]:
    """The study's virtual sites, in partition order."""
    return [SOURCE, TARGET] + ([THIRD] if cfg.sites.third else []) + [POOLED]


def study_sites(cfg: DictConfig, cache: Path) -> tuple[list[Path], Path]:
    """One CLIF directory per role (named by the role: sites know themselves by their
    directory's name), each under `cache/<hash of its own config>/`, so the source of a
    study of every target is generated once; and the work root of the virtual sites,
    `cache/<hash of all the sites>/work` (a site's cached timelines are its data's)."""
    specs = {r: cfg.sites[r] for r in site_roles(cfg) if r != POOLED}
    clif = {r: str(s.get("clif") or VOCABULARY_VERSION) for r, s in specs.items()}
    for r, v in clif.items():
        if v not in VERSIONS:
            raise FedclifError(f"study.sites.{r}.clif={v!r}: expected one of {', '.join(VERSIONS)}")
    code = _digest("".join(Path(f).read_text() for f in GENERATOR_CODE))
    keys = {
        r: f"{r}:{s.stays}:{s.seed}:{OmegaConf.to_yaml(load_preset(str(s.preset)))}"
        + ("" if clif[r] == VOCABULARY_VERSION else f":clif {clif[r]}")
        + f":code {code}"
        for r, s in specs.items()
    }
    dirs = {r: Path(cache) / _digest(k) / r for r, k in keys.items()}
    for role, spec in specs.items():
        if not (dirs[role] / ".complete").is_file():
            console.print(
                f"generating {role}: {spec.stays} stays of {spec.preset}, CLIF {clif[role]}"
            )
            write_site(load_preset(str(spec.preset)), int(spec.stays), int(spec.seed), dirs[role])
            if clif[role] == "3.0":  # a hospital that moved to CLIF 3.0: a mixed federation
                write_clif_3(dirs[role], dirs[role])
            # Each stay's ceiling, beside the site.
            write_truth(load_preset(str(spec.preset)), int(spec.stays), int(spec.seed), dirs[role])
            (dirs[role] / ".complete").touch()
    root = Path(cache) / _digest("\n".join(keys.values()))
    pooled = dirs[POOLED] = root / POOLED
    if not (pooled / ".complete").is_file():
        pooled.mkdir(parents=True, exist_ok=True)
        # Every table any site has (a site may lack an optional one: shift-documentation).
        names = sorted({f.name for r in specs for f in dirs[r].glob("clif_*.parquet")})
        for name in names:
            table = name.removeprefix("clif_").removesuffix(".parquet")
            parts = []
            for r in specs:
                if (dirs[r] / name).is_file():
                    df = pl.read_parquet(dirs[r] / name)
                    # One hospital's data in one vocabulary: a 3.0 site's values in 2.1 terms.
                    parts.append(df if clif[r] == VOCABULARY_VERSION else to_vocabulary(table, df))
            pl.concat(parts, how="diagonal_relaxed").write_parquet(pooled / name)
        (pooled / ".complete").touch()
    return [dirs[r] for r in site_roles(cfg)], root / "work"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
