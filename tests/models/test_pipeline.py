"""The shared MONAI pipeline: shapes, ranges, path/array/batch equivalence, augmentations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image
from scipy import stats

from models.augment import (
    AUG_FLIP_PROB,
    AUG_GAMMA,
    AUG_NOISE_STD,
    AUG_ROT90_PROB,
    AUG_SHIFT,
    augment_batch,
    random_transforms,
)
from models.errors import DataError
from models.pipeline import (
    IMAGE_KEY,
    FixChannels,
    FixChannelsd,
    PipelineConfig,
    SliceVolume,
    build_transforms,
    preprocess_arrays,
)

CONFIG = PipelineConfig()
RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (100, 80), dtype=np.uint8)
COLOUR = RNG.integers(0, 256, (70, 90, 3), dtype=np.uint8)


def run(source: object, *, train: bool = False) -> torch.Tensor:
    return build_transforms(CONFIG, train=train)({IMAGE_KEY: source})[IMAGE_KEY]


@pytest.mark.parametrize("image", [GREY, COLOUR], ids=["grey", "colour"])
def test_grey_and_colour_give_three_channels_in_unit_range(image: np.ndarray) -> None:
    out = run(image)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) > 0.9 and float(out.min()) < 0.1  # the percentile window is used


def test_grey_channels_are_identical_and_alpha_is_dropped() -> None:
    out = run(GREY)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    rgba = np.concatenate([COLOUR, np.full((70, 90, 1), 255, np.uint8)], axis=-1)
    assert torch.allclose(run(rgba), run(COLOUR))


@pytest.mark.parametrize("image", [GREY, COLOUR], ids=["grey", "colour"])
def test_file_and_array_give_the_same_tensor(tmp_path: Path, image: np.ndarray) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    assert torch.allclose(run(str(path)), run(image), atol=1e-5)


def test_orientation_is_kept() -> None:
    image = np.zeros((64, 64), np.uint8)
    image[:8, :] = 255  # a bright top band must stay on top, not move to the left
    out = run(image)
    assert float(out[0, :4].mean()) > 0.9 and float(out[0, :, :4].mean()) < 0.3


@pytest.mark.parametrize("shape", [(100, 80), (70, 90, 3), (28, 28), (64, 64, 3)])
def test_fast_path_matches_per_image_transforms(shape: tuple[int, ...]) -> None:
    images = RNG.integers(0, 256, (5, *shape), dtype=np.uint8)
    fast = preprocess_arrays(images, CONFIG)
    slow = np.stack([run(img).numpy() for img in images])
    assert fast.shape == (5, 3, 64, 64) and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_fast_path_matches_for_float_images_and_one_channel_config() -> None:
    config = PipelineConfig(channels=1, image_size=32)
    images = RNG.normal(100.0, 30.0, (3, 50, 40, 3)).astype(np.float32)
    slow = np.stack(
        [build_transforms(config, train=False)({IMAGE_KEY: i})[IMAGE_KEY] for i in images]
    )
    np.testing.assert_allclose(preprocess_arrays(images, config), slow, atol=1e-5)


def test_fast_path_rejects_nan_and_bad_shapes() -> None:
    with pytest.raises(DataError, match="NaN"):
        preprocess_arrays(np.full((2, 16, 16), np.nan, np.float32), CONFIG)
    with pytest.raises(DataError, match="expected"):
        preprocess_arrays(np.zeros((16, 16), np.uint8), CONFIG)


def test_train_transforms_randomise_within_range() -> None:
    outs = [run(COLOUR, train=True) for _ in range(6)]
    assert all(
        o.shape == (3, 64, 64) and float(o.min()) >= 0.0 and float(o.max()) <= 1.0 for o in outs
    )
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_augment_batch_is_seeded_independent_and_in_range() -> None:
    x = torch.as_tensor(preprocess_arrays(RNG.integers(0, 256, (64, 64, 64, 3), np.uint8), CONFIG))
    a, b, c = augment_batch(x, seed=1), augment_batch(x, seed=1), augment_batch(x, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    changed = (a - x).abs().flatten(1).amax(dim=1) > 1e-3
    assert int(changed.sum()) > 0 and not torch.equal(x, augment_batch(x.clone(), seed=1))
    # Per image, not one draw for the batch: identical inputs get different augmentations.
    same = augment_batch(x[:1].repeat(16, 1, 1, 1), seed=3)
    assert len({round(float(s.sum()), 3) for s in same}) > 8


def test_augment_batch_flip_only_permutes_pixels() -> None:
    x = torch.rand(32, 3, 16, 16)
    out = augment_batch(x, seed=0)
    # Geometric part is a permutation; with intensity changes the sorted values differ, so
    # check that at least some images are exact dihedral copies of their input.
    dihedral = [torch.rot90(v, k, (-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
    exact = torch.zeros(32, dtype=torch.bool)
    for d in dihedral:
        exact |= (out - d).abs().flatten(1).amax(dim=1) < 1e-6
    assert 0 < int(exact.sum()) < 32


PARITY_DRAWS = 400  # augmentations per implementation (MONAI's cost ~15-35 ms per image here)
GAMMAS = np.linspace(0.75, 1.3, 221)  # search grid of the recovered gamma (step 0.0025)


def _dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and quarter turns of ``x`` (distinct for an image with no symmetry)."""
    return [torch.rot90(v, k, (-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


def _recover(x: torch.Tensor, out: torch.Tensor) -> tuple[int, float, float, float]:
    """What an augmentation did to ``x``: (dihedral element, gamma, shift, noise std).

    ``out = ((d(x) - lo) / span) ** gamma * span + lo + shift + noise`` with ``lo, span`` the
    image's min and range: d by correlation, gamma by grid search, shift and noise by least squares
    (``x`` lies in [0.25, 0.75], so the final clip to [0, 1] never acts).
    """
    y = out.double().flatten().numpy()
    candidates = [d.double().flatten().numpy() for d in _dihedral(x)]
    element = int(np.argmax([np.corrcoef(c, y)[0, 1] for c in candidates]))
    base = candidates[element]
    lo, span = base.min(), base.max() - base.min()
    z = (base - lo) / (span + 1e-7)
    curves = z[None, :] ** GAMMAS[:, None] * span + lo  # (gammas, pixels)
    shifts = (y[None, :] - curves).mean(axis=1)
    residuals = y[None, :] - curves - shifts[:, None]
    best = int(np.argmin((residuals**2).sum(axis=1)))
    # Rounded to 1e-4: float32 round-off (MONAI's MetaTensor path against torch's) must not tell
    # the two apart where no shift or noise was drawn.
    return element, float(GAMMAS[best]), round(shifts[best], 4), round(residuals[best].std(), 4)


def _expected_elements() -> np.ndarray:
    """Probability of each dihedral element under the table: flip rows, flip columns, turn k."""
    x = torch.arange(16.0).view(1, 4, 4)
    table = _dihedral(x)
    p = np.zeros(8)
    for rows in (0, 1):
        for cols in (0, 1):
            for k in (0, 1, 2, 3):
                m = x.flip(-2) if rows else x
                m = m.flip(-1) if cols else m
                m = torch.rot90(m, k, (-2, -1))
                p_flip = (AUG_FLIP_PROB if rows else 1 - AUG_FLIP_PROB) * (
                    AUG_FLIP_PROB if cols else 1 - AUG_FLIP_PROB
                )
                p_turn = 1 - AUG_ROT90_PROB if k == 0 else AUG_ROT90_PROB / 3
                p[next(i for i, t in enumerate(table) if torch.equal(t, m))] += p_flip * p_turn
    return p


def test_augment_batch_draws_the_same_augmentations_as_the_monai_transforms() -> None:
    # augment_batch is the vectorised twin every trainer uses; MONAI's random dictionary
    # transforms (build_transforms(train=True)) are the reference it replaces. Same image, many
    # seeded draws from each: the recovered flips/turns, gamma, shift and noise must follow the
    # same distributions (and the table's), not just stay in range.
    x = 0.25 + 0.5 * torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0))
    torch_out = augment_batch(x.expand(PARITY_DRAWS, -1, -1, -1), seed=0)
    monai = Compose(random_transforms([IMAGE_KEY]))
    monai.set_random_state(seed=0)
    monai_out = [monai({IMAGE_KEY: x.clone()})[IMAGE_KEY].as_tensor() for _ in range(PARITY_DRAWS)]

    ours = np.array([_recover(x, o) for o in torch_out])
    theirs = np.array([_recover(x, o) for o in monai_out])

    expected = _expected_elements() * PARITY_DRAWS
    for recovered in (ours, theirs):
        counts = np.bincount(recovered[:, 0].astype(int), minlength=8)
        assert stats.chisquare(counts, expected).pvalue > 1e-3, counts
        gamma, shift, noise = recovered[:, 1], recovered[:, 2], recovered[:, 3]
        assert gamma.min() >= AUG_GAMMA[0] - 0.03 and gamma.max() <= AUG_GAMMA[1] + 0.03
        assert np.abs(shift).max() <= AUG_SHIFT + 0.01 and noise.max() <= AUG_NOISE_STD + 0.005
    for column, name in ((1, "gamma"), (2, "shift"), (3, "noise std")):
        p = stats.ks_2samp(ours[:, column], theirs[:, column]).pvalue
        assert p > 1e-3, f"{name}: torch and MONAI draws differ (KS p={p:.2g})"


def test_fix_channels_and_slice_volume() -> None:
    assert FixChannels(3)(torch.zeros(1, 8, 8)).shape == (3, 8, 8)
    assert FixChannels(1)(torch.zeros(4, 8, 8)).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="FixChannels"):
        FixChannels(3)(torch.zeros(5, 8, 8))
    assert FixChannelsd(["image"], 3)({"image": torch.zeros(2, 8, 8)})["image"].shape == (3, 8, 8)
    vol = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 4, 4, 5)
    assert float(SliceVolume()(vol).mean()) == 2.0
    assert float(SliceVolume(index=4)(vol).mean()) == 4.0


def test_config_round_trip_and_validation() -> None:
    config = PipelineConfig(image_size=32, channels=1, lower_percentile=1.0, upper_percentile=99.0)
    assert PipelineConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown keys"):
        PipelineConfig.from_dict({"image_size": 64, "colour": True})
    for field, value in [("image_size", 4), ("channels", 2), ("lower_percentile", 99.9)]:
        with pytest.raises(ValueError, match=field):
            PipelineConfig(**{field: value})
