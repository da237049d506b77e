"""A federated run's checkpoint, rewritten after every round: global weights
(safetensors), the strategy's state (e.g. FedAdam moments), the pretrained base for a
LoRA phase, and `state.json` (phase, round, tokenizer hash, config, history)."""

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedclif.shared.errors import FedclifError

CHECKPOINT = "checkpoint"
Arrays = dict[str, np.ndarray]


def strategy_state(strategy) -> Arrays:
    """Every dict-of-arrays attribute of a Flower strategy (FedOpt: current_arrays, m_t,
    v_t), flattened as `attr/key`: the state a resumed run needs to continue exactly."""
    flat = {}
    for attr, value in vars(strategy).items():
        if (
            isinstance(value, dict)
            and value
            and all(isinstance(v, np.ndarray) for v in value.values())
        ):
            flat.update({f"{attr}/{k}": np.ascontiguousarray(v) for k, v in value.items()})
    return flat


def restore_strategy(strategy, flat: Arrays) -> None:
    attrs: dict[str, dict] = {}
    for name, v in flat.items():
        attr, _, key = name.partition("/")
        attrs.setdefault(attr, {})[key] = v
    for attr, value in attrs.items():
        setattr(strategy, attr, value)


def _save(arrays: Arrays, path: Path) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))


def save_checkpoint(
    out: Path, state: dict, weights: Arrays, strategy, base: Arrays | None = None
) -> None:
    """Write the checkpoint next to the old one, then swap: a crash mid-write leaves the
    previous round's checkpoint whole."""
    tmp, final, old = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT, out / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save(weights, tmp / "weights.safetensors")
    _save(strategy_state(strategy), tmp / "strategy.safetensors")
    if base is not None:
        _save(base, tmp / "base.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path) -> tuple[dict, Arrays, Arrays, Arrays | None]:
    """(state, global weights, strategy state, base or None) of the last finished round."""
    d = out / CHECKPOINT
    if not (d / "state.json").is_file():
        raise FedclifError(f"nothing to resume: no checkpoint in {out} (start without resume)")
    base = load_file(str(d / "base.safetensors")) if (d / "base.safetensors").is_file() else None
    return (
        json.loads((d / "state.json").read_text()),
        load_file(str(d / "weights.safetensors")),
        load_file(str(d / "strategy.safetensors")),
        base,
    )
