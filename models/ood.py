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
* **Threshold.** A case is flagged when its score exceeds :attr:`OODConfig.threshold`, chosen in
  ``bench/results/ood.json`` as the score that at most 5% of in-distribution cases exceed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

MIN_REFERENCE = 2  # a spread needs two support cases


def _euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cdist(unit_a, unit_b)


Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# name -> pairwise distances (n, m) of two feature sets; a new distance is one new entry.
OOD_DISTANCES: dict[str, Distance] = {"euclidean": _euclidean, "cosine": _cosine}


@dataclass(frozen=True)
class OODConfig:
    """When a case counts as unlike the labelled cases (measured in bench/results/ood.json)."""

    distance: str = "euclidean"  # see bench/results/ood.json for both distances' rates
    threshold: float = 2.0  # placeholder until bench/ood.py has run; see the module docstring

    def __post_init__(self) -> None:
        if self.distance not in OOD_DISTANCES:
            raise ValueError(
                f"OODConfig.distance must be one of {sorted(OOD_DISTANCES)}, got {self.distance!r}"
            )
        if not self.threshold > 0:
            raise ValueError(f"OODConfig.threshold must be > 0, got {self.threshold}")

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


def unusual(scores: torch.Tensor, *, config: OODConfig = OODConfig()) -> torch.Tensor:
    """Which cases are flagged (boolean ``(m,)``): score above the threshold."""
    return scores > config.threshold
