"""Pretraining on a site's full timelines: next-token prediction, and the objectives of
shared/model/objectives.py when configured."""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from fedclif.client.loop import dp_config, fit, pick_device, piece_config
from fedclif.client.stage import STAGES
from fedclif.shared.artifact import write_json
from fedclif.shared.errors import FedclifError
from fedclif.shared.model.models import (
    is_checkpoint,
    load_model,
    save_model,
    setup,
    stage_model,
)
from fedclif.shared.model.objectives import pieces, weights_at
from fedclif.shared.model.sequences import SiteData, packed_blocks

STATE_FILE = "train_state.pt"


def unigram_entropy(ids: torch.Tensor, pad_id: int) -> float:
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context."""
    ids = ids[ids != pad_id].numpy()
    p = np.bincount(ids) / ids.size
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def pretrain(
    data: SiteData,
    model_cfg: DictConfig,
    cfg: DictConfig,
    out: str | Path,
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Pretrain a new model (or resume one) on `data`; the best held-out checkpoint is
    written to `out`. Stages (`pretrain.stages`) run one after the other, each with its
    objectives and share of the steps; the last stage's best is kept. Returns the run's
    metrics (also in `out/metrics.json`)."""
    out = Path(out)
    device = pick_device(cfg.device)
    c, st = cfg.pretrain, STAGES["pretrain"]
    plan = pieces(c)
    dp = dp_config(cfg)
    if len(plan) > 1 and (resume or dp is not None):
        raise FedclifError(
            "pretrain.stages: a staged run can neither resume nor run under DP-SGD (each "
            "stage would spend the whole epsilon); run the stages as separate commands"
        )
    model = _first_model(data, model_cfg, cfg, out, resume)
    first = st.examples(data, "train", cfg, dp is not None, int(cfg.seed), plan[0][0])
    # The training tokens' statistics read packed blocks: next-token runs train on them.
    blocks = (
        first if isinstance(first, TensorDataset) else packed_blocks(data, "train", int(c.context))
    )
    pad = model.lm.config.pad_token_id
    unigram = unigram_entropy(blocks.tensors[0], pad)
    tokens = int((blocks.tensors[0] != pad).sum())
    history, runs = [], []
    for i, (at, share) in enumerate(plan):
        train = (
            first if i == 0 else st.examples(data, "train", cfg, dp is not None, int(cfg.seed), at)
        )
        val = st.examples(data, "val", cfg, progress=at)
        weights = weights_at(c, at)
        sc = piece_config(c, share, len(train)) if len(plan) > 1 else c

        def save(state, weights=weights) -> None:
            extra = {"step": state.step, "val_loss": state.best, "objectives": weights}
            save_model(model, out, data.tok, "pretrain", extra)

        res = fit(
            model,
            st.loss_for(train),
            train,
            st.collate(model),
            sc,
            device,
            seed=int(cfg.seed),
            evaluate=lambda val=val: st.held_out(model, val, device, int(c.batch_size)),
            on_improve=save,
            state_file=out / STATE_FILE,
            resume=resume,
            dp=dp,
            workers=int(cfg.workers),
            progress=progress,
        )
        runs.append((res, train, val, weights))
        history += [{**h, "objectives": weights} for h in res.state.history]
    seen = {"train_tokens": tokens, "unigram_entropy": unigram, "history": history}
    metrics = _metrics(data, cfg, out, device, runs, plan, seen)
    write_json(metrics, out / "metrics.json")
    return metrics


def _first_model(data: SiteData, model_cfg: DictConfig, cfg: DictConfig, out: Path, resume: bool):
    """The model a run starts from: the checkpoint in `out` (resume), else fresh weights
    of the run's seed (the same seed, the same initial weights)."""
    if resume and is_checkpoint(out):
        model, _ = load_model(out)
        model.check_data(data.tok.hash, data.path, out)
        setup(model, cfg, "pretrain")  # the task head is unused here: not trained
        return model
    return stage_model(model_cfg, data.tok, cfg, "pretrain", seed=int(cfg.seed))


def _metrics(
    data: SiteData, cfg: DictConfig, out: Path, device, runs: list, plan: list, seen: dict
) -> dict:
    """The run's metrics: its kept checkpoint's held-out losses, its last stage's
    training, steps over every stage, what DP-SGD spent, and `seen` (the training tokens'
    count and unigram entropy, the evaluation history)."""
    c, st = cfg.pretrain, STAGES["pretrain"]
    dp = dp_config(cfg)
    res, train, val, weights = runs[-1]
    final, _ = load_model(out)
    parts = st.held_out_parts(final.to(device), val, device, int(c.batch_size))
    return {
        "site": data.name,
        "objectives": [weights_at(c, at) for at, _ in plan] if len(plan) > 1 else weights,
        "train_tokens": seen["train_tokens"],
        "train_examples": len(train),
        "val_examples": len(val),
        "unigram_entropy": seen["unigram_entropy"],
        "best_val_loss": res.state.best,
        # The kept checkpoint's held-out loss per objective (next-token in nats).
        "val_losses": parts,
        "best_val_perplexity": math.exp(parts["next_token"]) if "next_token" in parts else None,
        "final_train_loss": res.train_loss,
        "steps": sum(r.state.step for r, *_ in runs),
        "epochs_done": res.state.epoch,
        "dp": None
        if dp is None
        else {
            "epsilon": res.epsilon,
            "delta": float(dp.delta),
            "noise_multiplier": res.noise_multiplier,
        },
        "history": seen["history"],
    }
