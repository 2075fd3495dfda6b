"""The validation gate every node reply passes before aggregation.

Flower's strategies check no values: a NaN or 1e6-scaled update flows straight into FedAvg. Here a
reply must carry exactly the expected names, shapes and dtypes, only finite values, and a delta
whose global L2 norm is within a bound; an over-long delta is clipped to the bound or rejected, as
configured, and the outcome is recorded. A one-shot release (dp-prototypes) is checked the same
way against the shape the plan implies, and rejected, never clipped, when it is too long.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from federation.errors import InvalidUpdateError

NORM_POLICIES = ("clip", "reject")


@dataclass(frozen=True)
class GateResult:
    """A reply that passed, with what the gate did to it."""

    delta: dict[str, np.ndarray]  # the reply's arrays: a model delta, or a release
    norm: float  # L2 norm of the delta as received
    clipped: bool  # True when it was scaled down to the bound


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """Global L2 norm over every array of an update (float64 accumulation)."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in delta.values()))


def validate_update(
    delta: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    norm_bound: float | None,
    policy: str = "clip",
    what: str = "update",
    problems: Sequence[str] = (),
) -> GateResult:
    """Check one node's delta against the global model's layout: the one gate of every reply,
    plain or secure (:func:`federation.secure_aggregation.gate_sum` runs it on a sum).

    Args:
        delta: The reply's arrays by name.
        reference: The global model's arrays (names, shapes and dtypes to match).
        norm_bound: Largest accepted L2 norm of the whole delta; ``None``: no bound here (the
            caller bounds a sum of several updates itself).
        policy: ``"clip"`` scales a longer delta down to ``norm_bound``; ``"reject"`` refuses it.
        what: What the arrays are, in the error message (``"update"``, ``"release"``, ...).
        problems: Problems the caller already found, reported with these in one error.

    Raises:
        InvalidUpdateError: naming every problem found (missing or unexpected names, wrong shape
            or dtype, non-finite values, a norm over the bound under ``"reject"``).
    """
    if policy not in NORM_POLICIES:
        raise ValueError(f"policy must be one of {NORM_POLICIES}, got {policy!r}")
    if norm_bound is not None and not (math.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError(f"norm_bound must be a finite number > 0, got {norm_bound!r}")
    found = [*problems, *_layout_problems(delta, reference)]
    if found:
        raise InvalidUpdateError(f"{what} rejected: " + "; ".join(found))
    arrays = {k: np.asarray(v) for k, v in delta.items()}
    norm = update_norm(arrays)
    if norm_bound is None or norm <= norm_bound:
        return GateResult(arrays, norm, clipped=False)
    if policy == "reject":
        raise InvalidUpdateError(
            f"{what} rejected: L2 norm {norm:.4g} exceeds the bound {norm_bound:.4g}"
        )
    scale = norm_bound / norm
    clipped = {k: (v * scale).astype(v.dtype) for k, v in arrays.items()}
    return GateResult(clipped, norm, clipped=True)


def _layout_problems(
    delta: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]
) -> list[str]:
    """Missing or unexpected names, wrong shapes or dtypes, non-finite values."""
    problems: list[str] = []
    missing = sorted(set(reference) - set(delta))
    unexpected = sorted(set(delta) - set(reference))
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:5])}")
    for name in sorted(set(delta) & set(reference)):
        got, want = np.asarray(delta[name]), reference[name]
        if got.shape != want.shape:
            problems.append(f"{name} has shape {got.shape}, expected {want.shape}")
        elif got.dtype != want.dtype:
            problems.append(f"{name} has dtype {got.dtype}, expected {want.dtype}")
        elif not np.all(np.isfinite(got)):
            problems.append(f"{name} holds {int(np.sum(~np.isfinite(got)))} non-finite values")
    return problems


def validate_release(
    release: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    norm_bound: float,
) -> GateResult:
    """Check one node's one-shot release (names, shapes, float32, finite, norm bound).

    A release is summed as it is, so a too-long one is rejected rather than scaled: scaling
    would change what it means (a class's noisy patient mass).

    Raises:
        InvalidUpdateError: naming every problem found.
    """
    reference = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
    return validate_update(
        release, reference, norm_bound=norm_bound, policy="reject", what="release"
    )
