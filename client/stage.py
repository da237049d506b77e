"""A training stage as one description: what it trains on (examples of a split), how they
are batched, its loss and its held-out loss. Pretraining, finetuning and a federated
round's local step all take their stage from `STAGES`, so the three cannot drift apart."""

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from fedclif.client.loop import to_device
from fedclif.shared.errors import FedclifError
from fedclif.shared.model.models import EHRModel
from fedclif.shared.model.objectives import Spec, check_private, heads_needed, total, weights_at
from fedclif.shared.model.sequences import (
    PatientBlocks,
    Prompted,
    SiteData,
    StayViews,
    block_batch,
    packed_blocks,
    pad_collate,
)


class Pretrain:
    """Next-token prediction on full timelines packed into blocks of `pretrain.context`;
    with objectives beyond it (`pretrain.objectives`, `pretrain.stages`), one stay view
    per example instead (shared/model/sequences.py `StayViews`), scored by the objectives'
    weighted losses at `progress` through the run. `private`: one example per patient (the
    unit DP-SGD protects), drawn with `seed`."""

    name = "pretrain"

    def examples(
        self,
        data: SiteData,
        split: str,
        cfg: DictConfig,
        private: bool = False,
        seed: int = 0,
        progress: float = 0.0,
    ) -> Dataset:
        c = cfg.pretrain
        if heads_needed(c):
            if private:
                check_private(c)
            spec = Spec.of(c, weights_at(c, progress), private)
            return StayViews(data, split, int(c.context), int(c.ts.hours), spec, private, seed)
        if private:
            return PatientBlocks(data, split, int(c.context), seed)
        return packed_blocks(data, split, int(c.context))

    def collate(self, model: EHRModel):
        views = pad_collate(model.lm.config.pad_token_id)
        return lambda items: views(items) if isinstance(items[0], dict) else _block_collate(items)

    def loss_for(self, ds: Dataset):
        """The training loss of examples `ds`: next-token, or the objectives' sum."""
        if isinstance(ds, StayViews):
            return lambda model, batch: total(model(batch, "objectives", ds.spec), ds.spec)
        return lambda model, batch: model(batch)

    @torch.no_grad()
    def held_out_parts(
        self, model: EHRModel, ds: Dataset, device: torch.device, bs: int
    ) -> dict[str, float]:
        """Held-out loss of each objective (next-token: token-weighted over blocks;
        objectives over stay views: example-weighted)."""
        parts: dict[str, float] = {}
        count = 0.0
        for batch in DataLoader(ds, batch_size=bs, collate_fn=self.collate(model)):
            batch = to_device(batch, device)
            if isinstance(ds, StayViews):
                n, got = float(batch["input_ids"].shape[0]), model(batch, "objectives", ds.spec)
            else:
                n = float((batch["input_ids"][:, 1:] != model.lm.config.pad_token_id).sum())
                got = {"next_token": model(batch)}
            for k, v in got.items():
                parts[k] = parts.get(k, 0.0) + float(v) * n
            count += n
        return {k: v / max(count, 1.0) for k, v in parts.items()}

    def held_out(self, model: EHRModel, ds: Dataset, device: torch.device, bs: int) -> float:
        """The held-out training loss: next-token (nats), or the objectives' weighted sum."""
        parts = self.held_out_parts(model, ds, device, bs)
        weights = ds.spec.weights if isinstance(ds, StayViews) else {"next_token": 1.0}
        return sum(weights[k] * v for k, v in parts.items())


class Finetune:
    """Multitask prompted finetuning: the first-24 h view closed by every task's token (the
    last `finetune.context` tokens), one binary head reading each. `private`: one example
    per patient (the unit DP-SGD protects), its stay drawn with `seed`."""

    name = "finetune"

    def examples(
        self,
        data: SiteData,
        split: str,
        cfg: DictConfig,
        private: bool = False,
        seed: int = 0,
        progress: float = 0.0,
    ) -> Dataset:
        """`progress` is Pretrain's (stages); finetuning has one."""
        c = cfg.finetune
        return Prompted(data, split, list(c.tasks), int(c.context), private, seed)

    def collate(self, model: EHRModel):
        return pad_collate(model.lm.config.pad_token_id)

    def loss_for(self, ds: Dataset):
        return self.loss

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        # Each row's tasks that count, summed over the number of tasks (every (stay, task)
        # weighs the same), then the batch mean: opacus computes per-sample gradients of a
        # batch-mean loss.
        logits = model(batch, "task")
        per = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch["y"], reduction="none"
        )
        return (per * batch["task_mask"]).sum(1).div(logits.shape[1]).mean()

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
    """(probability, outcome, task index) of every (stay, task) that counts in `ds`, in
    the order of `ds.pairs`."""
    model.eval()
    p, y, k = [], [], []
    pad = model.lm.config.pad_token_id
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=pad_collate(pad)):
        m = batch["task_mask"]
        p.append(torch.sigmoid(model(to_device(batch, device), "task").float()).cpu()[m])
        y.append(batch["y"][m])
        k.append(m.nonzero()[:, 1])
    if not p:
        return np.zeros(0), np.zeros(0), np.zeros(0, int)
    return torch.cat(p).numpy(), torch.cat(y).numpy(), torch.cat(k).numpy()
