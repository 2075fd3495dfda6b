"""Secure aggregation (Flower's SecAgg+): the plan's component, the node's policy, the node's
clip-before-masking step and the server's gate on the unmasked sum. Pure numpy: the Flower
protocol adapters are :mod:`federation.secure_node` and :mod:`federation.secure_server`.

Under SecAgg+ (Bell et al., CCS 2020) the server sees masked vectors only and learns the sum of
the contributors' updates, so the per-reply gate (:mod:`federation.validation`) cannot run.
Instead (docs/privacy.md, "Secure aggregation"):

- each node's own code, not the plan, clips its delta to the plan's L2 bound ``S`` and checks it
  is finite BEFORE it is quantised and masked (:func:`clip_before_masking`);
- SecAgg+ quantises every coordinate into ``[-c, c]`` with ``Q`` levels and stochastic rounding.
  With ``c = S`` the coordinate clip never binds (``|x_i| <= ||x||_2 <= S``), and the rounding
  adds at most ``2S / Q`` per coordinate, so one quantised update has L2 norm at most
  ``S + sqrt(d) * 2S / Q`` (:func:`quantised_norm_bound`);
- the server checks the unmasked sum of ``m`` contributors: the expected names and shapes, finite
  values and ``||sum|| <= m * (S + sqrt(d) * 2S / Q)`` (:func:`gate_sum`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from federation.errors import InvalidUpdateError, PlanRefusedError
from federation.validation import update_norm, validate_update

State = dict[str, np.ndarray]

QUANTIZATION_RANGE = 2**22  # Flower's default: 2**32 / 2**22 leaves room for 1024 summands
MODULUS_RANGE = 2**32  # Flower's default and its largest allowed mask range


class SecurePolicy(StrEnum):
    """A node's own rule on secure aggregation (node config ``secure-aggregation``)."""

    ALLOWED = "allowed"  # runs plans with or without it
    REQUIRED = "required"  # refuses a plan that would send its delta unmasked
    FORBIDDEN = "forbidden"  # refuses a secure plan (e.g. its regulator wants per-site audit)


