"""DP prototype release (``dp-prototypes``): sensitivity sqrt(2) C per patient, the noise scale,
one shot over every patient, vocabulary handling, and the numpy post-processing."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from privacy.dp_config import DPPrototypeConfig, parse_classes
from privacy.dp_prototypes import DPPrototypeRelease, class_sums, noisy_class_sums
from privacy.mechanisms import MECHANISMS, PROTOTYPES
from privacy.prototype_release import SUMS, PrototypeRelease, prototypes_from_sums
from tests.privacy.patients import random_set, without

TINY = BackboneConfig(width=8, image_size=16)
BOUND = MECHANISMS[PROTOTYPES].sensitivity  # the registered factor: sqrt(2)


def _unit(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    x = rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x *= rng.uniform(0.0, 1.0, size=(n, 1)) ** (rng.random() < 0.3)  # some shorter than 1
    return torch.from_numpy(x)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_records=st.integers(1, 40),
    n_patients=st.integers(1, 8),
    n_classes=st.integers(1, 4),
    clip=st.floats(0.01, 10.0),
)
def test_one_patient_moves_the_sum_by_at_most_sqrt2_C(seed, n_records, n_patients, n_classes, clip):
    rng = np.random.default_rng(seed)
    features = _unit(rng, n_records, 5)
    labels = torch.from_numpy(rng.integers(-1, n_classes, size=n_records))  # -1: not in vocab
    owners = torch.from_numpy(rng.integers(0, n_patients, size=n_records))
    victim = int(owners[0])
    keep = owners != victim

    full = class_sums(features, labels, owners, n_classes=n_classes, clip=clip)
    rest = class_sums(features[keep], labels[keep], owners[keep], n_classes=n_classes, clip=clip)

    assert float((full - rest).norm()) <= BOUND * clip * (1 + 1e-9)


def test_the_bound_is_reached_by_a_patient_with_identical_images_of_one_class():
    """The test above fails for a mechanism whose sensitivity is above sqrt(2) C (e.g. without
    dividing by n_i, a patient with k images moves the sum by sqrt(k^2 + k^2) C)."""
    f = torch.zeros(4, 3, dtype=torch.float64)
    f[:, 0] = 1.0
    labels = torch.tensor([1, 1, 1, 0])
    owners = torch.tensor([7, 7, 7, 2])
    full = class_sums(f, labels, owners, n_classes=2, clip=0.5)
    rest = class_sums(f[3:], labels[3:], owners[3:], n_classes=2, clip=0.5)
    assert float((full - rest).norm()) == pytest.approx(math.sqrt(2) * 0.5, rel=1e-12)


def test_a_patient_with_images_in_two_classes_is_still_bounded_and_splits_its_weight():
    f = torch.eye(4, dtype=torch.float64)[:3]
    labels = torch.tensor([0, 0, 1])
    owners = torch.tensor([0, 0, 0])
    sums = class_sums(f, labels, owners, n_classes=2, clip=1.0)
    np.testing.assert_allclose(sums[:, -1].numpy(), [2 / 3, 1 / 3])
    np.testing.assert_allclose(sums[0, :4].numpy(), [1 / 3, 1 / 3, 0, 0])
    assert float(sums.norm()) <= math.sqrt(2) + 1e-12


def test_records_outside_the_vocabulary_are_dropped_before_n_i_is_counted():
    f = torch.eye(3, dtype=torch.float64)
    owners = torch.tensor([0, 0, 0])
    with_unknown = class_sums(f, torch.tensor([0, -1, -1]), owners, n_classes=1, clip=1.0)
    alone = class_sums(f[:1], torch.tensor([0]), owners[:1], n_classes=1, clip=1.0)
    torch.testing.assert_close(with_unknown, alone)
    assert float(with_unknown[0, -1]) == 1.0  # n_i counts the one kept record
    assert float(class_sums(f, torch.tensor([-1, -1, -1]), owners, n_classes=1, clip=1.0).abs()
                 .max()) == 0.0  # fmt: skip


def test_features_longer_than_one_are_refused_not_rescaled():
    with pytest.raises(ValueError, match="norm <= 1"):
        class_sums(torch.full((1, 2), 1.0), torch.tensor([0]), torch.tensor([0]), n_classes=1,
                   clip=1.0)  # fmt: skip


def test_the_noise_has_standard_deviation_sigma_C():
    generator = torch.Generator().manual_seed(0)
    zeros = torch.zeros(300, 400, dtype=torch.float64)
    noisy = noisy_class_sums(zeros, noise_multiplier=1.7, clip=0.3, generator=generator)
    assert float(noisy.std()) == pytest.approx(1.7 * 0.3, rel=0.01)
    assert abs(float(noisy.mean())) < 0.01


def _release(sets, classes=("c0", "c1", "c2"), *, sigma=1.0, clip=1.0, seed=0):
    torch.manual_seed(0)
    dp = DPPrototypeConfig(noise_multiplier=sigma, max_grad_norm=clip, classes=classes)
    return DPPrototypeRelease(build_backbone(TINY), sets, dp=dp, seed=seed)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000))
def test_through_the_encoder_one_patient_moves_the_sum_by_at_most_sqrt2_C(seed):
    data = random_set(seed, n_patients=10)
    victim = f"p{seed % 10}"
    full = _release([data], clip=0.2).noiseless_sums()
    rest = _release([without(data, victim)], clip=0.2).noiseless_sums()
    assert float((full - rest).norm()) <= BOUND * 0.2 * (1 + 1e-9)


def test_one_patient_in_two_sets_is_one_patient():
    data = random_set(4, n_patients=6)
    both = _release([data, data]).noiseless_sums()
    one = _release([data]).noiseless_sums()
    torch.testing.assert_close(both, one)  # pooled per patient id: not counted twice


def test_the_registered_builder_releases_once_and_leaves_the_model_as_it_was():
    mechanism = MECHANISMS[PROTOTYPES]
    dp = mechanism.dp_config({"noise_multiplier": 2.0, "classes": ("c1", "c0"), "ways": 3})
    torch.manual_seed(0)
    model = build_backbone(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = mechanism.build_trainer(
        model, [random_set(1, n_patients=6)], dp=dp, meta=MetaConfig(), lr=1e-3, seed=0
    )
    with pytest.raises(ValueError, match="one-shot release: steps must be 1"):
        trainer.train(2)
    released = trainer.train(1)
    assert set(released) == {SUMS}
    assert released[SUMS].shape == (2, model.out_features + 1)
    assert released[SUMS].dtype == np.float32 and np.all(np.isfinite(released[SUMS]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (mechanism.one_shot, mechanism.releases_arrays) == (True, True)


def test_the_config_refuses_sampling_and_a_bad_vocabulary():
    with pytest.raises(ValueError, match="sample_rate"):
        DPPrototypeConfig(noise_multiplier=1.0, sample_rate=0.5, classes=("a",))
    for classes in [(), ("a", "a"), ("a,b",), ("",)]:
        with pytest.raises(ValueError, match="classes"):
            DPPrototypeConfig(noise_multiplier=1.0, classes=classes)
    assert parse_classes(" nevus, melanoma ,") == ("nevus", "melanoma")
    config = DPPrototypeConfig(noise_multiplier=1.0, classes=("a", "b"))
    assert config.to_dict()["classes"] == ["a", "b"]


def test_the_same_seed_gives_the_same_release_and_no_seed_fresh_noise():
    data = random_set(2, n_patients=6)
    np.testing.assert_array_equal(_release([data]).release(), _release([data]).release())
    assert not np.array_equal(_release([data], seed=None).release(), _release([data]).release())


def test_prototypes_divide_by_the_floored_mass_and_the_file_round_trips(tmp_path):
    sums = np.array([[2.0, 4.0, 4.0], [0.3, 0.0, -0.2]])
    protos = prototypes_from_sums(sums, clip=2.0)
    np.testing.assert_allclose(protos, [[1.0, 2.0], [0.3, 0.0]])  # mass 2; floored at 1
    release = PrototypeRelease.summed(
        [sums, sums], classes=("a", "b"), clip=2.0, noise_multiplier=1.5, sites=("x", "y")
    )
    np.testing.assert_allclose(release.sums, 2 * sums)
    loaded = PrototypeRelease.load(release.save(tmp_path / "p.safetensors"))
    assert loaded.classes == ("a", "b") and loaded.sites == ("x", "y")
    np.testing.assert_array_equal(loaded.sums, release.sums)
    assert loaded.digest() == release.digest()


def test_a_data_set_of_classes_outside_the_vocabulary_releases_noise_only():
    data = random_set(3, n_patients=5)
    other = ImageSet(data.images, data.labels, ("x", "y", "z", "w"), data.patients, "other")
    assert float(_release([other]).noiseless_sums().abs().max()) == 0.0
