"""Patient-level train/val/test split, stable across runs, machines and commands."""

import hashlib

import numpy as np
from omegaconf import DictConfig

SPLITS = ("train", "val", "test")


def assign_splits(patient_ids: np.ndarray, cfg: DictConfig) -> np.ndarray:
    """The split of each row: a salted hash of its patient, so a patient's stays share a
    split and a stay keeps it whatever else the site holds (the order, new stays)."""
    u = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{cfg.salt}:{p}".encode()).digest()[:8], "big") / 2.0**64
            for p in patient_ids
        ]
    )
    return np.where(
        u < float(cfg.test), "test", np.where(u < float(cfg.test) + float(cfg.val), "val", "train")
    )
