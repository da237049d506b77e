"""The study's hospitals on disk: each synthetic site generated once and reused (the
directory is named by a hash of the generator config, stays and seed), plus the pooled
site, every table of the real sites concatenated (ids carry each hospital's prefix)."""

import hashlib
from pathlib import Path

import polars as pl
from omegaconf import DictConfig, OmegaConf

from fedclif.shared.ui import console
from fedclif.simulations.synth import load_preset, write_site

# Virtual sites: the study's data directories carry these names.
SOURCE, TARGET, THIRD, POOLED = "source", "target", "third", "pooled"


def site_roles(cfg: DictConfig) -> list[str]:
    """The study's virtual sites, in partition order."""
    return [SOURCE, TARGET] + ([THIRD] if cfg.sites.third else []) + [POOLED]


def study_sites(cfg: DictConfig, cache: Path) -> list[Path]:
    """One CLIF directory per role (named by the role: sites know themselves by their
    directory's name), under `cache/<hash of the sites' configs>/`."""
    specs = {r: cfg.sites[r] for r in site_roles(cfg) if r != POOLED}
    gen = {r: load_preset(str(s.preset)) for r, s in specs.items()}
    key = "\n".join(f"{r}:{s.stays}:{s.seed}:{OmegaConf.to_yaml(gen[r])}" for r, s in specs.items())
    root = Path(cache) / hashlib.sha256(key.encode()).hexdigest()[:12]
    for role, spec in specs.items():
        d = root / role
        if not (d / ".complete").is_file():
            console.print(f"generating {role}: {spec.stays} stays of {spec.preset}")
            write_site(gen[role], int(spec.stays), int(spec.seed), d)
            (d / ".complete").touch()
    pooled = root / POOLED
    if not (pooled / ".complete").is_file():
        pooled.mkdir(parents=True, exist_ok=True)
        for f in sorted((root / SOURCE).glob("clif_*.parquet")):
            parts = [pl.read_parquet(root / r / f.name) for r in specs]
            pl.concat(parts, how="diagonal_relaxed").write_parquet(pooled / f.name)
        (pooled / ".complete").touch()
    return [root / r for r in site_roles(cfg)]
