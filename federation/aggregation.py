"""Server-side aggregation of validated deltas (pure numpy).

Federated meta-learning minimises ``sum_k p_k F_k(theta)`` with public site weights ``p_k``: the
outer update is ``theta + server_lr * sum_k p_k delta_k / sum_k p_k`` (FedAvg over deltas, McMahan
et al. 2017; as a meta-learning outer loop, Reptile-style, Nichol et al. 2018). The robust options
replace the weighted mean:

- coordinate-wise trimmed mean (Yin et al. 2018) drops the ``trim`` largest and smallest values of
  every coordinate; it tolerates up to ``trim`` poisoned replies;
- Krum (Blanchard et al. 2017) picks the one delta closest to its ``n - f - 2`` nearest neighbours;
  it tolerates ``f`` poisoned replies when ``n > 2f + 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

State = dict[str, np.ndarray]
AGGREGATIONS = ("fedavg", "trimmed-mean", "krum")


def weighted_mean(deltas: Sequence[State], weights: Sequence[float]) -> State:
    """``sum_k w_k delta_k / sum_k w_k`` per array (float64 accumulation)."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError(f"need one weight per delta, got {len(deltas)} and {len(weights)}")
    if any(not (math.isfinite(w) and w > 0) for w in weights):
        raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
    total = float(sum(weights))
    pairs = list(zip(deltas, weights, strict=True))
    out: State = {}
    for name in deltas[0]:
        summed = np.sum([w * d[name].astype(np.float64) for d, w in pairs], axis=0)
        out[name] = (summed / total).astype(deltas[0][name].dtype)
    return out


def trimmed_mean(deltas: Sequence[State], *, trim: int) -> State:
    """Coordinate-wise mean after dropping the ``trim`` largest and smallest values."""
    if trim < 0 or len(deltas) <= 2 * trim:
        raise ValueError(f"trimmed mean of {len(deltas)} deltas cannot drop {trim} from each end")
    out: State = {}
    for name in deltas[0]:
        stacked = np.sort(np.stack([d[name].astype(np.float64) for d in deltas]), axis=0)
        kept = stacked[trim : len(deltas) - trim]
        out[name] = kept.mean(axis=0).astype(deltas[0][name].dtype)
    return out


def krum(deltas: Sequence[State], *, byzantine: int) -> State:
    """The delta with the smallest summed squared distance to its ``n - f - 2`` nearest others."""
    n = len(deltas)
    if byzantine < 0 or n <= 2 * byzantine + 2:
        raise ValueError(
            f"Krum with f={byzantine} needs more than {2 * byzantine + 2} deltas, got {n}"
        )
    flat = np.stack([_flatten(d) for d in deltas])
    squared = np.sum((flat[:, None, :] - flat[None, :, :]) ** 2, axis=-1)
    neighbours = n - byzantine - 2
    scores = [np.sort(np.delete(squared[i], i))[:neighbours].sum() for i in range(n)]
    return {k: v.copy() for k, v in deltas[int(np.argmin(scores))].items()}


def _flatten(state: State) -> np.ndarray:
    return np.concatenate([state[k].ravel() for k in sorted(state)]).astype(np.float64)


def aggregate(
    deltas: Sequence[State],
    weights: Sequence[float],
    *,
    method: str,
    trim: int = 1,
    byzantine: int = 1,
) -> State:
    """Aggregate with the configured method (the robust ones ignore the weights)."""
    if method == "fedavg":
        return weighted_mean(deltas, weights)
    if method == "trimmed-mean":
        return trimmed_mean(deltas, trim=trim)
    if method == "krum":
        return krum(deltas, byzantine=byzantine)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {method!r}")


def apply_update(global_state: State, update: State, *, server_lr: float) -> State:
    """``theta + server_lr * update``, keeping each array's dtype."""
    return {
        name: (value + server_lr * update[name].astype(value.dtype)).astype(value.dtype)
        for name, value in global_state.items()
    }
