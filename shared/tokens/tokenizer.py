"""The federated tokenizer: vocabulary and quantile cut points fitted from merged site
statistics, saved as a hashed `tokenizer.json` that every site of a run must share."""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fedclif.shared.artifact import read_json, write_json
from fedclif.shared.errors import FedclifError
from fedclif.shared.tokens.codes import is_target
from fedclif.shared.tokens.events import PREFIX_TYPE, TOKEN_TYPES, UNK, prefix_of
from fedclif.shared.tokens.stats import quantile_cuts

FORMAT = "fedclif-tokenizer"
VERSION = 1
PAD, START, END = "PAD", "TL_START", "TL_END"

# Time-spacing tokens: (lower bound in minutes, token). Gaps under 5 minutes get none.
TIME_BUCKETS: tuple[tuple[float, str], ...] = (
    (5, "T_5m-15m"),
    (15, "T_15m-1h"),
    (60, "T_1h-2h"),
    (120, "T_2h-6h"),
    (360, "T_6h-12h"),
    (720, "T_12h-1d"),
    (1440, "T_1d-3d"),
    (4320, "T_3d-1w"),
    (10080, "T_1w-2w"),
    (20160, "T_2w-1mo"),
    (43200, "T_1mo-3mo"),
    (129600, "T_3mo-6mo"),
    (259200, "T_6mo+"),
)

# Prefixes that get an explicit unknown token: codes rarer than k, or not in CLIF.
_EVENT_PREFIXES = [p for p, t in PREFIX_TYPE.items() if t not in ("special", "time")]


def bin_token(code: str, b: int) -> str:
    return f"{code}_Q{b}"


@dataclass(frozen=True)
class Tokenizer:
    config: dict
    vocab: tuple[str, ...]
    cuts: dict[str, tuple[float, ...]]
    sites: int
    n_stays: int | None
    # Admission codes (shared/tokens/codes.py): pretraining targets, never tokens of a timeline.
    targets: tuple[str, ...] = ()

    @cached_property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.vocab)}

    @property
    def fused(self) -> bool:
        return bool(self.config["fused"])

    def content(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config,
            "vocab": list(self.vocab),
            "cuts": {k: list(v) for k, v in sorted(self.cuts.items())},
            "targets": list(self.targets),
            "token_types": list(TOKEN_TYPES),
            "time_buckets": [list(b) for b in TIME_BUCKETS],
            "sites": self.sites,
            "n_stays": self.n_stays,
        }

    @cached_property
    def hash(self) -> str:
        blob = json.dumps(self.content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def id(self, token: str) -> int:
        """Id of a token, or of its prefix's unknown token."""
        i = self.index.get(token)
        return i if i is not None else self.index[f"{prefix_of(token)}_{UNK}"]

    def encoding_none_of(self, tokens: set[str]) -> "Tokenizer":
        """This tokenizer (same vocabulary, same hash) encoding `tokens` as their prefix's
        unknown token: what a site does with entries it will not train (client/app.py)."""
        view = dataclasses.replace(self)
        view.__dict__["index"] = {t: i for t, i in self.index.items() if t not in tokens}
        return view

    def decode(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def to_dict(self) -> dict:
        """What tokenizer.json holds (and what the server sends the sites)."""
        return {**self.content(), "hash": self.hash}

    def save(self, path: str | Path) -> None:
        write_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, raw: dict, source: str | Path) -> "Tokenizer":
        """A tokenizer from `to_dict` output, refused if its content does not match its
        hash (`source` names where it came from)."""
        tok = cls(
            config=raw["config"],
            vocab=tuple(raw["vocab"]),
            cuts={k: tuple(v) for k, v in raw["cuts"].items()},
            sites=raw["sites"],
            n_stays=raw["n_stays"],
            targets=tuple(raw.get("targets", ())),
        )
        if tok.hash != raw.get("hash"):
            raise FedclifError(
                f"{source}: content hash does not match (file edited or corrupt); fit it again"
            )
        return tok

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        raw = read_json(path, FORMAT, VERSION, "tokenizer", "make one with `fedclif tokenizer fit`")
        return cls.from_dict(raw, path)


def fit_tokenizer(merged: dict, cfg: DictConfig) -> Tokenizer:
    """Vocabulary and cut points from merged statistics (`stats.merge_stats`)."""
    k = int(cfg.k_min_count)
    n_bins = int(cfg.n_bins)
    if n_bins < 1:
        raise FedclifError(f"n_bins must be at least 1, got {n_bins}")
    unknown = [f"{p}_{UNK}" for p in _EVENT_PREFIXES]
    # Unknown codes mix unrelated values, so they get a token but never bins.
    common = sorted(c for c, n in merged["codes"].items() if n >= k and c not in unknown)
    kept = [c for c in common if not is_target(c)]
    cuts: dict[str, tuple[float, ...]] = {}
    for code in kept:
        h = merged["numeric"].get(code)
        if h and sum(h["counts"]) >= k:
            c = quantile_cuts(h["values"], h["counts"], n_bins)
            if c:
                cuts[code] = tuple(c)
    specials = [PAD, START, END] + [f"TASK_{t}" for t in cfg.tasks]
    times = [t for _, t in TIME_BUCKETS]
    bins = [] if cfg.fused else [f"Q{b}" for b in range(n_bins)]
    codes: list[str] = []
    for code in kept:
        codes.append(code)
        if cfg.fused and code in cuts:
            codes += [bin_token(code, b) for b in range(len(cuts[code]) + 1)]
    return Tokenizer(
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        vocab=tuple(specials + unknown + times + bins + codes),
        cuts=cuts,
        sites=int(merged["sites"]),
        n_stays=merged["n_stays"],
        targets=tuple(c for c in common if is_target(c)),
    )
