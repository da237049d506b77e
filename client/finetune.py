"""Multitask prompted finetuning on the first-24 h view: one copy of each stay per task,
closed by the task token; one binary head reads it. Optional LoRA (peft) and DP-SGD."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from fedclif.client.loop import fit, pick_device, to_device
from fedclif.shared.artifact import write_json
from fedclif.shared.errors import FedclifError
from fedclif.shared.metrics import binary_metrics, f1_threshold
from fedclif.shared.models import EHRModel, load_model, save_model, setup, uses_lora
from fedclif.shared.sequences import Prompted, SiteData, pad_collate


def task_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    # Per-row mean: opacus computes per-sample gradients of a batch-mean loss.
    return torch.nn.functional.binary_cross_entropy_with_logits(model(batch, "task"), batch["y"])


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


def evaluate_tasks(
    model: EHRModel,
    data: SiteData,
    tasks: list[str],
    cfg: DictConfig,
    split: str = "test",
    thresholds: dict[str, float] | None = None,
) -> dict[str, dict]:
    """Per task: AUROC, AUPRC and F1 (at `thresholds`, default: F1-best on `val`) with
    bootstrap 95% intervals, on `split` of `data`."""
    device = next(model.parameters()).device
    c = cfg.finetune
    bs = int(c.batch_size)
    if thresholds is None:
        vp, vy, vk = predict(model, Prompted(data, "val", tasks, int(c.context)), device, bs)
        thresholds = {t: f1_threshold(vy[vk == k], vp[vk == k]) for k, t in enumerate(tasks)}
    p, y, k = predict(model, Prompted(data, split, tasks, int(c.context)), device, bs)
    return {
        t: binary_metrics(
            y[k == i], p[k == i], thresholds[t], n_boot=int(c.n_boot), seed=int(cfg.seed)
        )
        for i, t in enumerate(tasks)
    }


def dp_config(cfg: DictConfig) -> DictConfig | None:
    """The DP-SGD settings when DP is on (dp.epsilon > 0)."""
    return cfg.dp if float(cfg.dp.epsilon) > 0 else None


def finetune(
    data: SiteData,
    base: str | Path,
    cfg: DictConfig,
    out: str | Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Finetune checkpoint `base` on `data`'s train split (early stopping on val), save
    the best to `out` (LoRA: adapters and head only) and evaluate it on the test split.
    `cfg.finetune` picks tasks and peft, `cfg.dp` DP-SGD."""
    out = Path(out)
    device = pick_device(cfg.device)
    model, meta = load_model(base, device)
    model.check_data(data.tok.hash, data.path, base)
    lora = uses_lora(cfg)
    if lora and meta.get("base"):
        raise FedclifError(f"{base} is a LoRA finetune; pass its base model {meta['base']}")
    dp = dp_config(cfg)
    tasks = list(cfg.finetune.tasks)
    setup(model, cfg, "finetune")
    c = cfg.finetune
    train = Prompted(data, "train", tasks, int(c.context), dp is not None, int(cfg.seed))
    val = Prompted(data, "val", tasks, int(c.context))
    if len(train) == 0 or len(val) == 0:
        raise FedclifError(f"{data.path}: no train or val examples for tasks {tasks}")

    def val_loss() -> float:
        p, y, _ = predict(model, val, device, int(c.batch_size))
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    def save(st) -> None:
        extra = {"tasks": tasks, "step": st.step, "val_loss": st.best, "lora": lora}
        save_model(model, out, data.tok, "finetune", extra, base=base if lora else None)

    res = fit(
        model,
        task_loss,
        train,
        pad_collate(model.lm.config.pad_token_id),
        c,
        device,
        seed=int(cfg.seed),
        evaluate=val_loss,
        on_improve=save,
        dp=dp,
        workers=int(cfg.workers),
        progress=progress,
    )
    best, _ = load_model(out, device)
    metrics = {
        "site": data.name,
        "tasks": evaluate_tasks(best, data, tasks, cfg),
        "train_examples": len(train),
        "steps": res.state.step,
        "best_val_loss": res.state.best,
        "lora": lora,
        "dp": None
        if dp is None
        else {
            "epsilon": res.epsilon,
            "delta": float(dp.delta),
            "target_epsilon": float(dp.epsilon),
        },
        "history": res.state.history,
    }
    write_json(metrics, out / "metrics.json")
    return metrics
