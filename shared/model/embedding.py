"""EHRMamba's embeddings of a token's context (type, time, age, visit) and the fixed
sinusoids that carry continuous times into the model."""

import math

import torch
from torch import nn

from fedclif.shared.model.sequences import MAX_VISIT
from fedclif.shared.tokens.events import TOKEN_TYPES


def sinusoids(x: torch.Tensor, top: float, n_freq: int) -> torch.Tensor:
    """sin and cos of `x` at `n_freq` periods from 1 to 10**top. Computed here, not kept
    as buffers: `from_pretrained` builds modules without running their initialisation,
    and a non-persistent buffer would come back uninitialised."""
    periods = torch.logspace(0, top, n_freq, device=x.device)
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
        self.n_freq = n_freq

    def forward(self, concept: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = self.time.weight.dtype  # sinusoids in float32, then the model's precision
        extra = (
            self.types(batch["types"])
            + self.visit(batch["visit"])
            + self.time(sinusoids(batch["hours"], 4, self.n_freq).to(dtype))
            + self.age(sinusoids(batch["age"], 2.3, self.n_freq).to(dtype))
        )
        return self.norm(concept + extra)
