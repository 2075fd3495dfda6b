import numpy as np
import pytest

from federation.aggregation import aggregate, apply_update, krum, trimmed_mean, weighted_mean


def deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "a": rng.standard_normal((2, 3)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32),
        }
        for _ in range(n)
    ]


def test_weighted_mean_equals_the_numpy_reference():
    ds, weights = deltas(3), [1.0, 2.0, 5.0]
    out = weighted_mean(ds, weights)
    for name in ("a", "b"):
        reference = np.average(np.stack([d[name] for d in ds]), axis=0, weights=weights)
        np.testing.assert_allclose(out[name], reference, rtol=1e-6)
        assert out[name].dtype == np.float32


def test_server_step_applies_the_learning_rate():
    state = {"a": np.ones((2, 3), np.float32), "b": np.zeros(5, np.float32)}
    update = deltas(1)[0]
    new = apply_update(state, update, server_lr=0.5)
    np.testing.assert_allclose(new["a"], 1 + 0.5 * update["a"], rtol=1e-6)


def test_trimmed_mean_ignores_one_poisoned_update():
    honest = deltas(4)
    poisoned = [*honest, {k: v + 1e6 for k, v in honest[0].items()}]
    out = trimmed_mean(poisoned, trim=1)
    for name in ("a", "b"):
        stacked = np.sort(np.stack([d[name] for d in poisoned]).astype(np.float64), axis=0)
        np.testing.assert_allclose(out[name], stacked[1:-1].mean(axis=0), rtol=1e-6)
        assert np.abs(out[name]).max() < 10


def krum_reference(ds: list[dict[str, np.ndarray]], byzantine: int) -> int:
    """Blanchard et al. 2017, by hand: index of the update with the least summed squared distance
    to its n - f - 2 nearest others."""
    flat = [np.concatenate([d[k].ravel() for k in sorted(d)]).astype(np.float64) for d in ds]
    scores = []
    for i, x in enumerate(flat):
        distances = sorted(float(np.sum((x - y) ** 2)) for j, y in enumerate(flat) if j != i)
        scores.append(sum(distances[: len(ds) - byzantine - 2]))
    return int(np.argmin(scores))


@pytest.mark.parametrize("poisoned_at", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("order_seed", [0, 1])
def test_krum_picks_the_reference_honest_update_wherever_the_poisoned_one_is(
    poisoned_at: int, order_seed: int
):
    # Honest updates at different distances from their centre, so exactly one is Krum's choice.
    honest = [
        {k: v * 0.01 * (1 + i) + 1.0 for k, v in d.items()}
        for i, d in enumerate(deltas(4, seed=order_seed))
    ]
    order = np.random.default_rng(order_seed).permutation(4)
    updates = [honest[i] for i in order]
    poison = {k: np.full_like(v, 1e3) for k, v in honest[0].items()}
    updates.insert(poisoned_at, poison)

    chosen = krum(updates, byzantine=1)

    expected = krum_reference(updates, byzantine=1)
    assert expected != poisoned_at
    for k in poison:
        np.testing.assert_array_equal(chosen[k], updates[expected][k])
    assert not any(np.array_equal(chosen[k], poison[k]) for k in poison)


@pytest.mark.parametrize(
    ("method", "n", "kwargs"), [("trimmed-mean", 2, {"trim": 1}), ("krum", 4, {"byzantine": 1})]
)
def test_robust_rules_refuse_too_few_updates(method, n, kwargs):
    with pytest.raises(ValueError, match=r"cannot drop|needs more than"):
        aggregate(deltas(n), [1.0] * n, method=method, **kwargs)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="weights must be finite"):
        weighted_mean(deltas(2), [1.0, float("nan")])
