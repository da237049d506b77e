"""Generate a stay's next events with the language-model head, next to what happened."""

import numpy as np
import torch
from omegaconf import DictConfig

from fedclif.shared.errors import FedclifError
from fedclif.shared.model.models import EHRModel
from fedclif.shared.model.sequences import SiteData
from fedclif.shared.tokens.events import type_id
from fedclif.shared.tokens.tokenizer import END, PAD, START, TIME_BUCKETS


@torch.no_grad()
def forecast(
    model: EHRModel,
    data: SiteData,
    hosp_id: str,
    n: int,
    cfg: DictConfig,
    at_hours: float = 24.0,
    context: int = 512,
    seed: int = 0,
) -> dict:
    """Sample `n` tokens after the first `at_hours` of stay `hosp_id` (loaded with
    `full=True`). Generated time tokens advance the clock by their bucket's lower bound,
    so later tokens get plausible time embeddings. Returns the decoded history tail,
    forecast and actual continuation as (token, hours) pairs."""
    st = data.stays.filter(data.stays.get_column("hospitalization_id") == str(hosp_id))
    if st.height == 0:
        raise FedclifError(f"no stay {hosp_id!r} in {data.path} (stays of at least 24 h only)")
    tok = data.tok
    ids = st.get_column("tokens")[0].to_numpy().astype(np.int64)
    hours = st.get_column("hours")[0].to_numpy().astype(np.float32)
    types = st.get_column("types")[0].to_numpy().astype(np.int64)
    cut = int(np.searchsorted(hours, at_hours, side="left"))
    if cut == 0:
        raise FedclifError(f"stay {hosp_id} has no event before hour {at_hours}")
    age = float(st.get_column("age")[0])
    visit = int(st.get_column("hosp_index")[0])
    seq = {"input_ids": list(ids[:cut]), "types": list(types[:cut]), "hours": list(hours[:cut])}
    minutes = {tok.index[t]: m for m, t in TIME_BUCKETS}
    banned = [tok.index[PAD], tok.index[START]] + [
        i for t, i in tok.index.items() if t.startswith("TASK_")
    ]
    device = next(model.parameters()).device
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    temp, top_k = float(cfg.temperature), int(cfg.top_k)
    generated = []
    for _ in range(n):
        batch = {k: torch.tensor([v[-context:]], device=device) for k, v in seq.items()}
        width = batch["input_ids"].shape[1]
        batch["age"] = torch.full((1, width), age, device=device)
        batch["visit"] = torch.full((1, width), visit, device=device)
        logits = model.logits(batch)[0, -1].float()
        logits[banned] = -float("inf")
        if temp <= 0:
            nxt = int(logits.argmax())
        else:
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits[logits < kth] = -float("inf")
            nxt = int(torch.multinomial(torch.softmax(logits / temp, -1), 1, generator=g))
        t = seq["hours"][-1] + minutes.get(nxt, 0.0) / 60.0
        seq["input_ids"].append(nxt)
        seq["types"].append(type_id(tok.vocab[nxt]))
        seq["hours"].append(t)
        generated.append((tok.vocab[nxt], float(t)))
        if tok.vocab[nxt] == END:
            break
    real = zip(tok.decode(ids[cut : cut + n].tolist()), hours[cut : cut + n].tolist(), strict=True)
    tail = zip(tok.decode(ids[max(cut - 10, 0) : cut].tolist()), hours[:cut][-10:], strict=True)
    return {
        "hospitalization_id": str(hosp_id),
        "at_hours": at_hours,
        "history_tail": [(a, float(b)) for a, b in tail],
        "forecast": generated,
        "actual": [(a, float(b)) for a, b in real],
    }
