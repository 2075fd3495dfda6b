"""DP release of a domain's within-class feature covariance, and the metric made from it.

The federation learns *how cases of its domain vary within a condition* (background, anatomy,
acquisition), which carries to conditions no site holds: features are whitened by the
within-class covariance, so a few-shot head on a new condition is not misled by the domain's
nuisance directions (the shared-covariance metric of LDA; Bateni et al. 2020, "Improved Few-Shot
Visual Classification", for few-shot). Two releases, each a Gaussian mechanism over every
patient (q = 1), with the patient as the unit:

1. **The domain centre.** Each image's raw feature ``f`` is clipped to norm ``R`` (public) and
   scaled, ``u = f min(1, R/|f|) / R``; patient i with ``n_i`` images contributes
   ``C [sum_j u_j / n_i, 1]`` (norm <= sqrt(2) C). The centre is ``R S[:d] / S[d]``.
2. **Within-class second moments in a public basis.** With the released centre, each image's
   feature is mapped as adaptation maps it (centred, each part L2-normalised) and scaled to unit
   norm, ``z``, then projected on a public orthonormal basis ``P`` (d x p, from public data):
   ``y = P^T z``, ``|y| <= 1``. Patient i contributes the pair
   ``(C/n_i sum_j y_j y_j^T,  w C/n_i [sum_{j in c} y_j, n_ic]_c)``: the first has Frobenius norm
   <= C, the second <= sqrt(2) w C (as dp-prototypes), so adding or removing a patient moves the
   release by at most ``sqrt(1 + 2 w^2) C``. Noise is drawn on the upper triangle (diagonal
   included) and mirrored, which is post-processing of the triangle's release.

Everything after the releases is post-processing: the within-class covariance
``(M - sum_c s_c s_c^T / m_c) / sum_c m_c`` (classes with little noisy mass dropped), shrunk
towards its mean eigenvalue, inverted at the square root inside the basis and the identity outside
it (:func:`whitening`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from models.adaptation import FEATURE_NORM, FeatureMap
from privacy.accounting import calibrate_noise_multiplier, worst_epsilon

CENTRE_SENSITIVITY = math.sqrt(2.0)  # in units of C: [sum u / n_i, 1] with |u| <= 1
MIN_CLASS_MASS = 20.0  # noisy patient mass (in units of C) below which a class is dropped


def moment_sensitivity(sums_weight: float) -> float:
    """L2 sensitivity, in units of C, of the moment release with class sums weighted by
    ``sums_weight``: ``sqrt(1 + 2 w^2)``."""
    return math.sqrt(1.0 + 2.0 * sums_weight**2)


def _patient_weights(owners: np.ndarray, clip: float) -> torch.Tensor:
    """``C / n_i`` for each record of patient i."""
    _, owner, counts = np.unique(
        np.asarray(owners).astype(str), return_inverse=True, return_counts=True
    )
    return torch.from_numpy(clip / counts[owner]).double()


def centre_sums(features: torch.Tensor, owners: np.ndarray, *, radius: float, clip: float):
    """The noiseless centre release ``(d+1,)``: each patient's mean clipped, scaled feature and
    its unit mass, times C."""
    f = features.double().flatten(1)
    scale = (radius / f.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0) / radius
    weight = _patient_weights(owners, clip)
    u = torch.cat([f * scale[:, None], torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
    return (u * weight[:, None]).sum(0)


def centre_from_sums(sums: torch.Tensor, *, radius: float, clip: float) -> torch.Tensor:
    """The domain centre from a (noisy, summed) centre release."""
    mass = max(float(sums[-1]) / clip, 1.0)
    return radius * sums[:-1] / (mass * clip)


def unit_features(
    features: torch.Tensor, *, centre: torch.Tensor, parts: tuple[int, ...]
) -> torch.Tensor:
    """Features mapped as adaptation maps them (centred, parts normalised), at unit norm."""
    mapped = FeatureMap(mean=centre.double(), normalise=True, parts=parts)(features.double())
    return mapped / FEATURE_NORM


def moment_sums(
    unit: torch.Tensor,
    labels: torch.Tensor,
    owners: np.ndarray,
    *,
    basis: torch.Tensor,
    n_classes: int,
    clip: float,
    sums_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noiseless moment release: ``M`` (p, p) and the weighted class sums ``(K, p+1)``."""
    if len(unit) and float(unit.norm(dim=1).max()) > 1 + 1e-9:
        raise ValueError("unit features must have norm <= 1")
    y = unit.double() @ basis.double()
    weight = _patient_weights(owners, clip)
    second = (y * weight[:, None]).T @ y
    rows = torch.cat([y, torch.ones(len(y), 1, dtype=y.dtype)], dim=1) * weight[:, None]
    sums = torch.zeros(n_classes, y.shape[1] + 1, dtype=y.dtype)
    sums.index_add_(0, labels.long(), sums_weight * rows)
    return second, sums


