"""Random per-patient image sets for the sensitivity property tests (shared by the mechanisms)."""

import numpy as np

from models.imageset import ImageSet


def random_set(seed: int, n_patients: int, n_classes: int = 4) -> ImageSet:
    """1-3 random 16x16 images per patient, one label per patient."""
    rng = np.random.default_rng(seed)
    records = rng.integers(1, 4, size=n_patients)
    labels = np.concatenate([np.full(r, rng.integers(n_classes)) for r in records])
    patients = np.concatenate([[f"p{i}"] * r for i, r in enumerate(records)])
    images = rng.random((len(labels), 3, 16, 16), dtype=np.float32)
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(n_classes)), patients, "random")


def without(data: ImageSet, patient: str) -> ImageSet:
    """``data`` with every record of ``patient`` removed (the neighbouring dataset)."""
    keep = data.patients != patient
    return ImageSet(
        data.images[keep], data.labels[keep], data.classes, data.patients[keep], data.name
    )
