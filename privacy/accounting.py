"""Pure privacy accounting over Opacus's accountants.

A history is a list of ``(accounted_noise_multiplier, sample_rate, steps)`` triples, exactly the
shape of ``opacus.accountants.*.history``: each triple is ``steps`` runs of the Poisson-subsampled
Gaussian mechanism with sampling rate ``q`` and noise standard deviation ``sigma`` times the
mechanism's L2 sensitivity. Nothing here holds state; the stateful part is ``privacy.ledger``.

Opacus is imported by the functions that compute, not by this module: any Opacus import loads
torch (seconds), and the ledger and ``fedfew budget verify`` need only the constants.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

History = list[tuple[float, float, int]]

ACCOUNTANTS = ("rdp", "prv")

# opacus.accountants.RDPAccountant.DEFAULT_ALPHAS, written out so that reading it needs no
# Opacus import (a test checks the two are equal).
OPACUS_DEFAULT_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
)

# Opacus's default orders plus the large orders Google's dp_accounting also uses: with only
# orders <= 63 a small-epsilon history (large sigma, few steps) is bounded several times too
# loosely. Adding orders can only lower the minimum, and every order gives a valid bound.
RDP_ORDERS: tuple[float, ...] = (*OPACUS_DEFAULT_ORDERS, 128, 256, 512, 1024)

# PRV: Opacus's default absolute epsilon error is 0.01 (10% of epsilon = 0.1). A cheap coarse
# pass (error PRV_COARSE_ERROR) bounds epsilon from below; the final pass asks for
# PRV_RELATIVE_ERROR of that bound, clamped to [PRV_MIN_EPS_ERROR, PRV_EPS_ERROR]. For
# epsilon >= 1 this is exactly Opacus's default.
PRV_EPS_ERROR = 0.01
PRV_COARSE_ERROR = 0.1
PRV_RELATIVE_ERROR = 0.01
PRV_MIN_EPS_ERROR = 1e-3

# Calibration: the calibrated epsilon lies in [(1 - tolerance) * target, target].
CALIBRATION_TOLERANCE = 0.01
MAX_SIGMA = 1e6


def load_accountants() -> None:
    """Import Opacus's accountants now (seconds, once per process; later calls cost nothing).

    Call it before taking a lock that the first epsilon computation would otherwise hold for the
    whole import (``Ledger.charge``'s write transaction).
    """
    import opacus.accountants  # noqa: F401


def _check_delta(delta: float) -> None:
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _check_entry(sigma: float, q: float, steps: int) -> None:
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"noise_multiplier (sigma) must be a finite number > 0, got {sigma!r}")
    if not (isinstance(q, int | float) and 0.0 < q <= 1.0):
        raise ValueError(f"sample_rate (q) must be in (0, 1], got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")


def compress_history(history: Iterable[tuple[float, float, int]]) -> History:
    """Merge entries with equal ``(sigma, q)`` and drop zero-step entries.

    Composition is commutative, so ``k`` entries of the same mechanism are one entry with the
    summed steps; the result is exactly the same epsilon, and a long ledger stays fast.

    Args:
        history: ``(accounted_noise_multiplier, sample_rate, steps)`` triples.

    Returns:
        The compressed history, in order of first appearance.

    Raises:
        ValueError: If an entry has sigma <= 0, q outside (0, 1] or negative steps.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        _check_entry(sigma, q, steps)
        if steps:
            key = (float(sigma), float(q))
            merged[key] = merged.get(key, 0) + int(steps)
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


@contextmanager
def _quiet_extreme_order() -> Iterator[None]:
    # Opacus warns when the best RDP order is the first or last one; the bound is still valid
    # (only possibly loose). RDP_ORDERS already reaches 1024, and PRVAccountant uses an RDP bound
    # with the default orders only to size its (then larger, so still safe) domain.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


@lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> np.ndarray:
    # One step's RDP curve over RDP_ORDERS; cached because a ledger re-composes the same few
    # (sigma, q) pairs on every charge. compute_rdp(steps=k) is exactly k times this curve.
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = np.asarray(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS)),
        dtype=float,
    )
    curve.setflags(write=False)
    return curve


def _rdp_epsilon(history: History, delta: float) -> float:
    # Same arithmetic as RDPAccountant(history).get_epsilon(delta, alphas=RDP_ORDERS): the sum
    # over entries of steps * per-step curve, then Balle et al. 2020's conversion.
    from opacus.accountants.analysis import rdp as rdp_analysis

    total = sum(_rdp_per_step(sigma, q) * steps for sigma, q, steps in history)
    with _quiet_extreme_order():
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(eps)


