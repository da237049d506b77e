"""The EHR model (a Hugging Face backbone, EHR embeddings and a task head) as one
transformers `PreTrainedModel`, its assembly for a training stage, the weights that travel
between sites and the server, and checkpoints.

A checkpoint is `save_pretrained` output (config.json, model.safetensors) plus the
`tokenizer.json` the model was trained with. `EHRConfig` is registered with transformers'
Auto classes when this module is imported, so `AutoModel.from_pretrained(ckpt)` loads the
whole model, EHR embeddings and head included. A LoRA finetune saves only `adapter/`
(peft), the head and `fedclif.json`, which points to its base checkpoint.
"""

import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from fedclif.shared.artifact import read_json, write_json
from fedclif.shared.errors import FedclifError
from fedclif.shared.model.embedding import EHREmbedding
from fedclif.shared.model.objectives import ObjectiveHeads, Spec, heads_needed, losses
from fedclif.shared.tokens.timeseries import variables
from fedclif.shared.tokens.tokenizer import END, PAD, START, Tokenizer

ARCHS = {
    "mamba2": (Mamba2Config, Mamba2ForCausalLM),
    "mamba": (MambaConfig, MambaForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}
STAGES = ("pretrain", "finetune")
# A LoRA checkpoint: peft's adapter directory, the head, and fedclif.json naming its base.
FORMAT, VERSION = "fedclif-lora", 1
META, HEAD_FILE, ADAPTER_DIR, TOKENIZER_FILE = (
    "fedclif.json",
    "head.safetensors",
    "adapter",
    "tokenizer.json",
)


class EHRConfig(PretrainedConfig):
    """The whole EHR model: `arch` and its transformers config (`backbone`), whether EHR
    embeddings are on, the fedclif model config it was built from (`spec`), the hash of
    the tokenizer whose ids it reads, the training `stage` it was saved after, what
    training recorded (`training`: step, validation loss, tasks) and the pretraining
    objectives it has heads for (`objectives`, with the grid's `n_series`, the tokenizer's
    `n_targets` and `stay_hours`: shared/model/objectives.py)."""

    model_type = "fedclif-ehr"

    def __init__(
        self,
        arch: str = "mamba2",
        backbone: dict | None = None,
        ehr_embeddings: bool = True,
        spec: dict | None = None,
        tokenizer_hash: str = "",
        stage: str = "pretrain",
        training: dict | None = None,
        objectives: list | None = None,
        n_series: int = 0,
        n_targets: int = 0,
        stay_hours: int = 24,
        **kwargs,
    ):
        self.arch, self.backbone = arch, dict(backbone or {})
        self.ehr_embeddings, self.spec = ehr_embeddings, dict(spec or {})
        self.tokenizer_hash, self.stage = tokenizer_hash, stage
        self.training = dict(training or {})
        self.objectives, self.n_series = list(objectives or []), n_series
        self.n_targets, self.stay_hours = n_targets, stay_hours
        super().__init__(**kwargs)


class EHRModel(PreTrainedModel):
    """A causal LM backbone, optional EHR embeddings, one binary head that reads the
    hidden state at each task token closing a prompted sequence, and the heads of the
    pretraining objectives beyond next-token prediction (`pretrain_heads`, when any)."""

    config_class = EHRConfig
    base_model_prefix = "ehr"
    main_input_name = "input_ids"

    def __init__(self, config: EHRConfig):
        super().__init__(config)
        backbone_cls, lm_cls = ARCHS[config.arch]
        # Built in this order (backbone, EHR embeddings, head, objective heads), each
        # initialised by its own constructor: a seed gives the same weights as before they
        # were one model, and objective heads leave the others' initial weights unchanged.
        self.lm = lm_cls(backbone_cls(**config.backbone))
        hidden = self.lm.config.hidden_size
        self.ehr = EHREmbedding(hidden) if config.ehr_embeddings else None
        self.head = nn.Linear(hidden, 1)
        self.pretrain_heads = (
            ObjectiveHeads(
                hidden,
                config.n_series,
                config.n_targets,
                config.stay_hours,
                tuple(config.objectives),
            )
            if config.objectives
            else None
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: every part initialised itself when built (see __init__), and
        `from_pretrained` overwrites all of them."""

    @property
    def spec(self) -> dict:
        """The fedclif model config it was built from."""
        return self.config.spec

    @property
    def tokenizer_hash(self) -> str:
        """Token ids mean nothing under another tokenizer."""
        return self.config.tokenizer_hash

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

    def forward(
        self, batch: dict[str, torch.Tensor], head: str = "lm", spec: Spec | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """`lm`: next-token loss; `task`: one logit per row and task; `objectives`: each weighted
        pretraining objective's loss on stay views (shared/model/objectives.py). One entry
        point, so that wrappers which hook `forward` (opacus) see every training step."""
        if head == "objectives":
            return losses(self, batch, spec)
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

    def task_logit(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[batch, tasks]: the head at each of the task tokens closing every row (as many as
        `task_mask` has columns; shared/model/sequences.py `Prompted`)."""
        h = self.hidden(batch)
        n = batch["task_mask"].shape[1]
        at = batch["lengths"][:, None] - n + torch.arange(n, device=h.device)
        return self.head(h[torch.arange(h.shape[0], device=h.device)[:, None], at]).squeeze(-1)


def quiet_transformers() -> None:
    """Hide transformers' progress bars, and on CPU its notes that the CUDA kernels are
    missing (noise there; on a GPU they say how to get the fast path)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    if not torch.cuda.is_available():
        logging.set_verbosity_error()


def build_model(
    model_cfg: DictConfig, tok: Tokenizer, pretrain: DictConfig | None = None
) -> EHRModel:
    """A freshly initialised model for this tokenizer's vocabulary, with heads for the
    objectives of `pretrain` (a `pretrain` section of the training config) when given."""
    arch = str(model_cfg.arch)
    if arch not in ARCHS:
        raise FedclifError(f"unknown model.arch {arch!r}; choose from {', '.join(ARCHS)}")
    shape = OmegaConf.to_container(model_cfg.shapes[arch])
    if (
        arch == "mamba2"
        and shape["num_heads"] * shape["head_dim"] != shape["expand"] * shape["hidden_size"]
    ):
        raise FedclifError(
            "model.shapes.mamba2: num_heads * head_dim must equal expand * hidden_size "
            f"(got {shape['num_heads']} * {shape['head_dim']} vs "
            f"{shape['expand']} * {shape['hidden_size']})"
        )
    backbone = {
        "vocab_size": len(tok.vocab),
        "pad_token_id": tok.index[PAD],
        "bos_token_id": tok.index[START],
        "eos_token_id": tok.index[END],
        **shape,
    }
    if arch == "mamba" and not torch.cuda.is_available():
        warnings.warn("model.arch=mamba runs its slow sequential path on CPU", stacklevel=2)
    heads = heads_needed(pretrain) if pretrain is not None else ()
    config = EHRConfig(
        arch=arch,
        backbone=backbone,
        ehr_embeddings=bool(model_cfg.ehr_embeddings),
        spec=OmegaConf.to_container(model_cfg),
        tokenizer_hash=tok.hash,
        objectives=list(heads),
        n_series=len(variables(tok)) if heads else 0,
        n_targets=len(tok.targets) if heads else 0,
        stay_hours=int(pretrain.ts.stay_hours) if heads else 24,
    )
    return EHRModel(config)


# LoRA targets when `lora.target_modules` is null: the blocks' projections (peft refuses
# Mamba's out_proj and conv1d, whose weights the fused kernels read directly).
LORA_TARGETS = {
    "mamba2": ["in_proj"],
    "mamba": ["in_proj", "x_proj", "dt_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def add_lora(model: EHRModel, lora_cfg: DictConfig) -> None:
    """Inject LoRA adapters (peft) into the backbone; only they and the head train."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora_cfg.target_modules or LORA_TARGETS[model.spec["arch"]])
    lora = LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
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


def count_parameters(
    cfg: DictConfig,
    tok: Tokenizer,
    pretrain: DictConfig | None = None,
    lora: DictConfig | None = None,
) -> int:
    """Parameters of the model `cfg` would build (objective heads of `pretrain` included,
    and the adapters of `lora` for a LoRA finetune: a rank is a size too), counted on the
    meta device: nothing is allocated, so a size check can run before a model too large
    for the machine exists."""
    with torch.device("meta"):
        model = build_model(cfg, tok, pretrain)
        if lora is not None:
            add_lora(model, lora)
        return n_params(model)


def is_checkpoint(path: str | Path) -> bool:
    """A fedclif checkpoint: a whole model (a config.json of ours) or a LoRA finetune
    (fedclif.json)."""
    path = Path(path)
    if (path / META).is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == EHRConfig.model_type


def save_model(
    model: EHRModel,
    out: str | Path,
    tok: Tokenizer,
    stage: str,
    extra: dict | None = None,
    base: str | Path | None = None,
) -> None:
    """Write a checkpoint: `save_pretrained` and the tokenizer. With `base` (LoRA) only
    the adapters (peft), the head and fedclif.json naming the base are written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if base is None:
        model.config.stage, model.config.training = stage, dict(extra or {})
        model.save_pretrained(out)
    else:
        model.peft.save_pretrained(out / ADAPTER_DIR)
        save_file(model.head.state_dict(), out / HEAD_FILE)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": model.spec,
            "tokenizer_hash": model.tokenizer_hash,
            "stage": stage,
            "base": str(Path(base).resolve()),
            **(extra or {}),
        }
        write_json(meta, out / META)
    tok.save(out / TOKENIZER_FILE)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EHRModel, dict]:
    """A checkpoint (whole or LoRA) and what it records (`model`: the fedclif model
    config, `tokenizer_hash`, `stage`, `base`: a LoRA finetune's base, and what training
    recorded); its tokenizer is `path/tokenizer.json`."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FedclifError(
            f"{path} is not a fedclif checkpoint (no config.json of a {EHRConfig.model_type} "
            "model); "
            "make one with `fedclif train pretrain`"
        )
    if not (path / META).is_file():
        model = EHRModel.from_pretrained(path)
        c = model.config
        meta = {
            "model": c.spec,
            "tokenizer_hash": c.tokenizer_hash,
            "stage": c.stage,
            "base": None,
            **c.training,
        }
        return model.to(device), meta
    meta = read_json(path / META, FORMAT, VERSION, "LoRA checkpoint")
    if not is_checkpoint(meta["base"]):
        raise FedclifError(
            f"{path} holds LoRA adapters for the checkpoint {meta['base']}, "
            "which is not there any more: restore it or finetune again"
        )
    model, _ = load_model(meta["base"], device)
    from peft import PeftModel

    _set_peft(model, PeftModel.from_pretrained(model.lm, path / ADAPTER_DIR))
    model.head.load_state_dict(load_file(path / HEAD_FILE))
    return model.to(device), meta


# --- what trains in a stage, and the arrays that travel --------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def uses_lora(train_cfg: DictConfig) -> bool:
    if train_cfg.finetune.peft not in (None, "lora"):
        raise FedclifError(f"finetune.peft must be null or lora, got {train_cfg.finetune.peft!r}")
    return train_cfg.finetune.peft == "lora"


def setup(model: EHRModel, train_cfg: DictConfig, stage: str) -> None:
    """Fix which parameters train in `stage` (call before `get_weights`/`set_weights`):
    pretraining trains all but the task head (objective heads included); finetuning
    trains LoRA adapters and the head (`finetune.peft: lora`) or every weight the task
    loss reaches (never the objective heads). Idempotent."""
    if stage not in STAGES:
        raise FedclifError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
    if stage == "pretrain":
        model.requires_grad_(True)
        model.head.requires_grad_(False)
        return
    if uses_lora(train_cfg):
        if getattr(model, "peft", None) is None:
            add_lora(model, train_cfg.lora)
    else:
        model.requires_grad_(True)
        out = model.lm.get_output_embeddings()
        if out.weight is not model.lm.get_input_embeddings().weight:
            # The task loss never reaches the LM head: training it would only waste
            # optimizer state, and under DP-SGD it would have no per-sample gradient.
            out.requires_grad_(False)
    if model.pretrain_heads is not None:  # the task loss never reaches them
        model.pretrain_heads.requires_grad_(False)
    model.head.requires_grad_(True)


def stage_model(
    model_cfg: DictConfig,
    tok: Tokenizer,
    train_cfg: DictConfig,
    stage: str,
    base: dict | None = None,
    weights: dict | None = None,
    seed: int | None = None,
) -> EHRModel:
    """The one way the server and a site build a stage's model: fresh weights (seeded
    when `seed` is given), then the pretrained `base` arrays (a finetuning stage), then
    `weights` (this stage's layout) when given."""
    if seed is not None:
        seed_everything(seed)
    model = build_model(model_cfg, tok, train_cfg.pretrain)
    if base is not None:
        setup(model, train_cfg, "pretrain")
        set_weights(model, base)
    setup(model, train_cfg, stage)
    if weights is not None:
        set_weights(model, weights)
    return model


AutoConfig.register(EHRConfig.model_type, EHRConfig)
AutoModel.register(EHRConfig, EHRModel)
