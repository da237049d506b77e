"""The one config grammar. Every command works on one tree of sections (`site`,
`tokenizer`, `train`, `model`, `federation`, `study`, and a site's `policy`) and takes
`section.key=value` overrides and `--config FILE` (a YAML of the same sections) against
it. The tree is built from packaged defaults in this order, each layer over the last:

1. each section's defaults: `configs/<section>.yaml` (the model's: `configs/model/<size>.yaml`,
   `model.size` picks it);
2. the command's layers, YAML files of sections in configs/ (a federated run's local
   rounds, the transfer study); a section a layer names that no file above defines gets
   its defaults there;
3. the user's `--config FILE`;
4. `section.key=value` from the command line.

Every section is struct-locked once its defaults are in, so a misspelt key in a layer, a
file or an override is an error rather than a silently ignored setting. The resolved tree
is what a run writes to `resolved.yaml`, and it can be given back as `--config`.
"""

import argparse
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedclif.shared.artifact import write_text
from fedclif.shared.errors import FedclifError

# configs/ ships inside the package (fedclif/configs), found through it: the same in a
# checkout installed editable and in a wheel.
CONFIG_DIR = Path(str(files("fedclif") / "configs"))
# Sections whose defaults are one file of configs/ (the model's: one file per size).
SECTION_FILES = ("site", "tokenizer", "train", "policy")
DEFAULT_MODEL = "tiny"
RESOLVED = "resolved.yaml"


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise FedclifError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, OSError) as e:
        raise FedclifError(f"cannot read config {path}: {e}") from e
    if not isinstance(cfg, DictConfig):
        raise FedclifError(f"config {path} must be a mapping, found a list")
    return cfg


def _merge(cfg: DictConfig, layer, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)
    except OmegaConfBaseException as e:
        known = ", ".join(str(k) for k in cfg)
        raise FedclifError(f"bad config in {what}: {e.msg} (known keys: {known})") from e


def load_config(
    name: str,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    open_sections: Sequence[str] = (),
) -> DictConfig:
    """One flat file of configs/ (`configs/<name>.yaml`), an optional file of the same
    shape over it, then dotted `key=value` overrides; struct-locked, so typos are
    errors. `open_sections` take any keys (checked where they are used)."""
    cfg = _load_yaml(CONFIG_DIR / f"{name}.yaml")
    OmegaConf.set_struct(cfg, True)
    for s in open_sections:
        OmegaConf.set_struct(OmegaConf.select(cfg, s), False)
    if path:
        cfg = _merge(cfg, _load_yaml(Path(path)), str(path))
    return _merge(cfg, _dotlist(overrides), "the overrides")


def _dotlist(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedclifError(f"overrides must look like section.key=value, got: {', '.join(bad)}")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise FedclifError(f"cannot read the overrides {list(overrides)}: {e}") from e


def _model_size(layers: list[DictConfig], overrides: DictConfig) -> str:
    """`model.size` as the last layer that sets it says (default: tiny)."""
    size = DEFAULT_MODEL
    for layer in [*layers, overrides]:
        size = str(OmegaConf.select(layer, "model.size", default=size))
    sizes = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    if size not in sizes:
        raise FedclifError(f"unknown model.size {size!r}: choose from {', '.join(sizes)}")
    return size


def load_tree(
    sections: Sequence[str],
    layers: Sequence[str] = (),
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    open_keys: Sequence[str] = (),
) -> DictConfig:
    """The config tree of a command that uses `sections` (see the module's docstring for
    the order of layers). `layers` name sectioned files in configs/; `open_keys` take any
    keys (e.g. a Flower strategy's options, checked when it is built)."""
    packaged = [_load_yaml(CONFIG_DIR / f"{name}.yaml") for name in layers]
    user = [_load_yaml(Path(path))] if path else []
    given = _dotlist(overrides)
    for what, layer in [
        *zip(layers, packaged, strict=True),
        *((str(path), u) for u in user),
        ("the command line", given),
    ]:
        unknown = [str(k) for k in layer if k not in sections]
        if unknown:
            raise FedclifError(
                f"{what}: unknown section(s) {', '.join(unknown)}; settings must start with "
                f"one of: {', '.join(s + '.' for s in sections)} (section.key=value)"
            )
    root = OmegaConf.create({})
    for s in sections:
        if s in SECTION_FILES:
            root[s] = load_config(s)
        elif s == "model":
            size = _model_size([*packaged, *user], given)
            root[s] = load_config(f"model/{size}")
    for name, layer in zip(layers, packaged, strict=True):
        for s in layer:
            if s in root:
                root[s] = _merge(root[s], layer[s], f"configs/{name}.yaml")
            else:  # this layer holds the section's defaults
                root[s] = layer[s]
                OmegaConf.set_struct(root[s], True)
    missing = [s for s in sections if s not in root]
    if missing:
        raise FedclifError(f"no defaults for section(s) {missing}")  # a packaging bug
    OmegaConf.set_struct(root, True)
    for key in open_keys:
        OmegaConf.set_struct(OmegaConf.select(root, key), False)
    for u in user:
        root = _merge(root, u, str(path))
    return _merge(root, given, "the overrides")


def add_arguments(parser: argparse.ArgumentParser, sections: Sequence[str], example: str) -> None:
    """The grammar on a command line: `section.key=value ...` and `--config FILE`."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help=f"settings of the {', '.join(sections)} section(s), e.g. {example}",
    )
    parser.add_argument(
        "--config",
        help=f"a YAML of sections ({', '.join(s + ':' for s in sections)}) over the defaults",
    )


def write_resolved(cfg: DictConfig, out: str | Path) -> Path:
    """The fully resolved config a run used, in its output directory."""
    path = Path(out) / RESOLVED
    write_text(OmegaConf.to_yaml(cfg), path)
    return path
