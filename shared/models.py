"""Backbones (Hugging Face Mamba-2, Mamba, Llama) with EHR embeddings and a task head,
and their checkpoints.

A checkpoint directory is the backbone's `save_pretrained` output (config.json,
model.safetensors: `AutoModelForCausalLM.from_pretrained(ckpt)` loads it) plus
`ehr_embedding.safetensors` and `head.safetensors` when trained, the `tokenizer.json` the
model was trained with, and `fedclif.json` (model config, tokenizer hash, stage). A LoRA
finetune saves only `adapter/` (peft) and the head, and points to its base checkpoint.
"""

import math
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
)

from shared.artifact import read_json, write_json
from shared.errors import FedclifError
from shared.events import TOKEN_TYPES
from shared.sequences import MAX_VISIT
from shared.tokenizer import END, PAD, START, Tokenizer

ARCHS = {
    "mamba2": (Mamba2Config, Mamba2ForCausalLM),
    "mamba": (MambaConfig, MambaForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}
FORMAT, VERSION = "fedclif-checkpoint", 1
META, EHR_FILE, HEAD_FILE, ADAPTER_DIR, TOKENIZER_FILE = (
    "fedclif.json",
    "ehr_embedding.safetensors",
    "head.safetensors",
    "adapter",
    "tokenizer.json",
)


def _sinusoids(x: torch.Tensor, periods: torch.Tensor) -> torch.Tensor:
    angle = x.float().unsqueeze(-1) * (2 * math.pi / periods)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class EHREmbedding(nn.Module):
    """EHRMamba's (arXiv 2405.14567) token-type, time, age and visit embeddings, added to
    the concept embedding. Time and age enter as sinusoids of fixed periods (hours up to a
    year, years up to a century) through a linear map: continuous, so unseen values
    interpolate. Only Embedding/Linear/LayerNorm layers, all of which opacus supports."""

    def __init__(self, hidden: int, n_freq: int = 16):
        super().__init__()
        self.types = nn.Embedding(len(TOKEN_TYPES), hidden)
        self.visit = nn.Embedding(MAX_VISIT + 1, hidden)
        self.time = nn.Linear(2 * n_freq, hidden)
        self.age = nn.Linear(2 * n_freq, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.register_buffer("hour_periods", torch.logspace(0, 4, n_freq), persistent=False)
        self.register_buffer("age_periods", torch.logspace(0, 2.3, n_freq), persistent=False)

    def forward(self, concept: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = (
            self.types(batch["types"])
            + self.visit(batch["visit"])
            + self.time(_sinusoids(batch["hours"], self.hour_periods))
            + self.age(_sinusoids(batch["age"], self.age_periods))
        )
        return self.norm(concept + extra)


class EHRModel(nn.Module):
    """A causal LM backbone, optional EHR embeddings, and one binary head that reads the
    hidden state at the task token closing each prompted sequence."""

    def __init__(
        self, lm: PreTrainedModel, ehr: EHREmbedding | None, spec: dict, tokenizer_hash: str
    ):
        super().__init__()
        self.lm = lm
        self.ehr = ehr
        self.head = nn.Linear(lm.config.hidden_size, 1)
        self.spec = spec  # the model config it was built from, saved with it
        self.tokenizer_hash = tokenizer_hash  # token ids mean nothing under another one

    def check_data(self, data_hash: str, what: str | Path, source: str | Path = "") -> None:
        """Refuse data tokenized with another vocabulary than the model's: ids would
        silently mean other codes. `source`: the checkpoint, for the message."""
        if data_hash != self.tokenizer_hash:
            src = f" {source}" if source else ""
            raise FedclifError(
                f"{what} was tokenized with tokenizer {data_hash[:12]}, but the model{src} "
                f"was trained with {self.tokenizer_hash[:12]}: tokenize it with the "
                f"model's {TOKENIZER_FILE}"
            )

    def forward(self, batch: dict[str, torch.Tensor], head: str = "lm") -> torch.Tensor:
        """`lm`: next-token loss; `task`: one logit per row. One entry point, so that
        wrappers which hook `forward` (opacus) see every training step."""
        return self.lm_loss(batch) if head == "lm" else self.task_logit(batch)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        concept = self.lm.get_input_embeddings()(batch["input_ids"])
        return self.ehr(concept, batch) if self.ehr is not None else concept

    def lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy (nats), padding excluded."""
        labels = batch["input_ids"].masked_fill(
            batch["input_ids"] == self.lm.config.pad_token_id, -100
        )
        return self.lm(inputs_embeds=self.embed(batch), labels=labels, use_cache=False).loss

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lm(inputs_embeds=self.embed(batch), use_cache=False).logits

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer hidden states [batch, length, hidden] (after the final norm)."""
        return self.lm.base_model(inputs_embeds=self.embed(batch), use_cache=False)[0]

    def last_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.hidden(batch)
        return h[torch.arange(h.shape[0], device=h.device), batch["lengths"] - 1]

    def task_logit(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.last_hidden(batch)).squeeze(-1)


def quiet_transformers() -> None:
    """Hide transformers' progress bars, and on CPU its notes that the CUDA kernels are
    missing (noise there; on a GPU they say how to get the fast path)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    if not torch.cuda.is_available():
        logging.set_verbosity_error()


def build_model(cfg: DictConfig, tok: Tokenizer) -> EHRModel:
    """A freshly initialised model for this tokenizer's vocabulary."""
    arch = str(cfg.arch)
    if arch not in ARCHS:
        raise FedclifError(f"unknown model.arch {arch!r}; choose from {', '.join(ARCHS)}")
    shape = OmegaConf.to_container(cfg.shapes[arch])
    if (
        arch == "mamba2"
        and shape["num_heads"] * shape["head_dim"] != shape["expand"] * shape["hidden_size"]
    ):
        raise FedclifError(
            "model.shapes.mamba2: num_heads * head_dim must equal expand * hidden_size "
            f"(got {shape['num_heads']} * {shape['head_dim']} vs "
            f"{shape['expand']} * {shape['hidden_size']})"
        )
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(
        vocab_size=len(tok.vocab),
        pad_token_id=tok.index[PAD],
        bos_token_id=tok.index[START],
        eos_token_id=tok.index[END],
        **shape,
    )
    if arch == "mamba" and not torch.cuda.is_available():
        warnings.warn("model.arch=mamba runs its slow sequential path on CPU", stacklevel=2)
    lm = model_cls(config)
    ehr = EHREmbedding(config.hidden_size) if cfg.ehr_embeddings else None
    return EHRModel(lm, ehr, OmegaConf.to_container(cfg), tok.hash)


# LoRA targets when `lora.target_modules` is null: the blocks' projections (peft refuses
# Mamba's out_proj and conv1d, whose weights the fused kernels read directly).
LORA_TARGETS = {
    "mamba2": ["in_proj"],
    "mamba": ["in_proj", "x_proj", "dt_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def add_lora(model: EHRModel, cfg: DictConfig) -> None:
    """Inject LoRA adapters (peft) into the backbone; only they and the head train."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.target_modules or LORA_TARGETS[model.spec["arch"]])
    lora = LoraConfig(
        r=int(cfg.r),
        lora_alpha=int(cfg.alpha),
        lora_dropout=float(cfg.dropout),
        target_modules=targets,
    )
    _set_peft(model, get_peft_model(model.lm, lora))
    if model.ehr is not None:
        model.ehr.requires_grad_(False)


def _set_peft(model: EHRModel, peft) -> None:
    # peft injects the adapters into model.lm in place; the PeftModel wrapper is kept only
    # to save them, outside the module tree so no parameter is registered twice.
    model.__dict__["peft"] = peft


def n_params(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def save_model(
    model: EHRModel,
    out: str | Path,
    tok: Tokenizer,
    stage: str,
    extra: dict | None = None,
    base: str | Path | None = None,
) -> None:
    """Write a checkpoint. With `base` (LoRA) only the adapters and the head are written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.spec,
        "tokenizer_hash": model.tokenizer_hash,
        "stage": stage,
        "base": str(Path(base).resolve()) if base else None,
        **(extra or {}),
    }
    if base is not None:
        model.peft.save_pretrained(out / ADAPTER_DIR)
    else:
        model.lm.save_pretrained(out)
        if model.ehr is not None:
            save_file(model.ehr.state_dict(), out / EHR_FILE)
    if stage == "finetune":
        save_file(model.head.state_dict(), out / HEAD_FILE)
    tok.save(out / TOKENIZER_FILE)
    write_json(meta, out / META)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EHRModel, dict]:
    """A checkpoint (full or LoRA) and its metadata; its tokenizer is `path/tokenizer.json`."""
    path = Path(path)
    if not (path / META).is_file():
        raise FedclifError(
            f"{path} is not a fedclif checkpoint (no {META}); "
            "make one with `fedclif train pretrain`"
        )
    meta = read_json(path / META, FORMAT, VERSION, "checkpoint")
    if meta.get("base"):
        if not (Path(meta["base"]) / META).is_file():
            raise FedclifError(
                f"{path} holds LoRA adapters for the checkpoint {meta['base']}, "
                "which is not there any more: restore it or finetune again"
            )
        model, _ = load_model(meta["base"], device)
        from peft import PeftModel

        _set_peft(model, PeftModel.from_pretrained(model.lm, path / ADAPTER_DIR))
    else:
        lm = AutoModelForCausalLM.from_pretrained(path)
        spec = meta["model"]
        ehr = EHREmbedding(lm.config.hidden_size) if spec["ehr_embeddings"] else None
        if ehr is not None:
            ehr.load_state_dict(load_file(path / EHR_FILE))
        model = EHRModel(lm, ehr, spec, meta["tokenizer_hash"])
    if (path / HEAD_FILE).is_file():
        model.head.load_state_dict(load_file(path / HEAD_FILE))
    return model.to(device), meta
