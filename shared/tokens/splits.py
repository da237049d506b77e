"""Patient-level train/val/test split, stable across runs, machines and commands."""

import hashlib

import numpy as np
from omegaconf import DictConfig

from fedclif.shared.errors import FedclifError

SPLITS = ("train", "val", "test")


def assign_splits(patient_ids: np.ndarray, cfg: DictConfig) -> np.ndarray:
    """The split of each row: a salted hash of its patient, so a patient's stays share a
    split and a stay keeps it whatever else the site holds (the order, new stays).
    With `train_fraction` < 1 only that share of the train patients stays in "train" (the
    rest become "unused"): nested, so 5% of a site holds its 1%."""
    u = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{cfg.salt}:{p}".encode()).digest()[:8], "big") / 2.0**64
            for p in patient_ids
        ]
    )
    test, held = float(cfg.test), float(cfg.test) + float(cfg.val)
    frac = float(cfg.get("train_fraction", 1.0))
    if not 0 < frac <= 1:
        raise FedclifError(f"split.train_fraction must be in (0, 1], got {frac}")
    train = np.where((u - held) / (1 - held) < frac, "train", "unused")
    return np.where(u < test, "test", np.where(u < held, "val", train))
