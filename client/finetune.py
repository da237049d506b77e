"""Multitask prompted finetuning on the first-24 h view closed by every task's token;
one binary head reads each. Optional LoRA (peft) and DP-SGD."""

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from fedclif.client.loop import dp_config, fit, pick_device
from fedclif.client.stage import STAGES, predict
from fedclif.shared.artifact import write_json
from fedclif.shared.errors import FedclifError
from fedclif.shared.evaluation.calibration import calibration, platt
from fedclif.shared.evaluation.metrics import binary_metrics, f1_threshold
from fedclif.shared.model.models import EHRModel, load_model, save_model, setup, uses_lora
from fedclif.shared.model.sequences import Prompted, SiteData


def evaluate_tasks(
    model: EHRModel,
    data: SiteData,
    tasks: list[str],
    cfg: DictConfig,
    split: str = "test",
    thresholds: dict[str, float] | None = None,
    boot_seed: int = 0,
) -> dict[str, dict]:
    """Per task: AUROC, AUPRC and F1 (at `thresholds`, default: F1-best on `val`) with
    bootstrap 95% intervals, on `split` of `data`; and calibration (Brier, ECE, the
    reliability curve) on its test stays, as predicted and after Platt recalibration on
    the site's val split (`_recal`). The resamples use `boot_seed` whatever the run's
    seed: every model scored on these stays gets the same ones, so its intervals and
    replicates (`finetune.boot_replicates`) pair with any other's. (A deployed site's is
    its own secret: client/app.py.)"""
    device = next(model.parameters()).device
    c = cfg.finetune
    bs, n_boot = int(c.batch_size), int(c.n_boot)
    vp, vy, vk = predict(model, Prompted(data, "val", tasks, int(c.context)), device, bs)
    if thresholds is None:
        thresholds = {t: f1_threshold(vy[vk == k], vp[vk == k]) for k, t in enumerate(tasks)}
    ds = Prompted(data, split, tasks, int(c.context))
    p, y, k = predict(model, ds, device, bs)
    # Calibration on test stays only: with split "all" the val stays fit the recalibration.
    test = data.stays.get_column("split").to_numpy()[data.rows(split)][ds.pairs[:, 0]] == "test"
    out = {}
    for i, t in enumerate(tasks):
        m = k == i
        reps = bool(c.boot_replicates)
        out[t] = binary_metrics(y[m], p[m], thresholds[t], n_boot, boot_seed, reps)
        yt, pt = y[m & test], p[m & test]
        out[t] |= calibration(yt, pt, n_boot, boot_seed)
        recal = platt(vy[vk == i], vp[vk == i])
        if recal is not None:
            out[t] |= calibration(yt, recal(pt), n_boot, boot_seed, suffix="_recal")
    return out


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
    c, st = cfg.finetune, STAGES["finetune"]
    train = st.examples(data, "train", cfg, dp is not None, int(cfg.seed))
    val = st.examples(data, "val", cfg)
    if len(train) == 0 or len(val) == 0:
        raise FedclifError(f"{data.path}: no train or val examples for tasks {tasks}")

    def save(state) -> None:
        extra = {"tasks": tasks, "step": state.step, "val_loss": state.best, "lora": lora}
        save_model(model, out, data.tok, "finetune", extra, base=base if lora else None)

    res = fit(
        model,
        st.loss_for(train),
        train,
        st.collate(model),
        c,
        device,
        seed=int(cfg.seed),
        evaluate=lambda: st.held_out(model, val, device, int(c.batch_size)),
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
            "noise_multiplier": res.noise_multiplier,
            "max_grad_norm": float(dp.max_grad_norm),
            "delta": float(dp.delta),
            "target_epsilon": float(dp.epsilon),
        },
        "history": res.state.history,
    }
    write_json(metrics, out / "metrics.json")
    return metrics
