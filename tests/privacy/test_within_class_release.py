"""The within-class covariance release (privacy/within_class_release.py): each release's
sensitivity per patient (bounded, and reached), the post-processing without noise, and the
noise plan's epsilon."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy import within_class_release as wc


def _orthonormal(rng: np.random.Generator, d: int, p: int) -> torch.Tensor:
    q, _ = np.linalg.qr(rng.normal(size=(d, p)))
    return torch.from_numpy(q)


def _unit(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return torch.from_numpy(x * rng.uniform(0.2, 1.0, size=(n, 1)))


def _release(unit, labels, owners, basis, classes, clip, weight) -> torch.Tensor:
    second, sums = wc.moment_sums(
        unit, labels, owners, basis=basis, n_classes=classes, clip=clip, sums_weight=weight
    )
    upper = second[torch.triu_indices(len(second), len(second)).unbind()]
    return torch.cat([upper, sums.flatten()])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    records=st.integers(2, 30),
    patients=st.integers(2, 8),
    clip=st.floats(0.01, 10.0),
    weight=st.floats(0.1, 2.0),
)
def test_one_patient_moves_the_moment_release_by_at_most_its_sensitivity(
    seed, records, patients, clip, weight
):
    rng = np.random.default_rng(seed)
    d, p, classes = 12, 5, 3
    unit, basis = _unit(rng, records, d), _orthonormal(rng, d, p)
    labels = torch.from_numpy(rng.integers(0, classes, records))
    owners = rng.integers(0, patients, records)
    full = _release(unit, labels, owners, basis, classes, clip, weight)
    bound = wc.moment_sensitivity(weight) * clip
    for gone in np.unique(owners):
        keep = owners != gone
        rest = _release(unit[keep], labels[keep], owners[keep], basis, classes, clip, weight)
        assert float((full - rest).norm()) <= bound * (1 + 1e-9)


def test_the_moment_bound_is_reached_by_one_image_in_the_basis():
    rng = np.random.default_rng(0)
    basis = _orthonormal(rng, 10, 4)
    unit = basis[:, :1].T.clone()  # one image, norm 1, inside the basis
    release = _release(unit, torch.tensor([1]), np.array([7]), basis, 3, 2.0, 0.5)
    assert float(release.norm()) == pytest.approx(wc.moment_sensitivity(0.5) * 2.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), records=st.integers(2, 20), radius=st.floats(0.5, 50.0))
def test_one_patient_moves_the_centre_release_by_at_most_sqrt2_C(seed, records, radius):
    rng = np.random.default_rng(seed)
    features = torch.from_numpy(rng.normal(scale=20.0, size=(records, 6)))
    owners = rng.integers(0, 4, records)
    full = wc.centre_sums(features, owners, radius=radius, clip=1.5)
    for gone in np.unique(owners):
        keep = owners != gone
        rest = wc.centre_sums(features[keep], owners[keep], radius=radius, clip=1.5)
        assert float((full - rest).norm()) <= wc.CENTRE_SENSITIVITY * 1.5 * (1 + 1e-9)


def test_without_noise_the_release_gives_the_within_class_covariance():
    rng = np.random.default_rng(1)
    d, classes = 8, 3
    means = rng.normal(size=(classes, d))
    labels = np.repeat(np.arange(classes), 60)
    x = means[labels] + 0.3 * rng.normal(size=(len(labels), d))
    unit = torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True).max())
    owners = np.arange(len(labels)) // 2  # two images per patient, same class
    basis = torch.eye(d, dtype=torch.float64)
    second, sums = wc.moment_sums(
        unit,
        torch.from_numpy(labels),
        owners,
        basis=basis,
        n_classes=classes,
        clip=1.0,
        sums_weight=0.5,
    )
    found = wc.within_class_covariance(second, sums, sums_weight=0.5, clip=1.0)
    centred = torch.cat([unit[labels == c] - unit[labels == c].mean(0) for c in range(classes)])
    assert torch.allclose(found, centred.T @ centred / len(centred), atol=1e-12)


def test_an_isotropic_covariance_gives_the_identity_metric():
    rng = np.random.default_rng(2)
    basis = _orthonormal(rng, 9, 4)
    metric = wc.whitening(0.01 * torch.eye(4, dtype=torch.float64), basis, shrink=0.3)
    assert torch.allclose(metric, torch.eye(9, dtype=torch.float64), atol=1e-10)


def test_whitening_weighs_the_nuisance_direction_down():
    basis = torch.eye(3, dtype=torch.float64)
    covariance = torch.diag(torch.tensor([1.0, 0.01, 0.01], dtype=torch.float64))
    metric = wc.whitening(covariance, basis, shrink=0.3)
    mapped = wc.apply_metric(torch.eye(3, dtype=torch.float64), metric)
    assert float(mapped[0] @ metric[:, 0]) < float(mapped[1] @ metric[:, 1])
    assert metric[0, 0] < metric[1, 1]


def test_a_class_without_enough_patients_is_left_out_and_none_is_an_error():
    second = torch.eye(2, dtype=torch.float64)
    sums = torch.tensor([[1.0, 0.0, 5.0]], dtype=torch.float64)  # mass 10 < 20 patients
    with pytest.raises(ValueError, match="enough patients"):
        wc.within_class_covariance(second, sums, sums_weight=0.5, clip=1.0)


def test_features_longer_than_one_are_refused():
    with pytest.raises(ValueError, match="norm <= 1"):
        wc.moment_sums(
            torch.ones(1, 4, dtype=torch.float64),
            torch.tensor([0]),
            np.array([0]),
            basis=torch.eye(4, dtype=torch.float64),
            n_classes=1,
            clip=1.0,
            sums_weight=0.5,
        )
