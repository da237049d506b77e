"""Pretraining objectives beyond next-token prediction, as weighted losses of the one model.

- `ts_align` (LLM4EHR): a stay's hourly time series (shared/tokens/timeseries.py) and its event
  tokens both pass through the backbone; their hidden states are averaged into
  non-overlapping patches of `patch_hours`; a patch-wise InfoNCE pulls each TS patch
  towards the EHR patch of the same hours (negatives: the stay's other patches, so the
  loss is per stay and DP-SGD can clip it per example), and the omega term pulls together
  TS patches whose EHR patches are alike.
- `ts_recon` (LLM4EHR): each hour's TS hidden state predicts the next hour's values (MSE
  on observed entries only).
- `stay_recon` (MedHMP, stay level): the stay's representation (the hidden state of its
  last token) reconstructs its first `stay_hours` of the grid and its age (MSE, observed
  entries only).
- `masked_codes` (MedHMP, admission level): half of the stay's admission codes
  (shared/tokens/codes.py) are hidden; from the visible ones and the stay's representation the
  model predicts the rest (binary cross-entropy over the hidden and absent codes).
- `code_contrast` (MedHMP, admission level): InfoNCE between a stay's representation and
  the representation of its admission's code set, the batch's other stays as negatives.
  That couples examples: no per-sample gradient, so it is refused under DP-SGD.

Every loss but `code_contrast` is a mean over stays of a per-stay loss (0 for a stay with
nothing to score), which is what opacus' per-sample clipping assumes. Written here, not
taken from a library: no maintained package implements these losses for a causal EHR
backbone (LLM4EHR and MedHMP publish research code only).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fedclif.shared.errors import FedclifError
from fedclif.shared.model.embedding import sinusoids

OBJECTIVES = ("next_token", "ts_align", "ts_recon", "stay_recon", "masked_codes", "code_contrast")
# Objectives whose loss couples the examples of a batch (in-batch negatives).
IN_BATCH = ("code_contrast",)
TS_OBJECTIVES = ("ts_align", "ts_recon")
CODE_OBJECTIVES = ("masked_codes", "code_contrast")
# The heads each objective reaches (ObjectiveHeads' attributes).
USES = {
    "ts_align": ("ts_in", "ts_time", "ts_norm", "proj_ts", "proj_ehr"),
    "ts_recon": ("ts_in", "ts_time", "ts_norm", "ts_out"),
    "stay_recon": ("stay_out",),
    "masked_codes": ("code_in", "code_out"),
    "code_contrast": ("code_in", "code_proj", "stay_proj"),
}


@dataclass(frozen=True)
class Spec:
    """What the losses need besides the batch: `pretrain.ts` and each objective's weight."""

    weights: dict[str, float]
    patch_hours: int
    tau: float
    stay_hours: int
    mask_rate: float
    contrast_tau: float
    # DP-SGD (opacus) needs a per-sample gradient, zero or not, for every parameter that
    # trains: with `private`, parts no active objective reaches get a zero one.
    private: bool = False

    @classmethod
    def of(cls, c: DictConfig, weights: dict[str, float], private: bool = False) -> "Spec":
        ts = c.ts
        if int(ts.stay_hours) > int(ts.hours):
            raise FedclifError(
                f"pretrain.ts.stay_hours ({ts.stay_hours}) must not exceed pretrain.ts.hours "
                f"({ts.hours}), the hours of the grid read per stay"
            )
        return cls(
            dict(weights),
            int(ts.patch_hours),
            float(ts.tau),
            int(ts.stay_hours),
            float(ts.mask_rate),
            float(ts.contrast_tau),
            private,
        )


def _weights(raw, where: str) -> dict[str, float]:
    raw = OmegaConf.to_container(raw) if isinstance(raw, DictConfig) else dict(raw or {})
    bad = [k for k in raw if k not in OBJECTIVES]
    if bad:
        raise FedclifError(
            f"{where}: unknown objective(s) {bad}; choose from {', '.join(OBJECTIVES)}"
        )
    w = {k: float(v) for k, v in raw.items()}
    if any(v < 0 for v in w.values()) or not any(v > 0 for v in w.values()):
        raise FedclifError(f"{where}: weights must be >= 0 with at least one > 0, got {w}")
    return {k: v for k, v in w.items() if v > 0}


