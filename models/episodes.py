"""N-way K-shot Q-query episode sampling with patient-disjoint support and query sets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import EpisodeError


@dataclass(frozen=True)
class EpisodeConfig:
    """Shape of a few-shot episode."""

    ways: int = 5  # classes per episode; 5-way is the standard few-shot benchmark setting
    shots: int = 5  # labelled support images per class
    queries: int = 10  # query images per class: enough for a stable loss, cheap on 2 CPU cores

    def __post_init__(self) -> None:
        for name in ("ways", "shots", "queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EpisodeConfig.{name} must be an integer >= 1, got {value!r}")
        if self.ways < 2:
            raise ValueError(f"EpisodeConfig.ways must be >= 2, got {self.ways}")


@dataclass(frozen=True)
class Episode:
    """Indices into an image set; labels are episode-local (0..ways-1)."""

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    classes: np.ndarray  # the set's class ids, position = episode-local label


def _split_class(
    indices: np.ndarray, patients: np.ndarray, shots: int, queries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray] | None:
    """Split one class's images into support/query with no patient in both, or None."""
    groups = [indices[patients == p] for p in rng.permutation(np.unique(patients))]
    support: list[int] = []
    query: list[int] = []
    for group in groups:
        target = support if len(support) < shots else query
        if target is query and len(query) >= queries:
            break
        target.extend(rng.permutation(group).tolist())
    if len(support) < shots or len(query) < queries:
        return None
    # Trim overshoot only at the end, so no patient ends on both sides.
    return np.array(support[:shots]), np.array(query[:queries])


def eligible_classes(labels: np.ndarray, patients: np.ndarray, config: EpisodeConfig) -> np.ndarray:
    """Classes with enough images and at least two patients to fill an episode."""
    keep = []
    for c in np.unique(labels):
        mask = labels == c
        if mask.sum() >= config.shots + config.queries and len(np.unique(patients[mask])) >= 2:
            keep.append(int(c))
    return np.array(keep, dtype=np.int64)


def sample_episode(
    labels: np.ndarray,
    patients: np.ndarray,
    config: EpisodeConfig,
    rng: np.random.Generator,
    *,
    classes: np.ndarray | None = None,
) -> Episode:
    """Draw one episode.

    Args:
        labels: class id per image.
        patients: patient id per image; support and query never share a patient.
        config: ways, shots and queries.
        rng: the generator that makes the draw reproducible.
        classes: classes to draw from (default: every eligible class).

    Raises:
        EpisodeError: fewer eligible classes than ``ways`` (names the counts).
    """
    pool = eligible_classes(labels, patients, config) if classes is None else classes
    if len(pool) < config.ways:
        raise EpisodeError(
            f"a {config.ways}-way {config.shots}-shot {config.queries}-query episode needs "
            f"{config.ways} classes with >= {config.shots + config.queries} images from >= 2 "
            f"patients; only {len(pool)} qualify: lower --ways/--shots/--queries"
        )
    for _ in range(16):  # patient grouping can fail for a class by chance; redraw classes then
        chosen = rng.choice(pool, size=config.ways, replace=False)
        parts = []
        for c in chosen:
            idx = np.flatnonzero(labels == c)
            split = _split_class(idx, patients[idx], config.shots, config.queries, rng)
            if split is None:
                break
            parts.append(split)
        else:
            ways = np.arange(config.ways)
            return Episode(
                support=np.concatenate([s for s, _ in parts]),
                support_labels=np.repeat(ways, config.shots),
                query=np.concatenate([q for _, q in parts]),
                query_labels=np.repeat(ways, config.queries),
                classes=np.asarray(chosen, dtype=np.int64),
            )
    raise EpisodeError(
        f"could not split classes into {config.shots} support and {config.queries} query images "
        "from different patients: too few patients per class; lower --shots/--queries"
    )
