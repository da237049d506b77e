"""A federated run's checkpoint, rewritten after every round: global weights
(safetensors), the strategy's state (e.g. FedAdam moments), the pretrained base for a
LoRA phase, and `state.json` (phase, round, tokenizer hash, config, history)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedclif.shared.errors import FedclifError

CHECKPOINT, STATE = "checkpoint", "state.json"
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
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file (or a directory's entries) to disk: a rename that follows cannot land
    before the data it names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    out: Path, state: dict, weights: Arrays, strategy, base: Arrays | None = None
) -> None:
    """Write the round's checkpoint beside the last one, then swap them. Every file is
    flushed before `state.json`, which is written last and marks the directory complete,
    so a crash at any point leaves a complete checkpoint that `load_checkpoint` finds."""
    tmp, final, old = (out / f"{CHECKPOINT}{x}" for x in (".tmp", "", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save(weights, tmp / "weights.safetensors")
    _save(strategy_state(strategy), tmp / "strategy.safetensors")
    if base is not None:
        _save(base, tmp / "base.safetensors")
    part = tmp / f"{STATE}.part"
    part.write_text(json.dumps(state, indent=1))
    _fsync(part)
    part.rename(tmp / STATE)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync(out)
    shutil.rmtree(old, ignore_errors=True)


def _complete(d: Path) -> bool:
    return (d / STATE).is_file() and (d / "weights.safetensors").is_file()


def load_checkpoint(out: Path) -> tuple[dict, Arrays, Arrays, Arrays | None]:
    """(state, global weights, strategy state, base or None) of the last complete round:
    a complete new checkpoint still under its temporary name (a crash before the swap
    ended), else the checkpoint, else the previous one (a crash between the renames)."""
    found = [d for d in (out / f"{CHECKPOINT}{x}" for x in (".tmp", "", ".old")) if _complete(d)]
    if not found:
        raise FedclifError(f"nothing to resume: no checkpoint in {out} (start without resume)")
    d = found[0]
    base = load_file(str(d / "base.safetensors")) if (d / "base.safetensors").is_file() else None
    return (
        json.loads((d / STATE).read_text()),
        load_file(str(d / "weights.safetensors")),
        load_file(str(d / "strategy.safetensors")),
        base,
    )


def _diff(a, b, path: str) -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [f"{path} ({a!r} saved, {b!r} now)"]


def resume_problem(saved: dict, config: dict, tokenizer_hash: str) -> str | None:
    """Why a run cannot resume from `saved` (a checkpoint's state) under `config` (the
    resuming invocation's tree, plain) with this tokenizer, or None: the weights would
    not fit, or would mean something else, under another tokenizer, model or strategy."""
    if saved.get("tokenizer_hash") != tokenizer_hash:
        was = str(saved.get("tokenizer_hash"))[:12]
        return f"tokenizer {tokenizer_hash[:12]} != {was} saved"
    old = saved.get("config", {})
    diffs = _diff(old.get("model"), config.get("model"), "model")
    strategy = [c.get("federation", {}).get("strategy") for c in (old, config)]
    diffs += _diff(*strategy, "federation.strategy")
    return f"differs from the checkpoint: {'; '.join(diffs)}" if diffs else None
