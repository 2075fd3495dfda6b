import numpy as np
import pytest

from federation.errors import InvalidUpdateError
from federation.validation import update_norm, validate_update

REFERENCE = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}


def delta(scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in REFERENCE.items()
    }


def test_a_good_update_passes_unchanged():
    d = delta()
    result = validate_update(d, REFERENCE, norm_bound=10.0)
    assert not result.clipped and result.norm == pytest.approx(update_norm(d))
    np.testing.assert_array_equal(result.delta["w"], d["w"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    d = delta()
    d["w"][1, 2] = bad
    with pytest.raises(InvalidUpdateError, match="w holds 1 non-finite"):
        validate_update(d, REFERENCE, norm_bound=10.0)


def test_wrong_shape_dtype_missing_and_extra_names_are_all_named():
    d = {"w": np.zeros((4, 3), np.float32), "extra": np.zeros(1, np.float32)}
    with pytest.raises(InvalidUpdateError) as info:
        validate_update(d, REFERENCE, norm_bound=10.0)
    message = str(info.value)
    assert "missing b" in message and "unexpected extra" in message and "shape (4, 3)" in message
    with pytest.raises(InvalidUpdateError, match="dtype float64"):
        validate_update({**delta(), "b": np.zeros(4)}, REFERENCE, norm_bound=10.0)


def test_a_1e6_scaled_update_is_clipped_to_the_bound_or_rejected():
    d = {k: v * 1e6 for k, v in delta().items()}
    clipped = validate_update(d, REFERENCE, norm_bound=2.0, policy="clip")
    assert clipped.clipped and clipped.norm > 1e4
    assert update_norm(clipped.delta) == pytest.approx(2.0, rel=1e-5)
    direction = d["w"] / np.linalg.norm(d["w"])
    np.testing.assert_allclose(
        clipped.delta["w"] / np.linalg.norm(clipped.delta["w"]), direction, rtol=1e-4
    )
    with pytest.raises(InvalidUpdateError, match="exceeds the bound 2"):
        validate_update(d, REFERENCE, norm_bound=2.0, policy="reject")