def stages(c: DictConfig) -> list[tuple[dict[str, float], float]]:
    """(objective weights, share of the run) of each pretraining stage, in order:
    `pretrain.stages` (MedHMP's stay level, then admission level), or one stage of
    `pretrain.objectives`."""
    if not c.get("stages"):
        return [(_weights(c.objectives, "pretrain.objectives"), 1.0)]
    out = []
    for i, s in enumerate(c.stages):
        where = f"pretrain.stages[{i}]"
        if "objectives" not in s or float(s.get("share", 0)) <= 0:
            raise FedclifError(f"{where}: give `objectives` (name: weight) and a `share` > 0")
        out.append((_weights(s.objectives, f"{where}.objectives"), float(s.share)))
    total = sum(share for _, share in out)
    if abs(total - 1) > 1e-6:
        raise FedclifError(f"pretrain.stages: the shares sum to {total:g}, not 1")
    return out


def weights_at(c: DictConfig, progress: float) -> dict[str, float]:
    """The objective weights at `progress` (0 to 1) through the run."""
    done = 0.0
    for weights, share in stages(c):
        done += share
        if progress < done - 1e-9:
            return weights
    return stages(c)[-1][0]


def pieces(c: DictConfig, start: float = 0.0, end: float = 1.0) -> list[tuple[float, float]]:
    """The stages overlapping the part [start, end) of the run, as (progress at the
    piece's middle, the piece's share of the part): a federated round is one part, a
    local run or a one-round lane the whole (each stage in turn)."""
    out, lo = [], 0.0
    for _, share in stages(c):
        a, b = max(lo, start), min(lo + share, end)
        if b - a > 1e-9:
            out.append(((a + b) / 2, (b - a) / (end - start)))
        lo += share
    return out


def heads_needed(c: DictConfig) -> tuple[str, ...]:
    """The objectives, over every stage, that need heads (all but next-token), in order."""
    used = {k for weights, _ in stages(c) for k in weights}
    return tuple(k for k in OBJECTIVES if k in used and k != "next_token")


def check_private(c: DictConfig) -> None:
    """Refuse objectives without per-sample gradients under DP-SGD."""
    coupled = [k for k in heads_needed(c) if k in IN_BATCH]
    if coupled:
        raise FedclifError(
            f"pretrain objective(s) {coupled} contrast each stay with the batch's other "
            "stays, so a stay's gradient is not its own and DP-SGD cannot clip it: set their "
            "weight to 0 (e.g. train.pretrain.objectives.code_contrast=0) or train without DP"
        )


class ObjectiveHeads(nn.Module):
    """The heads and encoders of the objectives in `names` (only theirs are built): the TS
    patch encoder (values and mask of an hour, plus its time, to the hidden size),
    projections, reconstruction and code heads. Linear and LayerNorm only (opacus)."""

    def __init__(
        self,
        hidden: int,
        n_series: int,
        n_targets: int,
        stay_hours: int,
        names: tuple[str, ...],
        n_freq: int = 16,
    ):
        super().__init__()
        if (set(names) & set(TS_OBJECTIVES) or "stay_recon" in names) and n_series == 0:
            raise FedclifError(
                f"objective(s) {list(names)} read the hourly time series, but the "
                "tokenizer has no variable with cut points (tokenizer.timeseries)"
            )
        if set(names) & set(CODE_OBJECTIVES) and n_targets == 0:
            raise FedclifError(
                f"objective(s) {list(names)} predict admission codes, but the tokenizer has "
                "none: no site has hospital_diagnosis or medication tables, or every code "
                "is rarer than tokenizer.k_min_count"
            )
        self.n_freq = n_freq
        if set(names) & set(TS_OBJECTIVES):
            self.ts_in = nn.Linear(2 * n_series, hidden)
            self.ts_time = nn.Linear(2 * n_freq, hidden)
            self.ts_norm = nn.LayerNorm(hidden)
        if "ts_align" in names:
            self.proj_ts, self.proj_ehr = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        if "ts_recon" in names:
            self.ts_out = nn.Linear(hidden, n_series)
        if "stay_recon" in names:
            self.stay_out = nn.Linear(hidden, stay_hours * n_series + 1)
        if set(names) & set(CODE_OBJECTIVES):
            self.code_in = nn.Linear(n_targets, hidden, bias=False)
        if "masked_codes" in names:
            self.code_out = nn.Linear(hidden, n_targets)
        if "code_contrast" in names:
            self.code_proj, self.stay_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def encode_series(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, H, V] values and mask -> [B, H, hidden] inputs of the backbone."""
        hours = torch.arange(values.shape[1], device=values.device).expand(values.shape[:2])
        x = self.ts_in(torch.cat([values, mask.to(values.dtype)], dim=-1))
        return self.ts_norm(x + self.ts_time(sinusoids(hours, 4, self.n_freq)))


# --- the losses: functions of tensors, tested against loop-written references ---------


def patch_pool(h: torch.Tensor, patch: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the rows of `h` [B, L, D] in each of `n` patches; `patch` [B, L] gives each
    row's patch (< 0 or >= n: in none). Returns ([B, n, D], present [B, n])."""
    onehot = F.one_hot(patch.clamp(0, n).long(), n + 1)[..., :n].to(h.dtype)
    onehot = onehot * (patch >= 0).unsqueeze(-1).to(h.dtype)
    count = onehot.sum(1)
    pooled = torch.einsum("blp,bld->bpd", onehot, h) / count.clamp(min=1).unsqueeze(-1)
    return pooled, count > 0


