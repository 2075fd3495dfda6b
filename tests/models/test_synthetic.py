"""Synthetic generator: layout, class count, determinism, patients, and loadability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.readers import load_npz, patient_id_from_provenance
from models.synthetic import (
    MAX_CLASSES,
    class_names,
    public_set,
    synthetic_arrays,
    synthetic_imageset,
    write_synthetic_npz,
)


def test_layout_matches_the_shared_npz_files() -> None:
    d = synthetic_arrays(n_classes=24, per_class=4, seed=0)
    assert set(d) == {"images", "labels", "classes", "provenance"}
    assert d["images"].shape == (96, 64, 64, 3) and d["images"].dtype == np.uint8
    assert (
        d["labels"].dtype == np.int64
        and d["labels"].tolist() == np.repeat(np.arange(24), 4).tolist()
    )
    assert len(set(d["classes"])) == 24 >= 20
    assert all(c.startswith("synthetic_") for c in d["classes"])
    assert all(p.startswith("synthetic/") for p in d["provenance"])


def test_up_to_32_distinct_classes_and_limits() -> None:
    d = synthetic_arrays(n_classes=MAX_CLASSES, per_class=1, size=32)
    assert MAX_CLASSES == 32 and len(set(d["classes"])) == 32 and d["images"].shape[1:3] == (32, 32)
    with pytest.raises(ValueError, match="n_classes"):
        synthetic_arrays(n_classes=33)


def test_deterministic_by_seed() -> None:
    a, b, c = (synthetic_arrays(n_classes=4, per_class=3, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["images"], c["images"])


def test_patients_repeat_within_a_class() -> None:
    d = synthetic_arrays(n_classes=3, per_class=6, images_per_patient=3)
    patients = np.array([patient_id_from_provenance(p) for p in d["provenance"]])
    ids, counts = np.unique(patients, return_counts=True)
    assert len(ids) == 6 and set(counts) == {3}
    for pid in ids:
        assert len(set(d["labels"][patients == pid])) == 1


def test_within_class_variation_is_real_and_classes_differ() -> None:
    d = synthetic_arrays(n_classes=8, per_class=6, seed=1)
    x = d["images"].astype(np.float32).mean(axis=-1).reshape(8, 6, -1)
    within = np.mean([np.abs(x[k, 0] - x[k, 2]).mean() for k in range(8)])
    assert within > 5.0  # different patients of one class are not near-copies
    assert np.std(x, axis=(1, 2)).min() > 1.0  # no blank images


def test_npz_round_trip_and_imageset(tmp_path: Path) -> None:
    path = write_synthetic_npz(tmp_path / "s" / "synthetic.npz", n_classes=5, per_class=4, seed=2)
    data = load_npz(path)
    direct = synthetic_imageset(n_classes=5, per_class=4, seed=2)
    assert data.images.shape == (20, 3, 64, 64)
    np.testing.assert_allclose(data.images, direct.images)
    assert data.patients.tolist() == direct.patients.tolist()
    assert direct.classes[0].startswith("synthetic_") and direct.name == "synthetic"


def test_the_public_stand_in_can_come_from_another_modality() -> None:
    same = public_set(per_class=4)
    inverted = public_set(per_class=4, modality="inverted")
    assert same.classes == inverted.classes and set(same.classes).isdisjoint(class_names(24))
    np.testing.assert_array_equal(same.patients, inverted.patients)
    np.testing.assert_allclose(inverted.images, 1.0 - same.images, atol=1e-4)
    with pytest.raises(ValueError, match="public modality"):
        public_set(per_class=4, modality="ultrasound")
