"""The one optimisation loop behind pretraining, finetuning and a federated round:
AdamW with warmup then a cosine, linear or constant learning rate, gradient accumulation
and clipping, periodic held-out evaluation with early stopping, resumable state, optional
DP-SGD (opacus)."""

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import get_scheduler

from fedclif.shared.errors import FedclifError
from fedclif.shared.model.models import seed_everything

Batch = dict[str, torch.Tensor]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedclifError(f"device={name} asked for, but torch sees no CUDA device")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on GPU; full precision on CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class EpochShuffle(Sampler[int]):
    """A fresh permutation per epoch, drawn from (seed, epoch): a resumed run sees the
    same order as an uninterrupted one, so it can skip what it already did."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.start :].tolist())

    def __len__(self) -> int:
        return self.n - self.start


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float = float("inf")
    bad_evals: int = 0
    history: list[dict] = field(default_factory=list)
    done: bool = False


@dataclass
class LoopResult:
    state: LoopState
    train_loss: float
    examples: int
    epsilon: float | None = None
    # DP-SGD's Gaussian noise, as a multiple of the clipping norm (what reached epsilon).
    noise_multiplier: float | None = None


def piece_config(c: DictConfig, share: float, n_examples: int) -> DictConfig:
    """Stage section `c` for `share` of its run's steps over `n_examples` (as `fit`
    counts them): a pretraining stage's piece of a run or of a round."""
    total = total_steps(math.ceil(n_examples / int(c.batch_size)), c)
    return OmegaConf.merge(c, {"max_steps": max(1, round(share * total))})


def total_steps(n_batches: int, c: DictConfig) -> int:
    """Optimizer steps of stage section `c` over `n_batches` batches an epoch: its epochs
    (at least one step each), at most `max_steps` when that is set."""
    total = max(n_batches // int(c.grad_accum), 1) * int(c.epochs)
    return min(total, int(c.max_steps)) if int(c.max_steps) > 0 else total


def dp_config(cfg: DictConfig) -> DictConfig | None:
    """The DP-SGD settings when DP is on (dp.epsilon > 0)."""
    return cfg.dp if float(cfg.dp.epsilon) > 0 else None


def fit(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor],
    train_set: Dataset,
    collate: Callable,
    cfg: DictConfig,
    device: torch.device,
    *,
    seed: int = 0,
    evaluate: Callable[[], float] | None = None,
    on_improve: Callable[[LoopState], None] | None = None,
    state_file: Path | None = None,
    resume: bool = False,
    dp: DictConfig | None = None,
    workers: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> LoopResult:
    """Train the parameters of `model` that require grad on `loss_fn(model, batch)`.

    `cfg` is a stage section of configs/train.yaml. `evaluate()` returns a held-out loss;
    when it improves `on_improve` runs (the caller saves the model), and after `patience`
    evaluations without improvement training stops. `state_file` receives the full
    training state at every evaluation; `resume` continues from it.
    """
    seed_everything(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    sampler = EpochShuffle(len(train_set), seed)
    loader = DataLoader(
        train_set,
        batch_size=int(cfg.batch_size),
        sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    accum = int(cfg.grad_accum)
    total = total_steps(len(loader), cfg)
    engine = None
    if dp is not None:
        engine, model, opt, loader = _private(model, opt, loader, cfg, dp, resume)
    sched = _scheduler(cfg, opt, total)
    st = LoopState()
    if resume:
        st = _load_state(state_file, model, opt, sched)
    patience = int(cfg.patience)
    eval_every = int(cfg.eval_every)
    losses: list[float] = []
    seen = 0

    def checkpoint() -> None:
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad(), autocast(device):
            val = float(evaluate())
        model.train()
        st.history.append({"step": st.step, "epoch": st.epoch, "val_loss": val})
        if val < st.best - 1e-4:
            st.best, st.bad_evals = val, 0
            if on_improve:
                on_improve(st)
        else:
            st.bad_evals += 1
            st.done = patience > 0 and st.bad_evals >= patience
        if state_file is not None:
            _save_state(state_file, st, model, opt, sched)

    while not st.done and st.step < total and st.epoch < int(cfg.epochs):
        sampler.epoch = st.epoch
        sampler.start = st.batch_in_epoch * int(cfg.batch_size)  # resumed: skip what was done
        for i, batch in enumerate(loader, start=st.batch_in_epoch):
            if batch["input_ids"].shape[0] == 0:
                # Poisson sampling (DP) drew no one: probability (1 - q)^N, negligible at
                # any realistic N; the step is skipped rather than run on an empty batch.
                continue
            with autocast(device):
                loss = loss_fn(model, to_device(batch, device))
            (loss / accum).backward()
            losses.append(float(loss.detach()))
            seen += int(batch["input_ids"].shape[0])
            st.batch_in_epoch = i + 1
            if (i + 1) % accum:
                continue
            if engine is None:
                torch.nn.utils.clip_grad_norm_(params, float(cfg.max_grad_norm))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            st.step += 1
            if progress:
                progress(st.step, total, losses[-1])
            if eval_every > 0 and st.step % eval_every == 0:
                checkpoint()
            if st.done or st.step >= total:
                break
        else:
            st.epoch += 1
            st.batch_in_epoch = 0
            if eval_every <= 0 or st.step % eval_every:
                checkpoint()
            continue
        break
    if not st.history or st.history[-1]["step"] != st.step:
        checkpoint()
    eps = engine.get_epsilon(float(dp.delta)) if engine is not None else None
    recent = losses[-max(len(losses) // 10, 1) :] if losses else [float("nan")]
    noise = float(opt.noise_multiplier) if engine is not None else None
    return LoopResult(st, float(np.mean(recent)), seen, eps, noise)


def _private(model, opt, loader, cfg: DictConfig, dp: DictConfig, resume: bool):
    """Opacus's DP-SGD around the model, optimizer and loader (Poisson sampling, per-sample
    clipping, noise for `dp.epsilon` over the stage's epochs): (engine, model, opt,
    loader)."""
    if resume:
        raise FedclifError("resuming a DP-SGD run is not supported: start it again")
    if int(cfg.grad_accum) != 1:
        raise FedclifError("DP-SGD runs take grad_accum=1 (raise batch_size instead)")
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=opt,
        data_loader=loader,
        target_epsilon=float(dp.epsilon),
        target_delta=float(dp.delta),
        epochs=int(cfg.epochs),
        max_grad_norm=float(dp.max_grad_norm),
        grad_sample_mode="hooks",
    )
    return engine, model, opt, loader


def _scheduler(cfg: DictConfig, opt, total: int):
    """The learning-rate schedule over `total` steps (warmup at most half of them)."""
    try:
        return get_scheduler(str(cfg.schedule), opt, min(int(cfg.warmup_steps), total // 2), total)
    except ValueError as e:
        raise FedclifError(
            f"schedule={cfg.schedule!r}: use cosine, linear or constant_with_warmup"
        ) from e


def _save_state(path: Path, st: LoopState, model, opt, sched) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "state": st.__dict__,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(path)  # a crash mid-write leaves the previous state intact


def _load_state(path: Path | None, model, opt, sched) -> LoopState:
    if path is None or not path.is_file():
        raise FedclifError(f"nothing to resume: {path} does not exist (start without --resume)")
    raw = torch.load(path, weights_only=False)
    model.load_state_dict(raw["model"])
    opt.load_state_dict(raw["optimizer"])
    sched.load_state_dict(raw["scheduler"])
    torch.set_rng_state(raw["torch_rng"])
    st = LoopState(**raw["state"])
    st.done = False
    return st