def _masked_rows(sim: torch.Tensor, valid: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """`sim` [B, P, P] with columns of absent patches (and the diagonal unless
    `diagonal`) at -inf."""
    keep = valid.unsqueeze(1).expand_as(sim)
    if not diagonal:
        keep = keep & ~torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
    return sim.masked_fill(~keep, float("-inf"))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


def _per_stay_mean(loss: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each stay's mean over its scored `rows` (0 without any)."""
    rows = rows.to(loss.dtype)
    per = (loss * rows).flatten(1).sum(1) / rows.flatten(1).sum(1).clamp(min=1)
    return per.mean()


def patch_nce(v: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """LLM4EHR's patch InfoNCE: TS patch i against the EHR patches k of the same stay,
    positive k = i; over patches present in both views, stays with at least two."""
    logits = _masked_rows(_cosine(v, z) / tau, valid, diagonal=True)
    rows = valid & (valid.sum(1, keepdim=True) >= 2)
    logp = torch.log_softmax(logits.masked_fill(~rows.unsqueeze(-1), 0.0), dim=-1)
    loss = -torch.diagonal(logp, dim1=1, dim2=2)
    return _per_stay_mean(loss.masked_fill(~rows, 0.0), rows)


def omega(z: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """omega_ij = softmax over k != i (present) of cos(z_i, z_k), at j: how alike EHR
    patches i and j are; 0 on the diagonal and at absent patches."""
    sim = _masked_rows(_cosine(z, z), valid, diagonal=False)
    rows = valid.unsqueeze(-1) & (valid.sum(1, keepdim=True) >= 2).unsqueeze(-1)
    return torch.softmax(sim.masked_fill(~rows, 0.0), dim=-1) * rows * valid.unsqueeze(1)


def omega_loss(v: torch.Tensor, z: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """L_omega = -sum_i sum_{j<i} omega_ij log softmax_{k!=i}(cos(v_i, v_k)/tau)_j, averaged
    over each stay's patches that have an earlier one. omega is a target (no gradient
    through it)."""
    w = omega(z.detach(), valid)
    sim = _masked_rows(_cosine(v, v) / tau, valid, diagonal=False)
    rows = valid & (valid.sum(1, keepdim=True) >= 2)
    logp = torch.log_softmax(sim.masked_fill(~rows.unsqueeze(-1), 0.0), dim=-1)
    pairs = torch.tril(torch.ones_like(w, dtype=torch.bool), diagonal=-1) & (w > 0)
    terms = torch.where(pairs, w * logp, torch.zeros_like(w))
    return _per_stay_mean(-terms.sum(-1), rows & pairs.any(-1))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over stays of the MSE over their observed entries (`mask`) only."""
    return _per_stay_mean((pred - target) ** 2 * mask, mask)


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE of row i of `a` with row i of `b`, other rows as negatives."""
    logits = _cosine(a, b) / tau
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def losses(model, batch: dict[str, torch.Tensor], spec: Spec) -> dict[str, torch.Tensor]:
    """Each weighted objective's loss on a batch of stay views (shared/model/sequences.py
    `StayViews`): one backbone pass over the tokens, one over the series when needed."""
    heads, w = model.pretrain_heads, spec.weights
    h = model.hidden(batch)
    out: dict[str, torch.Tensor] = {}
    real = torch.arange(h.shape[1], device=h.device) < batch["lengths"].unsqueeze(1)
    if "next_token" in w:
        logits = model.lm.get_output_embeddings()(h[:, :-1])
        target = batch["input_ids"][:, 1:].masked_fill(~real[:, 1:], -100)
        out["next_token"] = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
    rep = h[torch.arange(h.shape[0], device=h.device), batch["lengths"] - 1]
    values, mask = batch["grid"], batch["grid_mask"]
    if "ts_align" in w or "ts_recon" in w:
        hts = model.lm.base_model(inputs_embeds=heads.encode_series(values, mask), use_cache=False)[
            0
        ]
    if "ts_align" in w:
        n = values.shape[1] // spec.patch_hours
        hour = torch.arange(values.shape[1], device=h.device).expand(values.shape[:2])
        ts_patch = torch.where(mask.any(-1), hour // spec.patch_hours, -1)
        ehr_patch = torch.where(real, (batch["hours"] // spec.patch_hours).long(), -1)
        v, v_ok = patch_pool(hts, ts_patch, n)
        z, z_ok = patch_pool(h, ehr_patch, n)
        v, z, valid = heads.proj_ts(v), heads.proj_ehr(z), v_ok & z_ok
        out["ts_align"] = patch_nce(v, z, valid, spec.tau) + omega_loss(v, z, valid, spec.tau)
    if "ts_recon" in w:
        out["ts_recon"] = masked_mse(heads.ts_out(hts[:, :-1]), values[:, 1:], mask[:, 1:])
    if "stay_recon" in w:
        k = spec.stay_hours
        grid = values[:, :k].flatten(1)
        age = (batch["age"][:, :1] - 60.0) / 20.0
        target = torch.cat([grid, age], dim=1)
        seen = torch.cat([mask[:, :k].flatten(1), torch.ones_like(age, dtype=torch.bool)], 1)
        out["stay_recon"] = masked_mse(heads.stay_out(rep), target, seen)
    codes = batch["codes"]
    has = codes.sum(1) > 0
    if "masked_codes" in w:
        keep = (torch.rand_like(codes) >= spec.mask_rate).to(codes.dtype)
        visible = codes * keep
        bag = heads.code_in(visible / visible.sum(1, keepdim=True).clamp(min=1))
        logits = heads.code_out(torch.tanh(bag + rep))
        bce = F.binary_cross_entropy_with_logits(logits, codes, reduction="none")
        scored = (1 - visible) * has.unsqueeze(1).to(codes.dtype)
        out["masked_codes"] = _per_stay_mean(bce * scored, scored)
    if "code_contrast" in w:
        if int(has.sum()) >= 2:
            c = codes[has]
            bag = heads.code_in(c / c.sum(1, keepdim=True))
            out["code_contrast"] = info_nce(
                heads.stay_proj(rep[has]), heads.code_proj(bag), spec.contrast_tau
            )
        else:  # nothing to contrast: a zero that still reaches the heads
            out["code_contrast"] = rep.sum() * 0.0
    if spec.private:
        first = next(iter(out))
        out[first] = out[first] + _untouched(model, spec, h)
    return out


def _untouched(model, spec: Spec, h: torch.Tensor) -> torch.Tensor:
    """A zero that depends on the token pass `h` (which objectives on the series alone
    leave out), on every head the active objectives leave out and on the LM head without
    next-token (heads fed zeros): each gets a zero per-sample gradient."""
    used = {m for k in spec.weights for m in USES.get(k, ())}
    parts = [(name, m) for name, m in model.pretrain_heads.named_children() if name not in used]
    if "next_token" not in spec.weights:
        parts.append(("lm_head", model.lm.get_output_embeddings()))
    zero = h.sum() * 0.0
    for _, m in parts:
        width = m.in_features if isinstance(m, nn.Linear) else m.normalized_shape[0]
        zero = zero + m(h.new_zeros(h.shape[0], width)).sum() * 0.0
    return zero


def total(parts: dict[str, torch.Tensor], spec: Spec) -> torch.Tensor:
    return sum(spec.weights[k] * v for k, v in parts.items())