def _prv_epsilon(history: History, delta: float) -> float:
    from opacus.accountants import PRVAccountant

    accountant = PRVAccountant()
    accountant.history = history
    # q = 1 makes Opacus take log(1 - q) = -inf, which is the intended limit.
    with np.errstate(divide="ignore"), _quiet_extreme_order():
        coarse = float(accountant.get_epsilon(delta=delta, eps_error=PRV_COARSE_ERROR))
        lower = max(coarse - 2 * PRV_COARSE_ERROR, 0.0)
        eps_error = min(max(PRV_RELATIVE_ERROR * lower, PRV_MIN_EPS_ERROR), PRV_EPS_ERROR)
        eps = float(accountant.get_epsilon(delta=delta, eps_error=eps_error))
    return max(eps, 0.0)


def epsilon_for(
    history: Iterable[tuple[float, float, int]], *, delta: float, accountant: str
) -> float:
    """Epsilon of the composition of a history of Poisson-subsampled Gaussian mechanisms.

    ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov 2017, "Renyi Differential
    Privacy"; Mironov, Talwar, Zhang 2019 for the subsampled bound), composed additively per
    order, converted to (epsilon, delta) with Balle et al. 2020, "Hypothesis Testing
    Interpretations and Renyi Differential Privacy", Theorem 21, as
    ``opacus.accountants.analysis.rdp.get_privacy_spent`` does, minimised over ``RDP_ORDERS``.

    ``"prv"``: numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz 2021,
    "Numerical Composition of Differential Privacy"), Opacus's ``PRVAccountant``; the returned
    value is its upper bound, with the error refined for small epsilons.

    Args:
        history: ``(accounted_noise_multiplier, sample_rate, steps)`` triples, as in
            ``opacus.accountants.RDPAccountant().history``.
        delta: Target delta, in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        Epsilon (0.0 for an empty history or one with zero steps only).

    Raises:
        ValueError: On an unknown accountant, a delta outside (0, 1), sigma <= 0, q outside (0, 1]
            or negative steps.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    compressed = compress_history(history)
    if not compressed:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(compressed, delta)
    return _prv_epsilon(compressed, delta)


def worst_epsilon(
    history: Iterable[tuple[float, float, int]], *, delta: float
) -> tuple[float, str]:
    """The larger of the RDP and PRV epsilons of a history, and which accountant gave it.

    Both are valid upper bounds (see ``epsilon_for``); reporting the larger one never understates
    the spend when the two numerical methods disagree.

    Args:
        history: ``(accounted_noise_multiplier, sample_rate, steps)`` triples.
        delta: Target delta, in (0, 1).

    Returns:
        ``(epsilon, accountant)``; on a tie the accountant is ``"rdp"``.
    """
    entries = compress_history(history)
    values = [(epsilon_for(entries, delta=delta, accountant=name), name) for name in ACCOUNTANTS]
    best = values[0]
    for value in values[1:]:
        if value[0] > best[0]:
            best = value
    return best


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest accounted noise multiplier (up to tolerance) whose epsilon stays within target.

    Bisection on ``epsilon_for`` (epsilon decreases in sigma). Unlike
    ``opacus.accountants.utils.get_noise_multiplier`` (absolute tolerance 0.01), the tolerance is
    relative: the result's epsilon is <= ``target_epsilon`` and >= 99% of it.

    Args:
        target_epsilon: Epsilon this run may spend, > 0.
        delta: Target delta, in (0, 1).
        sample_rate: Poisson sampling rate q, in (0, 1].
        steps: Number of steps, >= 1.
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        The accounted noise multiplier (noise std over the mechanism's sensitivity).

    Raises:
        ValueError: On invalid arguments, or when even sigma = 1e6 exceeds the target.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_entry(1.0, sample_rate, steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1 to calibrate, got {steps!r}")

    def eps(sigma: float) -> float:
        return epsilon_for([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    high = 1.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        high *= 2.0
        if high > MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} is unreachable with sample_rate="
                f"{sample_rate!r}, steps={steps!r}, delta={delta!r}: raise it or run fewer steps"
            )
        eps_high = eps(high)
    low = high / 2.0
    eps_low = eps(low)
    while eps_low <= target_epsilon:
        high, eps_high = low, eps_low
        low /= 2.0
        eps_low = eps(low)
    # Invariant: eps(low) > target >= eps(high).
    while eps_high < (1.0 - CALIBRATION_TOLERANCE) * target_epsilon and high - low > 1e-9 * high:
        mid = (low + high) / 2.0
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return high
