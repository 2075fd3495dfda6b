"""Hospital data for demos and benchmarks: one set split across sites by patient, each site with
its own class mix (no patient is at two sites)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models.readers import patient_id_from_provenance
from models.synthetic import DEMO_TRAIN_CLASSES

Arrays = dict[str, np.ndarray]

# Three hospitals that see overlapping but different conditions among the 16 training classes.
DEMO_SITES = ("hospital-a", "hospital-b", "hospital-c")
DEMO_MIXES: tuple[tuple[int, ...], ...] = (
    tuple(range(0, 8)),
    tuple(range(5, 13)),
    (*range(10, DEMO_TRAIN_CLASSES), 0, 1),
)


def split_by_patient(
    arrays: Arrays, mixes: Sequence[Sequence[int]], *, seed: int = 0
) -> list[Arrays]:
    """Deal each class's patients round-robin to the sites whose mix holds that class.

    Args:
        arrays: A set in the shared ``.npz`` layout (images, labels, classes, provenance).
        mixes: For each site, the class ids it holds.
        seed: Shuffles the patients before dealing.

    Returns:
        One set per site, in the same layout and with the full class list.
    """
    rng = np.random.default_rng(seed)
    patients = np.array([patient_id_from_provenance(str(p)) for p in arrays["provenance"]])
    keep: list[list[int]] = [[] for _ in mixes]
    for label in np.unique(arrays["labels"]):
        holders = [i for i, mix in enumerate(mixes) if int(label) in mix]
        if not holders:
            continue
        ids = np.unique(patients[arrays["labels"] == label])
        rng.shuffle(ids)
        for j, pid in enumerate(ids):
            rows = np.flatnonzero((patients == pid) & (arrays["labels"] == label))
            keep[holders[j % len(holders)]].extend(rows.tolist())
    return [
        {k: v if k == "classes" else v[np.sort(rows)] for k, v in arrays.items()} for rows in keep
    ]


def split_evenly(arrays: Arrays, sites: int, *, seed: int = 0) -> list[Arrays]:
    """Split a set across ``sites`` by patient, every site holding every class."""
    return split_by_patient(arrays, [range(len(arrays["classes"]))] * sites, seed=seed)


def write_site(path: Path, arrays: Arrays) -> Path:
    """Write one site's set as a compressed ``.npz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy's stub is too narrow
    return path
