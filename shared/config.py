"""The one config loader: packaged YAML defaults, then a user file, then `key=value` overrides."""

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedclif.shared.errors import FedclifError

# configs/ ships inside the package (fedclif/configs), found through it: the same in a
# checkout installed editable and in a wheel.
CONFIG_DIR = Path(str(files("fedclif") / "configs"))


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


def load_config(
    name: str,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    open_sections: Sequence[str] = (),
) -> DictConfig:
    """Load `configs/<name>.yaml`, merge an optional user file and dotted overrides.

    The defaults are struct-locked, so a misspelt key in a file or override is an
    error rather than a silently ignored setting. `open_sections` take any keys: they
    override another config, which checks them.
    """
    cfg = _load_yaml(CONFIG_DIR / f"{name}.yaml")
    OmegaConf.set_struct(cfg, True)
    for s in open_sections:
        OmegaConf.set_struct(OmegaConf.select(cfg, s), False)
    layers = [_load_yaml(Path(path))] if path else []
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise FedclifError(f"overrides must look like key=value, got: {', '.join(bad)}")
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            known = ", ".join(str(k) for k in cfg)
            raise FedclifError(f"bad {name} config: {e.msg} (known keys: {known})") from e
    return cfg
