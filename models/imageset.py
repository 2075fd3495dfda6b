"""An in-memory labelled image set: the one shape every reader returns and every learner takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.errors import DataError


@dataclass(frozen=True)
class ImageSet:
    """Images after the pipeline, with labels and optional patient ids.

    Attributes:
        images: float32 array ``(N, C, H, W)``, output of the shared MONAI pipeline.
        labels: int64 array ``(N,)`` indexing ``classes``.
        classes: class names, index = label.
        patients: str array ``(N,)``; the unit of privacy and of support/query disjointness.
            Images without a patient id get their own unique id, so one image = one patient.
        name: human-readable name of the set (e.g. the modality or file stem).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    patients: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=str))
    name: str = "dataset"

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.images.ndim != 4 or len(self.images) != n:
            raise DataError(
                f"{self.name}: images must be (N, C, H, W) with N={n} labels, "
                f"got {self.images.shape}"
            )
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise DataError(
                f"{self.name}: labels must lie in [0, {len(self.classes)}), "
                f"got range [{self.labels.min()}, {self.labels.max()}]"
            )
        if len(self.patients) == 0:
            object.__setattr__(
                self, "patients", np.array([f"{self.name}#{i}" for i in range(n)], dtype=str)
            )
        elif len(self.patients) != n:
            raise DataError(f"{self.name}: {len(self.patients)} patient ids for {n} images")

    def __len__(self) -> int:
        return len(self.labels)

    def subset_classes(self, keep: list[int] | np.ndarray, *, name: str | None = None) -> ImageSet:
        """Return the images of the classes ``keep`` only, relabelled 0..len(keep)-1."""
        keep = [int(k) for k in keep]
        mask = np.isin(self.labels, keep)
        remap = np.full(len(self.classes), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        return ImageSet(
            images=self.images[mask],
            labels=remap[self.labels[mask]],
            classes=tuple(self.classes[k] for k in keep),
            patients=self.patients[mask],
            name=name or self.name,
        )
