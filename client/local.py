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

from fedclif.client.finetune import evaluate_tasks
from fedclif.client.loop import dp_config, fit, pick_device, piece_config
from fedclif.client.stage import stage as stage_of
from fedclif.shared.errors import FedclifError
from fedclif.shared.evaluation.metrics import flat_metrics
from fedclif.shared.model.models import EHRModel, get_weights, setup, trainable
from fedclif.shared.model.objectives import pieces
from fedclif.shared.model.sequences import SiteData


@dataclass
class RoundResult:
    weights: dict[str, np.ndarray]
    metrics: dict[str, float]


def train_round(
    model: EHRModel,
    data: SiteData,
    cfg: DictConfig,
    stage: str,
    seed: int = 0,
    proximal_mu: float = 0.0,
    progress: tuple[float, float] = (0.0, 1.0),
) -> RoundResult:
    """Train `model` in place on `data`'s train split; return its trained weights.
    Pretraining needs `data` loaded with `full=True`. `proximal_mu` > 0 adds FedProx's
    mu/2 * ||w - w_global||^2, anchoring the site to the weights it was sent. `progress`
    (the part of the run the round is, 0 to 1) picks the pretraining stages' objectives:
    a part spanning two stages trains each in turn, on its share of the steps."""
    model.check_data(data.tok.hash, data.path)
    setup(model, cfg, stage)
    device = pick_device(cfg.device)
    st = stage_of(stage)
    dp = dp_config(cfg)
    parts = pieces(cfg.pretrain, *progress) if stage == "pretrain" else [(0.0, 1.0)]
    if len(parts) > 1 and dp is not None:
        raise FedclifError(
            "pretrain.stages: this round spans two stages, and DP-SGD would spend the "
            "whole epsilon on each: make the stages whole rounds (shares of the rounds)"
        )
    steps = 0
    for at, share in parts:  # a round within one stage, or a one-round run of several
        ds = st.examples(data, "train", cfg, dp is not None, seed, at)
        loss = st.loss_for(ds)
        if proximal_mu > 0:
            loss = _proximal(loss, model, proximal_mu)
        c = piece_config(cfg[stage], share, len(ds)) if len(parts) > 1 else cfg[stage]
        res = fit(
            model,
            loss,
            ds,
            st.collate(model),
            c,
            device,
            seed=seed,
            dp=dp,
            workers=int(cfg.workers),
        )
        steps += res.state.step
    metrics = {
        "num_examples": len(ds),
        "train_loss": res.train_loss,
        "steps": steps,
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
    model: EHRModel,
    data: SiteData,
    cfg: DictConfig,
    stage: str,
    split: str = "test",
    boot_seed: int = 0,
) -> dict[str, float]:
    """Held-out metrics of the model as it is: the pretraining loss (next-token, or the
    weighted sum of the last stage's objectives), per-task AUROC/AUPRC/F1 (and the ROC
    curve, a list; resampled with `boot_seed`) for finetuning; flat, with `num_examples`."""
    model.check_data(data.tok.hash, data.path)
    device = pick_device(cfg.device)
    model.to(device).eval()
    if stage == "pretrain":
        st = stage_of(stage)
        blocks = st.examples(data, split, cfg, progress=1.0)  # the last stage's objectives
        loss = st.held_out(model, blocks, device, int(cfg.pretrain.batch_size))
        return {"num_examples": len(blocks), "loss": loss, "perplexity": float(np.exp(loss))}
    tasks = list(cfg.finetune.tasks)
    return flat_metrics(evaluate_tasks(model, data, tasks, cfg, split, boot_seed=boot_seed))
