import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.episodes import EpisodeConfig, eligible_classes, sample_episode
from models.errors import EpisodeError


def _dataset(n_classes: int, per_class: int, per_patient: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(n_classes), per_class)
    patients = np.array(
        [
            f"c{lab}-p{i // per_patient}"
            for lab, i in zip(labels, np.tile(np.arange(per_class), n_classes), strict=True)
        ]
    )
    return labels, patients


@settings(max_examples=60, deadline=None)
@given(
    ways=st.integers(2, 5),
    shots=st.integers(1, 5),
    queries=st.integers(1, 6),
    per_patient=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_episode_shape_and_patient_disjointness(ways, shots, queries, per_patient, seed):
    labels, patients = _dataset(n_classes=6, per_class=30, per_patient=per_patient)
    config = EpisodeConfig(ways=ways, shots=shots, queries=queries)

    ep = sample_episode(labels, patients, config, np.random.default_rng(seed))

    assert len(ep.support) == ways * shots and len(ep.query) == ways * queries
    assert len(set(ep.classes.tolist())) == ways
    assert set(patients[ep.support]).isdisjoint(patients[ep.query])
    assert len(set(ep.support) | set(ep.query)) == len(ep.support) + len(ep.query)
    # episode-local labels agree with the set's labels
    np.testing.assert_array_equal(ep.classes[ep.support_labels], labels[ep.support])
    np.testing.assert_array_equal(ep.classes[ep.query_labels], labels[ep.query])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_same_seed_same_episode(seed):
    labels, patients = _dataset(5, 20, 2)
    config = EpisodeConfig(ways=3, shots=2, queries=3)
    a = sample_episode(labels, patients, config, np.random.default_rng(seed))
    b = sample_episode(labels, patients, config, np.random.default_rng(seed))
    np.testing.assert_array_equal(a.support, b.support)
    np.testing.assert_array_equal(a.query, b.query)


def test_single_patient_class_is_not_eligible():
    labels = np.array([0] * 10 + [1] * 10)
    patients = np.array(["a"] * 10 + [f"b{i}" for i in range(10)])
    config = EpisodeConfig(ways=2, shots=2, queries=2)
    assert eligible_classes(labels, patients, config).tolist() == [1]
    with pytest.raises(EpisodeError, match="only 1 qualify"):
        sample_episode(labels, patients, config, np.random.default_rng(0))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="shots"):
        EpisodeConfig(shots=0)
    with pytest.raises(ValueError, match="ways"):
        EpisodeConfig(ways=1)