@dataclass(frozen=True)
class SecureAggregationConfig:
    """The round plan's secure-aggregation component (flat keys ``secagg.*``).

    Attributes:
        enabled: Whether the round runs SecAgg+ (the delta leaves the node masked).
        min_sites: Fewest contributors an unmasked sum may have; every node refuses to help
            unmask a smaller sum, and it is SecAgg+'s reconstruction threshold.
        norm_bound: ``S``, the L2 bound each node clips its delta to before masking; also
            SecAgg+'s clipping range. The server's strategy sets it to its update bound.
        quantization_range: ``Q``, SecAgg+'s number of quantisation levels per coordinate.
    """

    enabled: bool = False
    min_sites: int = 2  # SecAgg+ needs at least 2 (a sum of one is the update itself)
    norm_bound: float = 1.0  # replaced by the strategy's update bound in every plan it sends
    quantization_range: int = QUANTIZATION_RANGE

    def __post_init__(self) -> None:
        if self.min_sites < 2:
            raise ValueError(
                f"SecureAggregationConfig.min_sites must be >= 2, got {self.min_sites}"
            )
        if not (math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ValueError(
                f"SecureAggregationConfig.norm_bound must be finite and > 0, "
                f"got {self.norm_bound!r}"
            )
        if not 2 <= self.quantization_range < MODULUS_RANGE:
            raise ValueError(
                "SecureAggregationConfig.quantization_range must be in [2, 2**32), "
                f"got {self.quantization_range!r}"
            )


@dataclass(frozen=True)
class ClippedUpdate:
    """A node's delta ready for masking. ``clipped`` stays on the node: it depends on data."""

    delta: State
    norm: float
    clipped: bool


@dataclass(frozen=True)
class SumGate:
    """What the server's gate found in an unmasked sum (public: the sum is the release)."""

    mean: State  # the sum over contributors, divided by their number
    contributors: int
    norm: float  # L2 norm of the sum
    bound: float  # contributors * quantised_norm_bound


def check_secure_policy(enabled: bool, policy: str, *, site: str, round: int) -> None:
    """Refuse a round whose secure-aggregation mode the node's policy does not allow.

    Raises:
        PlanRefusedError: a secure round at a ``forbidden`` node, or a plain round at a
            ``required`` node.
    """
    if enabled and policy == SecurePolicy.FORBIDDEN:
        raise PlanRefusedError(
            f"site {site} refuses round {round}: its secure-aggregation policy is forbidden and "
            "the plan asks for secure aggregation"
        )
    if not enabled and policy == SecurePolicy.REQUIRED:
        raise PlanRefusedError(
            f"site {site} refuses round {round}: its secure-aggregation policy is required and "
            "the plan would send its delta unmasked (set secure-aggregation = true on the server)"
        )


def check_finite(delta: Mapping[str, np.ndarray]) -> None:
    """Raise unless every value of ``delta`` is finite.

    Raises:
        InvalidUpdateError: naming the arrays that hold NaN or infinity.
    """
    bad = [name for name, a in delta.items() if not np.all(np.isfinite(a))]
    if bad:
        raise InvalidUpdateError(
            f"secure round: the node's delta holds non-finite values in {', '.join(bad[:5])}; "
            "it is not masked or sent"
        )


def clip_before_masking(delta: Mapping[str, np.ndarray], *, norm_bound: float) -> ClippedUpdate:
    """Scale ``delta`` into the L2 ball of radius ``norm_bound`` after checking it is finite.

    Runs in the node's own code on every secure round; nothing in the plan can skip it.

    Raises:
        InvalidUpdateError: a non-finite value (naming the arrays), or a bound that is not > 0.
    """
    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise InvalidUpdateError(
            f"secure round: the plan's norm bound must be > 0 for clipping, got {norm_bound!r}"
        )
    check_finite(delta)
    norm = update_norm(delta)
    if norm <= norm_bound:
        return ClippedUpdate({k: np.array(v) for k, v in delta.items()}, norm, clipped=False)
    scale = norm_bound / norm
    clipped = {
        k: (np.asarray(v, dtype=np.float64) * scale).astype(v.dtype) for k, v in delta.items()
    }
    # float32 rounding can leave the product a hair over the bound; shrink once more if so.
    over = update_norm(clipped)
    if over > norm_bound:
        clipped = {
            k: (v * (norm_bound / over) * (1 - 1e-6)).astype(v.dtype) for k, v in clipped.items()
        }
    return ClippedUpdate(clipped, norm, clipped=True)


def quantised_norm_bound(norm_bound: float, *, values: int, quantization_range: int) -> float:
    """Largest L2 norm of one clipped update after SecAgg+'s quantisation round trip.

    Stochastic rounding moves each of the ``values`` coordinates by less than one step
    ``2 * norm_bound / quantization_range``; the clip at ``[-norm_bound, norm_bound]`` never binds
    on a vector of L2 norm <= ``norm_bound``.
    """
    return norm_bound + math.sqrt(values) * 2.0 * norm_bound / quantization_range


def gate_sum(
    mean: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    contributors: int,
    secagg: SecureAggregationConfig,
    bound: float | None = None,
) -> SumGate:
    """Check the unmasked mean of ``contributors`` clipped updates (the only thing the server
    sees) with the gate every reply passes (:func:`federation.validation.validate_update`),
    and return it in the reference's dtypes.

    SecAgg+ dequantises to float64: a floating array is compared in the model's dtype, so the
    dtype check refuses only what is not a dequantised sum (an integer array, say).
    ``bound`` replaces the clipped updates' bound where the updates carry unclipped noise (the
    plan's :meth:`~federation.plan.RoundPlan.secure_ranges`).

    Raises:
        InvalidUpdateError: too few contributors, a missing, unexpected, reshaped or non-float
            array, a non-finite value, or a sum longer than ``contributors`` quantised updates
            can be.
    """
    few = (
        [f"{contributors} contributors, the plan's minimum is {secagg.min_sites}"]
        if contributors < secagg.min_sites
        else []
    )
    typed = {name: _in_dtype_of(a, reference.get(name)) for name, a in mean.items()}
    gate = validate_update(typed, reference, norm_bound=None, what="secure sum", problems=few)
    values = sum(int(a.size) for a in reference.values())
    if bound is None:
        bound = contributors * quantised_norm_bound(
            secagg.norm_bound, values=values, quantization_range=secagg.quantization_range
        )
    norm = contributors * update_norm(mean)
    if not norm <= bound:
        raise InvalidUpdateError(
            f"secure sum rejected: L2 norm {norm:.6g} of the sum of {contributors} updates "
            f"exceeds {contributors} x {bound / contributors:.6g}; a node did not clip or "
            "did not follow the plan"
        )
    return SumGate(gate.delta, contributors, norm, bound)


def _in_dtype_of(array: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """A floating ``array`` in the floating dtype of ``reference``; anything else as it is."""
    got = np.asarray(array)
    if reference is None or not (
        np.issubdtype(got.dtype, np.floating) and np.issubdtype(reference.dtype, np.floating)
    ):
        return got
    return got.astype(reference.dtype)
