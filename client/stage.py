"""A training stage as one description: what it trains on (examples of a split), how they
are batched, its loss and its held-out loss. Pretraining, finetuning and a federated
round's local step all take their stage from `STAGES`, so the three cannot drift apart."""

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from fedclif.client.loop import to_device
from fedclif.shared.errors import FedclifError
from fedclif.shared.models import EHRModel
from fedclif.shared.sequences import (
    PatientBlocks,
    Prompted,
    SiteData,
    block_batch,
    packed_blocks,
    pad_collate,
)


class Pretrain:
    """Next-token prediction on full timelines packed into blocks of `pretrain.context`.
    `private`: one block per patient instead (the unit DP-SGD protects), a window of
    their timelines drawn with `seed`."""

    name = "pretrain"

    def examples(
        self, data: SiteData, split: str, cfg: DictConfig, private: bool = False, seed: int = 0
    ) -> Dataset:
        if private:
            return PatientBlocks(data, split, int(cfg.pretrain.context), seed)
        return packed_blocks(data, split, int(cfg.pretrain.context))

    def collate(self, model: EHRModel):
        return _block_collate

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(batch)

    @torch.no_grad()
    def held_out(self, model: EHRModel, ds: Dataset, device: torch.device, bs: int) -> float:
        """Token-weighted mean next-token loss (nats) over blocks."""
        total = count = 0.0
        for batch in DataLoader(ds, batch_size=bs, collate_fn=_block_collate):
            batch = to_device(batch, device)
            n = float((batch["input_ids"][:, 1:] != model.lm.config.pad_token_id).sum())
            total += float(model(batch)) * n
            count += n
        return total / max(count, 1.0)


class Finetune:
    """Multitask prompted finetuning: the first-24 h view closed by a task token (the last
    `finetune.context` tokens), one binary head. `private`: one example per patient (the
    unit DP-SGD protects), its stay and task drawn with `seed`."""

    name = "finetune"

    def examples(
        self, data: SiteData, split: str, cfg: DictConfig, private: bool = False, seed: int = 0
    ) -> Dataset:
        c = cfg.finetune
        return Prompted(data, split, list(c.tasks), int(c.context), private, seed)

    def collate(self, model: EHRModel):
        return pad_collate(model.lm.config.pad_token_id)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        # Per-row mean: opacus computes per-sample gradients of a batch-mean loss.
        logits = model(batch, "task")
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["y"])

    def held_out(self, model: EHRModel, ds: Dataset, device: torch.device, bs: int) -> float:
        """Mean binary cross-entropy of the task predictions."""
        p, y, _ = predict(model, ds, device, bs)
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


STAGES = {"pretrain": Pretrain(), "finetune": Finetune()}


def stage(name: str) -> Pretrain | Finetune:
    if name not in STAGES:
        raise FedclifError(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    return STAGES[name]


def _block_collate(items: list) -> dict:
    return block_batch([torch.stack(t) for t in zip(*items, strict=True)])


@torch.no_grad()
def predict(
    model: EHRModel, ds: Prompted, device: torch.device, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, outcomes, task index) of every example of `ds`, in order."""
    model.eval()
    p, y, k = [], [], []
    pad = model.lm.config.pad_token_id
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=pad_collate(pad)):
        p.append(torch.sigmoid(model(to_device(batch, device), "task").float()).cpu())
        y.append(batch["y"])
        k.append(batch["task"])
    if not p:
        return np.zeros(0), np.zeros(0), np.zeros(0, int)
    return torch.cat(p).numpy(), torch.cat(y).numpy(), torch.cat(k).numpy()
