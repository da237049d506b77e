"""Server-side checks of a site's reply before it reaches aggregation."""

import numpy as np
from flwr.app import ArrayRecord


def update_problem(reply: ArrayRecord, current: ArrayRecord, max_norm: float) -> str | None:
    """Why a reply's arrays must not be aggregated, or None: other keys or shapes than the
    global model's, non-finite values, or an update norm above `max_norm` (a poisoned or
    diverged site). Reasons carry names and numbers only."""
    if set(reply.keys()) != set(current.keys()):
        missing = sorted(set(current.keys()) - set(reply.keys()))
        extra = sorted(set(reply.keys()) - set(current.keys()))
        return f"wrong keys (missing {missing[:2]}, unexpected {extra[:2]})"
    sq = 0.0
    for k, arr in current.items():
        got, ref = reply[k].numpy(), arr.numpy()
        if got.shape != ref.shape:
            return f"wrong shape for {k}: {got.shape}, expected {ref.shape}"
        if not np.isfinite(got).all():
            return f"non-finite values in {k}"
        sq += float(np.sum((got.astype(np.float64) - ref) ** 2))
    norm = sq**0.5
    if norm > max_norm:
        return f"update norm {norm:.3g} above the bound {max_norm:.3g}"
    return None
