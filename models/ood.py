"""Is a new case like the labelled cases at all? An out-of-distribution check before classifying.

A few-shot classifier gives every image a label, also pure noise, a colour photograph or a study
of another modality. Before a case is classified, its embedding is compared with the support set:

* **Score.** The distance from the case to its nearest support case, divided by the support's
  own spread: the median distance from each support case to its nearest *other* support case
  (a leave-one-out nearest-neighbour distance). A score near 1 means "as close to the labelled
  cases as they are to each other"; the score is unit-free, so one threshold serves any backbone,
  modality and support size. Nearest-neighbour distances in a network's feature space are a
  standard out-of-distribution score (Sun et al. 2022, "Out-of-distribution detection with deep
  nearest neighbors", ICML); the normalisation by the support's spread is ours, because a
  dashboard's reference set is a dozen labelled cases, not a training set.
* **Distance** (registry ``OOD_DISTANCES``): Euclidean on the raw features, or on unit-length
  features (cosine); the benchmark ``bench/ood.py`` measures both.
* **Two views.** The network's features miss what a random or lightly trained network does not
  encode, and pure noise often lands among textured tissue there. So the same score is also
  computed on five pixel statistics of the image (:func:`image_statistics`: brightness, contrast,
  colourfulness and the correlation of neighbouring pixels, near 1 for any photographed anatomy
  and near 0 for noise), each scaled by its spread in the support set.
* **Threshold.** A case is flagged when either view's score exceeds its threshold
  (:class:`OODConfig`), chosen in ``bench/results/ood.json`` so that at most 5% of
  in-distribution cases are flagged by either. :func:`unusual_scores` returns the larger of the
  two scores, each divided by its threshold: above 1 means flagged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from models.catalogue import Catalogue

MIN_REFERENCE = 2  # a spread needs two support cases
FLAG_AT = 1.0  # unusual_scores above this are flagged (each view's score over its threshold)


def _euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cdist(unit_a, unit_b)


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# name -> pairwise distances (n, m) of two feature sets; a new distance is one new entry.
OOD_DISTANCES: Catalogue[Distance] = Catalogue(
    "OOD distance", {"euclidean": _euclidean, "cosine": _cosine}
)


@dataclass(frozen=True)
class OODConfig:
    """When a case counts as unlike the labelled cases (measured in bench/results/ood.json)."""

    # bench/results/ood.json, Conv-4 pre-trained on synthetic classes, 3-way 5-shot, 6 conditions:
    # with the pixel view, euclidean and cosine flag alike (noise 100%, photographs 89% / 90%,
    # another modality 79% / 80%, at 5% in-distribution); euclidean needs no normalisation.
    distance: str = "euclidean"
    threshold: float = 1.73  # features: with pixel_threshold, 5% of in-distribution cases flagged
    pixel_threshold: float = 3.09  # the pixel view's share of the same 5% (same bench run)

    def __post_init__(self) -> None:
        if self.distance not in OOD_DISTANCES:
            raise ValueError(
                f"OODConfig.distance must be one of {sorted(OOD_DISTANCES)}, got {self.distance!r}"
            )
        for name in ("threshold", "pixel_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OODConfig.{name} must be > 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with benchmark results."""
        return asdict(self)


@dataclass(frozen=True)
class OODReference:
    """The support set's features and their spread (what a new case is compared with)."""

    features: torch.Tensor  # (n, d) support features
    spread: float  # median leave-one-out nearest-neighbour distance of the support
    distance: str


def reference_of(features: torch.Tensor, *, config: OODConfig = OODConfig()) -> OODReference:
    """The reference of a support set's features ``(n, d)``.

    Raises:
        ValueError: fewer than :data:`MIN_REFERENCE` support cases.
    """
    if len(features) < MIN_REFERENCE:
        raise ValueError(
            f"an out-of-distribution reference needs >= {MIN_REFERENCE} support cases, "
            f"got {len(features)}"
        )
    pairwise = OOD_DISTANCES[config.distance](features, features)
    pairwise.fill_diagonal_(float("inf"))
    nearest = pairwise.min(dim=1).values
    positive = nearest[nearest > 0]  # exact duplicates would make the spread 0
    spread = float(positive.median()) if len(positive) else 1.0
    return OODReference(features=features, spread=max(spread, 1e-12), distance=config.distance)


