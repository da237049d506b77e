"""A tokenized site as model inputs: packed blocks of full timelines for pretraining,
the first-24 h view closed by the task tokens for finetuning, the plain 24 h view for probes.

Every batch is a dict of [batch, length] tensors: `input_ids`, `types`, `hours` (since
admission), `age`, `visit` (hospitalization index), plus `lengths` and, for prompted
sequences, `task` and `y`. Padding is on the right: causal models never look ahead, so
the last real position of each row is exact without an attention mask.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from omegaconf import DictConfig

from fedclif.shared.errors import FedclifError
from fedclif.shared.tokens.events import type_id
from fedclif.shared.tokens.labels import TASKS, usable
from fedclif.shared.tokens.splits import assign_splits
from fedclif.shared.tokens.timelines import LABELS as LABELS_FILE
from fedclif.shared.tokens.timelines import TIMELINES, read_timelines
from fedclif.shared.tokens.timeseries import TIMESERIES, read_grid
from fedclif.shared.tokens.tokenizer import PAD, Tokenizer

_BASE = ["hospitalization_id", "patient_id", "age", "hosp_index"]
_FULL = ["tokens", "hours", "types", "n_tokens"]
_WINDOW = ["tokens_24h", "hours_24h", "types_24h", "n_tokens_24h"]
# Per-example tensors of a fixed shape (stacked, not padded): StayViews' grid and codes.
_FIXED = ("grid", "grid_mask", "codes", "y", "task_mask")
# Visits beyond this index share the last embedding.
MAX_VISIT = 31


@dataclass
class SiteData:
    """One tokenized site: stays (with their split) and their labels, row-aligned."""

    path: Path
    tok: Tokenizer
    stays: pl.DataFrame
    labels: pl.DataFrame

    @property
    def name(self) -> str:
        return str(self.path)

    def rows(self, split: str | None) -> np.ndarray:
        s = self.stays.get_column("split").to_numpy()
        return np.arange(s.size) if split in (None, "all") else np.flatnonzero(s == split)


def load_site_data(
    path: str | Path, split_cfg: DictConfig, full: bool = False, ids: list[str] | None = None
) -> SiteData:
    """Read a `fedclif site tokenize` directory; `full` also reads whole-stay timelines
    (pretraining), otherwise only the first-24 h view; `ids`: only these stays."""
    path = Path(path)
    where = pl.col("hospitalization_id").is_in(ids) if ids is not None else None
    tl, tok = read_timelines(path, _BASE + _WINDOW + (_FULL if full else []), where)
    labels = pl.read_parquet(path / LABELS_FILE)
    labels = tl.select("hospitalization_id").join(labels, on="hospitalization_id", how="left")
    tl = tl.with_columns(
        pl.Series("split", assign_splits(tl.get_column("patient_id").to_numpy(), split_cfg)),
        pl.col("age").fill_null(pl.col("age").mean()).fill_null(60.0).cast(pl.Float32),
        pl.col("hosp_index").clip(0, MAX_VISIT),
    )
    return SiteData(path, tok, tl, labels)


@dataclass
class Ragged:
    """Per-stay token arrays stored flat with offsets (cheap to slice, no Python lists)."""

    ids: np.ndarray
    types: np.ndarray
    hours: np.ndarray
    offsets: np.ndarray
    age: np.ndarray
    visit: np.ndarray

    @classmethod
    def of(cls, data: SiteData, rows: np.ndarray, window: bool) -> "Ragged":
        sfx = "_24h" if window else ""
        tl = data.stays[rows]
        n = tl.get_column(f"n_tokens{sfx}").to_numpy()

        def flat(c: str, dtype) -> np.ndarray:
            return tl.get_column(c + sfx).explode().drop_nulls().to_numpy().astype(dtype)

        return cls(
            flat("tokens", np.int64),
            flat("types", np.int64),
            flat("hours", np.float32),
            np.r_[0, np.cumsum(n)],
            tl.get_column("age").to_numpy().astype(np.float32),
            tl.get_column("hosp_index").to_numpy().astype(np.int64),
        )

    def __len__(self) -> int:
        return self.age.size

    def item(self, i: int, last: int) -> dict[str, np.ndarray]:
        """Stay i's most recent `last` tokens."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        lo = max(lo, hi - last)
        n = hi - lo
        return {
            "input_ids": self.ids[lo:hi],
            "types": self.types[lo:hi],
            "hours": self.hours[lo:hi],
            "age": np.full(n, self.age[i], np.float32),
            "visit": np.full(n, self.visit[i], np.int64),
        }


