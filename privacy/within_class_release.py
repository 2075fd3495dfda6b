"""DP release of a domain's within-class feature covariance, and the metric made from it.

The federation learns *how cases of its domain vary within a condition* (background, anatomy,
acquisition), which carries to conditions no site holds: features are whitened by the
within-class covariance, so a few-shot head on a new condition is not misled by the domain's
nuisance directions (the shared-covariance metric of LDA; Bateni et al. 2020, "Improved Few-Shot
Visual Classification", for few-shot). Two releases, each a Gaussian mechanism over every
patient (q = 1), with the patient as the unit:

1. **The domain centre.** Each image's feature ``f`` is clipped to norm ``R`` (public; in the
   mechanism the adapter's part-normalised features, ``R = sqrt(parts)``) and scaled,
   ``u = f min(1, R/|f|) / R``; patient i with ``n_i`` images contributes
   ``C [sum_j u_j / n_i, 1]`` (norm <= sqrt(2) C), scaled by :data:`CENTRE_WEIGHT` in the
   federation so that both releases share one sensitivity. The centre is ``R S[:d] / S[d]``.
2. **Within-class second moments in a public basis.** With the released centre, each image's
   feature is mapped as adaptation maps it (centred, each part L2-normalised) and scaled to unit
   norm, ``z``, then projected on a public orthonormal basis ``P`` (d x p, from public data):
   ``y = P^T z``, ``|y| <= 1``. Patient i contributes the pair
   ``(C/n_i sum_j y_j y_j^T,  w C/n_i [sum_{j in c} y_j, n_ic]_c)``: the first has Frobenius norm
   <= C, the second <= sqrt(2) w C (as dp-prototypes), so adding or removing a patient moves the
   release by at most ``sqrt(1 + 2 w^2) C`` (``w = 0.25``: sqrt(1.125) C). Noise is drawn on the
   upper triangle (diagonal included) and mirrored, which is post-processing of the triangle's
   release.

Everything after the releases is post-processing: the within-class covariance
``(M - sum_c s_c s_c^T / m_c) / sum_c m_c`` (classes with little noisy mass dropped), shrunk
towards its mean eigenvalue, inverted at the square root inside the basis and the identity outside
it (:func:`inner_metric`). :class:`WithinClassRelease` is the registered mechanism's trainer
(``dp-within-class``); the proof is in docs/privacy.md.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.adaptation import FEATURE_NORM, FeatureMap
from models.imageset import ImageSet
from privacy.dp_config import (
    WITHIN_CLASS_SENSITIVITY,
    WITHIN_CLASS_SUMS_WEIGHT,
    DPWithinClassConfig,
)
from privacy.dp_prototypes import noisy_class_sums, vocabulary_labels

CENTRE_SENSITIVITY = math.sqrt(2.0)  # in units of C: [sum u / n_i, 1] with |u| <= 1
# The federation's centre release is scaled by this, so its bound is the moment release's:
# one registered sensitivity (WITHIN_CLASS_SENSITIVITY) serves both rounds' charges.
CENTRE_WEIGHT = WITHIN_CLASS_SENSITIVITY / CENTRE_SENSITIVITY
MIN_CLASS_MASS = 20.0  # noisy patient mass (in units of C) below which a class is dropped
SHRINK = 0.1  # of the covariance towards its mean eigenvalue (bench/results/demo_within_class)
# What a site's release holds: its centre sums (first round), else its moments.
CENTRE = "centre-sums"
SECOND = "second-moments"
CLASS_SUMS = "class-sums"
STAGE_NONE, STAGE_CENTRE, STAGE_METRIC = 0, 1, 2  # the adapter's ``stage`` buffer


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


def inner_metric(covariance: torch.Tensor, *, shrink: float) -> torch.Tensor:
    """The (p, p) metric inside the basis: the covariance shrunk towards its mean eigenvalue
    ``l`` by ``shrink`` and inverted at the square root, times sqrt(l) (an isotropic covariance
    gives the identity)."""
    values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
    level = max(float(values.clamp_min(0).mean()), 1e-12)
    shrunk = ((1 - shrink) * values.clamp_min(0) + shrink * level).clamp_min(1e-6 * level)
    return vectors @ torch.diag((level / shrunk).sqrt()) @ vectors.T


def whitening(covariance: torch.Tensor, basis: torch.Tensor, *, shrink: float) -> torch.Tensor:
    """The (d, d) metric: :func:`inner_metric` inside the basis, the identity outside it."""
    b = basis.double()
    inner = inner_metric(covariance, shrink=shrink)
    return b @ inner @ b.T + torch.eye(len(b), dtype=b.dtype) - b @ b.T


def apply_metric(mapped: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Mapped features times the metric, back at norm :data:`FEATURE_NORM`."""
    out = mapped.double() @ metric
    return (out / out.norm(dim=1, keepdim=True).clamp_min(1e-12) * FEATURE_NORM).to(mapped.dtype)


