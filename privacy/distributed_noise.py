"""Distributed noise under secure aggregation: each site adds only its share of the Gaussian noise,
so that the sum the server unmasks carries the calibrated noise (docs/privacy.md, "Distributed
noise"). The accounting of it, and the bounds SecAgg+ needs, live here; the mechanism that uses
it (``dp-episodic-distributed``, :mod:`privacy.mechanisms`) says so with ``distributed=True``.

The mechanism ``dp-episodic-distributed`` is one DP episodic step per round with a *linear*
update: site ``j`` sends ``u_j = -lr (sum_e clip(g_e) + N(0, s^2 C^2 I)) / E`` with
``s = sigma / sqrt(k)``, unclipped and unscaled (any per-site nonlinearity would break the sum).
The server unmasks ``sum_j u_j = -lr (sum_j sum_e clip(g_e) + N(0, (m / k) sigma^2 C^2 I)) / E``
for ``m >= k`` contributors: one patient changes one site's clipped sum by at most ``2C``
(the episodic argument), so the sum is the subsampled Gaussian mechanism with noise at least
``sigma C``, accounted at ``(sigma / 2, q, 1)``, provided at least ``k`` contributors keep their
noise secret. If secure aggregation fails (the server sees ``u_j``), site ``j`` keeps
``(s / 2, q, 1)``.

The ledger row of such a charge records both without a schema change: ``noise_multiplier`` is
the share ``s`` the site added, ``sensitivity_factor`` is ``2 / sqrt(k)``, so the accounted
multiplier (``s / (2 / sqrt(k)) = sigma / 2``) is the guarantee if secure aggregation holds, and
``noise_multiplier / 2`` (the mechanism's true sensitivity) is the one the site keeps if it fails
(:func:`fallback_epsilons`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from privacy.accounting import epsilon_for
from privacy.ledger import KIND_CHARGE, LedgerEntry
from privacy.mechanisms import MECHANISMS

# Per-coordinate tail kept inside SecAgg+'s clipping range: P(|N(0,1)| > 10) < 2e-23 per value,
# so its clip (which is not linear) acts with probability below d * 2e-23 (added to delta).
NOISE_TAIL = 10.0


def coordinate_range(*, lr: float, clip: float, share: float, episodes: int) -> float:
    """SecAgg+'s clipping range for one distributed-noise update: the noise-free part has every
    coordinate within ``lr C`` (``||sum_e clip(g_e)|| / E <= C``), the noise's coordinates have
    standard deviation ``lr s C / E``; NOISE_TAIL of them fit."""
    return lr * clip * (1.0 + NOISE_TAIL * share / episodes)


def sum_bound(
    *, contributors: int, lr: float, clip: float, share: float, episodes: int, values: int
) -> float:
    """Largest L2 norm the sum of ``contributors`` honest distributed-noise updates reaches but
    with probability below ``exp(-NOISE_TAIL^2 / 2)``: ``m lr C`` for the clipped parts plus the
    chi tail ``s_sum (sqrt(d) + NOISE_TAIL)`` of the summed noise (standard deviation
    ``lr sqrt(m) s C / E`` per coordinate; Laurent and Massart 2000)."""
    std = lr * math.sqrt(contributors) * share * clip / episodes
    return contributors * lr * clip + std * (math.sqrt(values) + NOISE_TAIL)


def secure_ranges(
    *,
    lr: float,
    clip: float,
    share: float,
    episodes: int,
    quantization_range: int,
    contributors: int,
    values: int,
) -> tuple[float, float]:
    """SecAgg+'s clipping range for a distributed-noise update, and the bound on the sum of
    ``contributors`` updates of ``values`` values (with SecAgg+'s rounding, 2c/Q a value)."""
    c = coordinate_range(lr=lr, clip=clip, share=share, episodes=episodes)
    rounding = contributors * math.sqrt(values) * 2.0 * c / quantization_range
    total = sum_bound(
        contributors=contributors, lr=lr, clip=clip, share=share, episodes=episodes, values=values
    )
    return c, total + rounding


def fallback_epsilons(
    entries: Sequence[LedgerEntry], entry: LedgerEntry, *, delta: float, accountant: str
) -> tuple[float, float]:
    """Epsilon of ``entry`` and of every charge up to it, if secure aggregation had failed.

    A distributed-noise row is accounted at its own share (``noise_multiplier`` over the
    mechanism's true sensitivity); every other row as the ledger accounts it.

    Returns:
        ``(epsilon this charge added, epsilon spent after it)`` under that weaker assumption.
    """
    history = []
    for row in entries:
        if row.kind != KIND_CHARGE or row.id > entry.id:
            continue
        sigma = row.accounted_noise_multiplier
        if has_noise_shares(row):
            sigma = MECHANISMS[row.mechanism].accounted_noise_multiplier(row.noise_multiplier)
        history.append((sigma, row.sample_rate, row.steps))
    after = epsilon_for(history, delta=delta, accountant=accountant)
    before = epsilon_for(history[:-1], delta=delta, accountant=accountant)
    return after - before, after


def has_noise_shares(row: LedgerEntry) -> bool:
    """Whether a ledger row charged a mechanism whose sites add shares of the noise (a row of a
    mechanism this version no longer has is accounted as the ledger accounts it)."""
    mechanism = MECHANISMS.get(row.mechanism)
    return mechanism is not None and mechanism.distributed