def packed_blocks(data: SiteData, split: str, context: int) -> torch.utils.data.TensorDataset:
    """Full timelines of a split, end to end, cut into blocks of `context` tokens (the last
    one padded): pretraining wastes no compute on padding."""
    r = Ragged.of(data, data.rows(split), window=False)
    n = np.diff(r.offsets)
    cols = {
        "input_ids": r.ids,
        "types": r.types,
        "hours": r.hours,
        "age": np.repeat(r.age, n),
        "visit": np.repeat(r.visit, n),
    }
    total = r.ids.size
    if total == 0:
        raise FedclifError(f"{data.path}: no tokens in the {split} split")
    blocks = -(-total // context)
    pad = blocks * context - total
    fill = {"input_ids": data.tok.index[PAD]}
    tensors = [
        torch.from_numpy(np.r_[v, np.full(pad, fill.get(k, 0), v.dtype)].reshape(blocks, context))
        for k, v in cols.items()
    ]
    return torch.utils.data.TensorDataset(*tensors)


def _groups(keys: np.ndarray) -> list[np.ndarray]:
    """Indices of `keys` grouped by value (one array per distinct key)."""
    order = np.argsort(keys, kind="stable")
    cuts = np.flatnonzero(keys[order][1:] != keys[order][:-1]) + 1
    return np.split(order, cuts)


class PatientBlocks(torch.utils.data.Dataset):
    """One pretraining example per patient (the unit DP-SGD protects): their stays of a
    split end to end, a window of `context` tokens drawn at random each time it is read
    (right-padded when the patient has fewer). Items are tuples, as `packed_blocks`'."""

    def __init__(self, data: SiteData, split: str, context: int, seed: int = 0):
        rows = data.rows(split)
        order = np.lexsort(
            (
                data.stays.get_column("hosp_index").to_numpy()[rows],
                data.stays.get_column("patient_id").to_numpy()[rows],
            )
        )
        rows = rows[order]
        self.seqs = Ragged.of(data, rows, window=False)
        self.groups = _groups(data.stays.get_column("patient_id").to_numpy()[rows])
        self.context, self.pad = context, data.tok.index[PAD]
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        # A patient's stays are consecutive rows: their tokens one contiguous range.
        g = self.groups[i]
        start, end = self.seqs.offsets[g[0]], self.seqs.offsets[g[-1] + 1]
        lo = start + int(self.rng.integers(0, max(end - start - self.context, 0) + 1))
        hi = min(end, lo + self.context)
        n = np.diff(self.seqs.offsets)[g]
        cols = (
            (self.seqs.ids[lo:hi], self.pad),
            (self.seqs.types[lo:hi], 0),
            (self.seqs.hours[lo:hi], 0),
            (np.repeat(self.seqs.age[g], n)[lo - start : hi - start], 0),
            (np.repeat(self.seqs.visit[g], n)[lo - start : hi - start], 0),
        )
        pad = self.context - (hi - lo)
        return tuple(torch.from_numpy(np.r_[v, np.full(pad, f, v.dtype)]) for v, f in cols)


def block_batch(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "types", "hours", "age", "visit")
    return dict(zip(keys, tensors, strict=True))


class Prompted(torch.utils.data.Dataset):
    """First-24 h views closed by every task's token, with each task's 0/1 outcome and
    whether it counts (`task_mask`).

    One pass reads a stay for all its tasks: the head reads the hidden state at each task
    token (each sees the stay and the task tokens before it), so a step costs the same for
    one task or four; a copy of the stay per task would cost a pass per task. A task counts
    for a stay only where `labels.usable` says its outcome can be evaluated (the 24 h
    leakage rule for ICU and ventilation); a stay where none counts is no example.
    `one_per_patient` makes each patient a single example, one of their stays drawn at
    random each time it is read: the unit DP-SGD protects is then the patient.
    """

    def __init__(
        self,
        data: SiteData,
        split: str,
        tasks: list[str],
        context: int,
        one_per_patient: bool = False,
        seed: int = 0,
    ):
        unknown = [t for t in tasks if t not in TASKS or f"TASK_{t}" not in data.tok.index]
        if unknown:
            raise FedclifError(
                f"unknown task(s) {unknown}: the tokenizer of {data.path} has "
                f"{', '.join(t[5:] for t in data.tok.vocab if t.startswith('TASK_'))}"
            )
        if context <= len(tasks):
            raise FedclifError(
                f"finetune.context={context} leaves no room for a stay before the "
                f"{len(tasks)} task tokens"
            )
        rows = data.rows(split)
        self.seqs = Ragged.of(data, rows, window=True)
        self.context = context
        self.tasks = list(tasks)
        self.task_ids = np.array([data.tok.index[f"TASK_{t}"] for t in tasks], self.seqs.ids.dtype)
        self.task_type = type_id("TASK_")
        lab = data.labels[rows]
        n = (lab.height, 0)
        self.mask = (
            np.stack([usable(lab, TASKS[t]) for t in tasks], 1) if tasks else np.zeros(n, bool)
        )
        self.y = np.zeros(self.mask.shape, np.float32)
        for k, t in enumerate(tasks):
            self.y[:, k] = lab.get_column(TASKS[t]).fill_null(False).to_numpy()
        self.examples = np.flatnonzero(self.mask.any(axis=1))
        # Every (stay row, task index, outcome) that counts, stay by stay: the order in
        # which `predict` returns its scores.
        r, k = np.nonzero(self.mask[self.examples])
        r = self.examples[r]
        self.pairs = np.c_[r, k, self.y[r, k]].astype(np.int64)
        self.stay_ids = data.stays.get_column("hospitalization_id").to_numpy()[rows]
        self.one_per_patient = one_per_patient
        if one_per_patient:
            patients = data.stays.get_column("patient_id").to_numpy()[rows][self.examples]
            self.groups = _groups(patients)
            self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups) if self.one_per_patient else len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.rng.choice(self.groups[i]) if self.one_per_patient else i
        row, n = self.examples[j], len(self.tasks)
        x = self.seqs.item(row, self.context - n)
        end = x["hours"][-1] if x["hours"].size else 0.0
        x = {
            "input_ids": np.r_[x["input_ids"], self.task_ids],
            "types": np.r_[x["types"], np.full(n, self.task_type, x["types"].dtype)],
            "hours": np.r_[x["hours"], np.full(n, end, np.float32)],
            "age": np.r_[x["age"], np.full(n, self.seqs.age[row], x["age"].dtype)],
            "visit": np.r_[x["visit"], np.full(n, self.seqs.visit[row], x["visit"].dtype)],
        }
        item = {key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in x.items()}
        item["y"] = torch.from_numpy(self.y[row])
        item["task_mask"] = torch.from_numpy(self.mask[row])
        return item


