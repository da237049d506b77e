"""One site's local step of a federated round, importable without Flower.

`train_round` takes a model, a site's tokenized data and the training config, trains it
for the stage's local budget (`epochs`, `max_steps`) and returns the weights that
trained (LoRA adapters and head only under `finetune.peft: lora`) with metrics, among
them `num_examples` for weighting. No global state: the same inputs and seed give the
same weights.
"""

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from client.finetune import dp_config, evaluate_tasks, prepare, task_loss
from client.loop import fit, pick_device
from client.pretrain import block_collate, held_out_loss, lm_loss
from shared.errors import FedclifError
from shared.metrics import flat_metrics
from shared.models import EHRModel
from shared.sequences import Prompted, SiteData, packed_blocks, pad_collate

STAGES = ("pretrain", "finetune")


@dataclass
class RoundResult:
    weights: dict[str, np.ndarray]
    metrics: dict[str, float]


def trainable(model: EHRModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def get_weights(model: EHRModel) -> dict[str, np.ndarray]:
    """The parameters that train in the model's current stage, as numpy arrays."""
    return {n: p.detach().cpu().numpy().copy() for n, p in trainable(model).items()}


def set_weights(model: EHRModel, weights: dict[str, np.ndarray]) -> None:
    """Load arrays from `get_weights` (of this stage's layout), checking names and shapes."""
    own = trainable(model)
    missing, extra = own.keys() - weights.keys(), weights.keys() - own.keys()
    if missing or extra:
        raise FedclifError(
            f"weights do not fit the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}"
        )
    with torch.no_grad():
        for n, p in own.items():
            if tuple(weights[n].shape) != tuple(p.shape):
                raise FedclifError(f"weight {n}: shape {weights[n].shape}, model has {p.shape}")
            p.copy_(torch.from_numpy(np.asarray(weights[n])))


def setup(model: EHRModel, cfg: DictConfig, stage: str) -> None:
    """Fix which parameters train in `stage` (call before `get_weights`/`set_weights`)."""
    if stage not in STAGES:
        raise FedclifError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if stage == "pretrain":
        model.requires_grad_(True)
        model.head.requires_grad_(False)
    else:
        prepare(model, cfg)


def train_round(
    model: EHRModel,
    data: SiteData,
    cfg: DictConfig,
    stage: str,
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> RoundResult:
    """Train `model` in place on `data`'s train split; return its trained weights.
    Pretraining needs `data` loaded with `full=True`. `proximal_mu` > 0 adds FedProx's
    mu/2 * ||w - w_global||^2, anchoring the site to the weights it was sent."""
    model.check_data(data.tok.hash, data.path)
    setup(model, cfg, stage)
    device = pick_device(cfg.device)
    c = cfg[stage]
    if stage == "pretrain":
        ds, collate, loss, dp = (
            packed_blocks(data, "train", int(c.context)),
            block_collate,
            lm_loss,
            None,
        )
    else:
        dp = dp_config(cfg)
        ds = Prompted(data, "train", list(c.tasks), int(c.context), dp is not None, seed)
        collate, loss = pad_collate(model.lm.config.pad_token_id), task_loss
    if proximal_mu > 0:
        loss = _proximal(loss, model, proximal_mu)
    res = fit(model, loss, ds, collate, c, device, seed=seed, dp=dp, workers=int(cfg.workers))
    metrics = {
        "num_examples": len(ds),
        "train_loss": res.train_loss,
        "steps": res.state.step,
    }
    if res.epsilon is not None:
        metrics["epsilon"] = res.epsilon
    return RoundResult(get_weights(model), metrics)


def _proximal(loss_fn, model: EHRModel, mu: float):
    anchor = {n: p.detach().clone() for n, p in trainable(model).items()}

    def loss(m, batch):
        params = trainable(model)
        prox = sum(((params[n] - a) ** 2).sum() for n, a in anchor.items())
        return loss_fn(m, batch) + mu / 2 * prox

    return loss


@torch.no_grad()
def evaluate_round(
    model: EHRModel, data: SiteData, cfg: DictConfig, stage: str, split: str = "test"
) -> dict[str, float]:
    """Held-out metrics of the model as it is: next-token loss for pretraining, per-task
    AUROC/AUPRC/F1 (and the ROC curve, a list) for finetuning; flat, with `num_examples`."""
    model.check_data(data.tok.hash, data.path)
    device = pick_device(cfg.device)
    model.to(device).eval()
    c = cfg[stage]
    if stage == "pretrain":
        blocks = packed_blocks(data, split, int(c.context))
        loss = held_out_loss(model, blocks, device, int(c.batch_size))
        return {"num_examples": len(blocks), "loss": loss, "perplexity": float(np.exp(loss))}
    return flat_metrics(evaluate_tasks(model, data, list(c.tasks), cfg, split))