def symmetric_noise(size: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise drawn on the upper triangle (diagonal included) and mirrored."""
    upper = torch.triu(
        torch.normal(0.0, sigma, (size, size), generator=generator, dtype=torch.float64)
    )
    return upper + torch.triu(upper, 1).T


def within_class_covariance(
    second: torch.Tensor,
    sums: torch.Tensor,
    *,
    sums_weight: float,
    clip: float,
    min_mass: float = MIN_CLASS_MASS,
) -> torch.Tensor:
    """``(M - sum_c s_c s_c^T / m_c) / sum_c m_c`` from (noisy, summed) moments; classes whose
    noisy mass is under ``min_mass`` patients are left out."""
    s = sums / sums_weight
    mass = s[:, -1]
    keep = mass >= min_mass * clip
    if not bool(keep.any()):
        raise ValueError("no class has enough patients for a within-class covariance")
    vectors, m = s[keep, :-1], mass[keep]
    between = (vectors.T / m) @ vectors
    return (second - between) / m.sum()


def whitening(covariance: torch.Tensor, basis: torch.Tensor, *, shrink: float) -> torch.Tensor:
    """The (d, d) metric: inside the basis, the covariance shrunk towards its mean eigenvalue
    ``l`` by ``shrink`` and inverted at the square root (times sqrt(l), so an isotropic
    covariance gives the identity); outside it, the identity."""
    values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    level = max(float(values.clamp_min(0).mean()), 1e-12)
    shrunk = ((1 - shrink) * values.clamp_min(0) + shrink * level).clamp_min(1e-6 * level)
    inner = vectors @ torch.diag((level / shrunk).sqrt()) @ vectors.T
    b = basis.double()
    return b @ inner @ b.T + torch.eye(len(b), dtype=b.dtype) - b @ b.T


def apply_metric(mapped: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Mapped features times the metric, back at norm :data:`FEATURE_NORM`."""
    out = mapped.double() @ metric
    return (out / out.norm(dim=1, keepdim=True).clamp_min(1e-12) * FEATURE_NORM).to(mapped.dtype)


@dataclass(frozen=True)
class ReleasePlan:
    """Noise of the two releases and the epsilon they cost together."""

    centre_sigma: float  # sigma as applied to C for the centre release
    moment_sigma: float  # sigma as applied to C for each moment release
    moment_releases: int
    sums_weight: float
    epsilon: float  # worst of the RDP and PRV accountants over both
    delta: float

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history: (sigma over sensitivity, q = 1, releases)."""
        return release_history(
            self.centre_sigma, self.moment_sigma, self.moment_releases, self.sums_weight
        )


def release_history(
    centre_sigma: float, moment_sigma: float, releases: int, sums_weight: float
) -> list[tuple[float, float, int]]:
    """Both releases as accountant entries."""
    return [
        (centre_sigma / CENTRE_SENSITIVITY, 1.0, 1),
        (moment_sigma / moment_sensitivity(sums_weight), 1.0, releases),
    ]


def plan_for_epsilon(
    epsilon: float,
    *,
    delta: float,
    centre_share: float = 0.1,
    moment_releases: int = 1,
    sums_weight: float = 0.5,
) -> ReleasePlan:
    """Noise for both releases within ``epsilon``: the centre's alone would cost
    ``centre_share`` of it, the moments' is the smallest (bisection, to 1%) whose composition
    with the centre's stays within ``epsilon`` (worst of the RDP and PRV accountants)."""
    centre_accounted = calibrate_noise_multiplier(
        target_epsilon=centre_share * epsilon, delta=delta, sample_rate=1.0, steps=1
    )
    centre_sigma = centre_accounted * CENTRE_SENSITIVITY

    def spent(sigma: float) -> float:
        history = release_history(centre_sigma, sigma, moment_releases, sums_weight)
        return worst_epsilon(history, delta=delta)[0]

    low, high = 1e-3, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
    while high / low > 1.01:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return ReleasePlan(centre_sigma, high, moment_releases, sums_weight, spent(high), delta)
