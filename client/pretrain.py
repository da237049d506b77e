"""Next-token pretraining on a site's full timelines."""

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from fedclif.client.loop import dp_config, fit, pick_device
from fedclif.client.stage import STAGES
from fedclif.shared.artifact import write_json
from fedclif.shared.models import (
    is_checkpoint,
    load_model,
    save_model,
    setup,
    stage_model,
)
from fedclif.shared.sequences import SiteData

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
    written to `out`. Returns the run's metrics (also in `out/metrics.json`)."""
    out = Path(out)
    device = pick_device(cfg.device)
    if resume and is_checkpoint(out):
        model, _ = load_model(out)
        model.check_data(data.tok.hash, data.path, out)
        setup(model, cfg, "pretrain")  # the head is unused by the LM loss: not trained
    else:  # the same seed, the same initial weights
        model = stage_model(model_cfg, data.tok, cfg, "pretrain", seed=int(cfg.seed))
    c, st = cfg.pretrain, STAGES["pretrain"]
    blocks, val = st.examples(data, "train", cfg), st.examples(data, "val", cfg)
    dp = dp_config(cfg)
    train = st.examples(data, "train", cfg, True, int(cfg.seed)) if dp is not None else blocks
    pad = model.lm.config.pad_token_id
    unigram = unigram_entropy(blocks.tensors[0], pad)
    tokens = int((blocks.tensors[0] != pad).sum())

    def save(st) -> None:
        save_model(model, out, data.tok, "pretrain", {"step": st.step, "val_loss": st.best})

    res = fit(
        model,
        st.loss,
        train,
        st.collate(model),
        c,
        device,
        seed=int(cfg.seed),
        evaluate=lambda: st.held_out(model, val, device, int(c.batch_size)),
        on_improve=save,
        state_file=out / STATE_FILE,
        resume=resume,
        dp=dp,
        workers=int(cfg.workers),
        progress=progress,
    )
    metrics = {
        "site": data.name,
        "train_tokens": tokens,
        "train_blocks": len(train),
        "val_blocks": len(val),
        "unigram_entropy": unigram,
        "best_val_loss": res.state.best,
        "best_val_perplexity": math.exp(res.state.best),
        "final_train_loss": res.train_loss,
        "steps": res.state.step,
        "epochs_done": res.state.epoch,
        "dp": None
        if dp is None
        else {
            "epsilon": res.epsilon,
            "delta": float(dp.delta),
            "noise_multiplier": res.noise_multiplier,
        },
        "history": res.state.history,
    }
    write_json(metrics, out / "metrics.json")
    return metrics
