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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

State = dict[str, np.ndarray]


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


# (deltas, public weights, trim, byzantine) -> the update
Combine = Callable[[Sequence[State], Sequence[float], int, int], State]


@dataclass(frozen=True)
class Aggregation:
    """One way to combine the accepted deltas, selected by the run config's ``defence``."""

    name: str  # what the logs call it
    defence: str  # the run config's ``defence`` value that selects it
    threat: str  # the threat it answers (they exclude each other, so a config names one)
    combine: Combine


def _registry(*aggregations: Aggregation) -> Mapping[str, Aggregation]:
    return MappingProxyType({a.name: a for a in aggregations})


AGGREGATIONS = _registry(
    Aggregation(
        "fedavg",
        "none",
        "honest-but-curious server: every delta is already DP at its site",
        lambda deltas, weights, trim, byzantine: weighted_mean(deltas, weights),
    ),
    Aggregation(
        "trimmed-mean",
        "trimmed-mean",
        "a minority of poisoned updates (coordinate-wise trimmed mean)",
        lambda deltas, weights, trim, byzantine: trimmed_mean(deltas, trim=trim),
    ),
    Aggregation(
        "krum",
        "krum",
        "a minority of poisoned updates (Krum selection)",
        lambda deltas, weights, trim, byzantine: krum(deltas, byzantine=byzantine),
    ),
)
DEFENCES: Mapping[str, Aggregation] = MappingProxyType(
    {a.defence: a for a in AGGREGATIONS.values()}
)


def aggregate(
    deltas: Sequence[State],
    weights: Sequence[float],
    *,
    method: str,
    trim: int = 1,
    byzantine: int = 1,
) -> State:
    """Aggregate with the named method (the robust ones ignore the weights).

    Raises:
        ValueError: an unknown method (the message lists the registered ones).
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {sorted(AGGREGATIONS)}, got {method!r}")
    return AGGREGATIONS[method].combine(deltas, weights, trim, byzantine)


def apply_update(global_state: State, update: State, *, server_lr: float) -> State:
    """``theta + server_lr * update``, keeping each array's dtype."""
    return {
        name: (value + server_lr * update[name].astype(value.dtype)).astype(value.dtype)
        for name, value in global_state.items()
    }