def ood_scores(reference: OODReference, features: torch.Tensor) -> torch.Tensor:
    """Each case's nearest-support distance in units of the support's spread, ``(m,)``."""
    if len(features) == 0:
        return torch.empty(0)
    distances = OOD_DISTANCES[reference.distance](features, reference.features)
    return distances.min(dim=1).values / reference.spread


STAT_FLOOR = 0.02  # a statistic constant over the support set is scaled as if it varied this much


def image_statistics(images: torch.Tensor) -> torch.Tensor:
    """Five statistics per pipeline output ``(n, C, S, S)`` in [0, 1]: mean and standard deviation
    of the grey image, colourfulness (mean spread across channels), and the correlation of
    horizontally and of vertically neighbouring grey pixels.

    Computed with numpy: a few small reductions, which torch's thread pool only slows down."""
    arr = images.detach().cpu().numpy().astype(np.float64, copy=False)
    grey = arr.mean(axis=1)
    flat = grey.reshape(len(arr), -1)
    colour = arr.std(axis=1).reshape(len(arr), -1).mean(axis=1)

    def neighbours(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(axis=1, keepdims=True)
        b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(axis=1, keepdims=True)
        return (a * b).mean(axis=1) / np.maximum(a.std(axis=1) * b.std(axis=1), 1e-8)

    across = neighbours(grey[:, :, :-1], grey[:, :, 1:])
    down = neighbours(grey[:, :-1, :], grey[:, 1:, :])
    stats = np.stack([flat.mean(axis=1), flat.std(axis=1), colour, across, down], axis=1)
    return torch.from_numpy(stats.astype(np.float32))


def pixel_view(
    support_images: torch.Tensor, case_images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The support's and the cases' :func:`image_statistics`, each statistic divided by its
    standard deviation over the support (at least :data:`STAT_FLOOR`)."""
    support, cases = image_statistics(support_images), image_statistics(case_images)
    scale = support.std(0, unbiased=False).clamp_min(STAT_FLOOR)
    return support / scale, cases / scale


def unusual_scores(
    *,
    support_features: torch.Tensor,
    case_features: torch.Tensor,
    support_images: torch.Tensor,
    case_images: torch.Tensor,
    config: OODConfig = OODConfig(),
) -> torch.Tensor:
    """Each case's larger view score over its threshold ``(m,)``: above :data:`FLAG_AT` means
    flagged.

    Args:
        support_features: the support set's network features ``(n, d)``.
        case_features: the new cases' features ``(m, d)``, from the same network.
        support_images: the support's pipeline outputs ``(n, C, S, S)``.
        case_images: the new cases' pipeline outputs ``(m, C, S, S)``.
        config: distance and thresholds.
    """
    features = ood_scores(reference_of(support_features, config=config), case_features)
    support_stats, case_stats = pixel_view(support_images, case_images)
    euclidean = OODConfig(distance="euclidean")
    pixels = ood_scores(reference_of(support_stats, config=euclidean), case_stats)
    return torch.maximum(features / config.threshold, pixels / config.pixel_threshold)


def support_outlier_scores(
    *,
    support_features: torch.Tensor,
    support_images: torch.Tensor,
    config: OODConfig = OODConfig(),
) -> torch.Tensor:
    """Each labelled case's :func:`unusual_scores` against the *other* labelled cases, ``(n,)``
    (above :data:`FLAG_AT`: it looks unlike all of them, as a photograph filed as a lesion or a
    study of another modality would). Zeros when fewer than ``MIN_REFERENCE + 1`` cases: the
    others give no spread to compare with.

    The same score and thresholds as for new cases, left out one at a time (the leave-one-out
    protocol of the reliability estimate): a case cannot vouch for itself. The pixel statistics
    are computed once (they are per image); only their scaling and the references are refitted
    per case.
    """
    n = len(support_features)
    if n < MIN_REFERENCE + 1:
        return torch.zeros(n)
    stats = image_statistics(support_images)
    euclidean = OODConfig(distance="euclidean")
    scores = []
    for i in range(n):
        others = torch.tensor([j for j in range(n) if j != i])
        features = ood_scores(
            reference_of(support_features[others], config=config), support_features[i : i + 1]
        )
        scale = stats[others].std(0, unbiased=False).clamp_min(STAT_FLOOR)  # as pixel_view
        pixels = ood_scores(
            reference_of(stats[others] / scale, config=euclidean), stats[i : i + 1] / scale
        )
        scores.append(torch.maximum(features / config.threshold, pixels / config.pixel_threshold))
    return torch.cat(scores)