class Windows(torch.utils.data.Dataset):
    """Plain first-24 h views (no task token): the inputs of probes and forecasts."""

    def __init__(self, data: SiteData, rows: np.ndarray, context: int):
        self.seqs = Ragged.of(data, rows, window=True)
        self.context = context

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.seqs.item(i, self.context).items()}


class StayViews(torch.utils.data.Dataset):
    """One pretraining example per stay, for objectives beyond next-token prediction
    (shared/model/objectives.py): the stay's first `context` tokens from admission, its hourly
    grid over the first `hours` (values and observed mask) and its admission codes (a
    multi-hot over the tokenizer's targets). `spec` carries the objective weights the
    examples are for. `one_per_patient`: each patient one example, one of their stays
    drawn with `seed` each time it is read (the unit DP-SGD protects)."""

    def __init__(
        self,
        data: SiteData,
        split: str,
        context: int,
        hours: int,
        spec,
        one_per_patient: bool = False,
        seed: int = 0,
    ):
        rows = data.rows(split)
        if not (data.path / TIMESERIES).is_file():
            raise FedclifError(
                f"{data.path} has no {TIMESERIES} (tokenized by an older fedclif): run "
                "`fedclif site tokenize` again to pretrain with time-series objectives"
            )
        self.seqs = Ragged.of(data, rows, window=False)
        self.context, self.spec, self.n_targets = context, spec, len(data.tok.targets)
        ids = data.stays.get_column("hospitalization_id").to_numpy()[rows]
        self.grid, self.mask = read_grid(data.path, list(ids), hours, data.tok)
        self.codes = self._codes(data, ids)
        self.one_per_patient = one_per_patient
        if one_per_patient:
            self.groups = _groups(data.stays.get_column("patient_id").to_numpy()[rows])
            self.rng = np.random.default_rng(seed)

    def _codes(self, data: SiteData, ids: np.ndarray) -> list[np.ndarray]:
        if not self.n_targets:
            return [np.zeros(0, np.int64)] * ids.size
        codes = pl.read_parquet(data.path / TIMELINES, columns=["hospitalization_id", "codes"])
        order = pl.DataFrame({"hospitalization_id": ids})
        found = order.join(codes, on="hospitalization_id", how="left", maintain_order="left")
        return [np.asarray(c or [], np.int64) for c in found.get_column("codes").to_list()]

    def __len__(self) -> int:
        return len(self.groups) if self.one_per_patient else len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.one_per_patient:
            i = int(self.rng.choice(self.groups[i]))
        lo = self.seqs.offsets[i]
        hi = min(self.seqs.offsets[i + 1], lo + self.context)
        n = hi - lo
        codes = np.zeros(self.n_targets, np.float32)
        codes[self.codes[i]] = 1.0
        item = {
            "input_ids": self.seqs.ids[lo:hi],
            "types": self.seqs.types[lo:hi],
            "hours": self.seqs.hours[lo:hi],
            "age": np.full(n, self.seqs.age[i], np.float32),
            "visit": np.full(n, self.seqs.visit[i], np.int64),
        }
        item = {k: torch.from_numpy(v) for k, v in item.items()}
        item["grid"] = torch.from_numpy(self.grid[i])
        item["grid_mask"] = torch.from_numpy(self.mask[i])
        item["codes"] = torch.from_numpy(codes)
        return item


def pad_collate(pad_id: int):
    """Right-pad a list of examples to the longest; adds `lengths`."""

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(it["input_ids"]) for it in items])
        width = int(lengths.max()) if items else 0
        out: dict[str, torch.Tensor] = {"lengths": lengths}
        for key, v in items[0].items() if items else ():
            if key in _FIXED or v.dim() == 0:  # same shape in every example
                out[key] = torch.stack([it[key] for it in items])
                continue
            fill = pad_id if key == "input_ids" else 0
            batch = torch.full((len(items), width), fill, dtype=v.dtype)
            for r, it in enumerate(items):
                batch[r, : len(it[key])] = it[key]
            out[key] = batch
        return out

    return collate