class WithinClassRelease:
    """A site's release in one round, as a registered mechanism's trainer: ``train(1)``
    returns the noisy centre sums while the federation has no centre (the adapter's ``stage``
    0), else the noisy moments around the released centre in the adapter's public basis. The
    adapter is only read. Charge the ledger first."""

    def __init__(
        self,
        adapter: nn.Module,
        sets: Sequence[ImageSet],
        *,
        dp: DPWithinClassConfig,
        seed: int | None = None,
    ) -> None:
        """``adapter`` is the model's ``WithinClassMetric`` (a node trains an adapted encoder's
        adapter on its cached features); ``seed=None`` (production) draws the noise from the OS.

        Raises:
            TypeError: ``adapter`` is not a within-class metric.
            ValueError: ``dp.sample_rate`` is not 1.
        """
        from models.feature_adapter import WithinClassMetric

        if not isinstance(adapter, WithinClassMetric):
            raise TypeError(
                "dp-within-class releases through the 'within-class' adapter: set "
                f"backbone.adapter = 'within-class' (got {type(adapter).__name__})"
            )
        if dp.sample_rate != 1.0:
            raise ValueError(f"dp-within-class releases over every patient: q must be 1, got "
                             f"{dp.sample_rate!r}")  # fmt: skip
        self.adapter = adapter
        self.sets = list(sets)
        self.dp = dp
        self._generator = torch.Generator()
        self._generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    def _records(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Features as the adapter outputs them, vocabulary rows and patients of the records of
        the vocabulary's classes (the others are dropped)."""
        rows = [vocabulary_labels(s, self.dp.classes) for s in self.sets]
        keep = [r >= 0 for r in rows]
        with torch.no_grad():
            x = [self.adapter(torch.as_tensor(np.asarray(s.images)[k])).double()
                 for s, k in zip(self.sets, keep, strict=True)]  # fmt: skip
        labels = torch.from_numpy(np.concatenate([r[k] for r, k in zip(rows, keep, strict=True)]))
        owners = np.concatenate(
            [np.asarray(s.patients)[k].astype(str) for s, k in zip(self.sets, keep, strict=True)]
        )
        return torch.cat(x), labels, owners

    def _noisy(self, sums: torch.Tensor) -> np.ndarray:
        """``sums`` plus the mechanism's Gaussian noise on every entry, float32."""
        noisy = noisy_class_sums(sums, noise_multiplier=self.dp.noise_multiplier,
                                 clip=self.dp.max_grad_norm, generator=self._generator)  # fmt: skip
        return noisy.numpy().astype(np.float32)

    def release(self) -> dict[str, np.ndarray]:
        """The round's noisy sums, float32."""
        x, labels, owners = self._records()
        parts = tuple(self.adapter.parts)
        clip = self.dp.max_grad_norm
        if int(self.adapter.stage) == STAGE_NONE:
            sums = CENTRE_WEIGHT * centre_sums(x, owners, radius=len(parts) ** 0.5, clip=clip)
            return {CENTRE: self._noisy(sums)}
        unit = unit_features(x, centre=self.adapter.centre, parts=parts)
        second, sums = moment_sums(unit, labels, owners, basis=self.adapter.basis,
                                   n_classes=len(self.dp.classes), clip=clip,
                                   sums_weight=WITHIN_CLASS_SUMS_WEIGHT)  # fmt: skip
        sigma = self.dp.noise_multiplier * clip
        second = second + symmetric_noise(len(second), sigma, self._generator)
        return {
            SECOND: second.numpy().astype(np.float32),
            CLASS_SUMS: self._noisy(sums),
        }

    def train(
        self, steps: int, *, on_step: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """The release; one per round, so ``steps`` must be the 1 step charged.

        Raises:
            ValueError: ``steps`` is not 1.
        """
        if steps != 1:
            raise ValueError(f"dp-within-class releases once a round: steps must be 1, got {steps}")
        released = self.release()
        if on_step is not None:
            on_step(0)
        return released


def released_centre(total: np.ndarray, *, parts: int, clip: float) -> np.ndarray:
    """The domain centre from the sites' summed centre releases."""
    sums = torch.from_numpy(np.asarray(total, dtype=np.float64)) / CENTRE_WEIGHT
    return centre_from_sums(sums, radius=parts**0.5, clip=clip).numpy()


def released_metric(second: np.ndarray, sums: np.ndarray, *, clip: float) -> np.ndarray:
    """The (p, p) metric inside the basis from the summed moment releases of every round so far.

    Raises:
        ValueError: no class has enough noisy patient mass.
    """
    covariance = within_class_covariance(
        torch.from_numpy(np.asarray(second, dtype=np.float64)),
        torch.from_numpy(np.asarray(sums, dtype=np.float64)),
        sums_weight=WITHIN_CLASS_SUMS_WEIGHT,
        clip=clip,
    )
    return inner_metric(covariance, shrink=SHRINK).numpy()
