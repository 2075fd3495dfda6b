"""The out-of-distribution check: scores relative to the support's spread, pixel statistics, and
noise flagged against held-out cases of the support's classes with a real (untrained) Conv-4."""

import numpy as np
import pytest
import torch

from models.adaptation import embed
from models.networks import BackboneConfig, build_backbone
from models.ood import (
    FLAG_AT,
    OODConfig,
    image_statistics,
    ood_scores,
    reference_of,
    unusual_scores,
)
from models.pipeline import PipelineConfig, preprocess_arrays
from models.synthetic import synthetic_imageset

SIZE = 32


def test_a_reference_needs_two_cases_and_scores_are_in_units_of_its_spread():
    with pytest.raises(ValueError, match=">= 2 support cases"):
        reference_of(torch.zeros(1, 4))
    support = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    reference = reference_of(support)
    assert reference.spread == pytest.approx(1.0)  # nearest-neighbour distances 1, 1, 2
    cases = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    np.testing.assert_allclose(ood_scores(reference, cases).numpy(), [0.0, 3.0])
    # Unit-free: scaling every feature leaves the scores as they are.
    scaled = ood_scores(reference_of(10 * support), 10 * cases)
    np.testing.assert_allclose(scaled.numpy(), [0.0, 3.0], rtol=1e-6)


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="distance"):
        OODConfig(distance="manhattan")
    with pytest.raises(ValueError, match="pixel_threshold"):
        OODConfig(pixel_threshold=0)


def test_pixel_statistics_tell_noise_from_smooth_images_and_grey_from_colour():
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(SIZE), np.arange(SIZE)).astype(np.float32) / (2 * SIZE)
    grey = torch.from_numpy(np.stack([np.stack([ramp] * 3)]))
    noise = torch.from_numpy(rng.random((1, 3, SIZE, SIZE)).astype(np.float32))
    mean, _, colour, across, down = image_statistics(torch.cat([grey, noise])).T
    assert across[0] > 0.9 and down[0] > 0.9  # neighbours of a smooth image agree
    assert abs(across[1]) < 0.2 and abs(down[1]) < 0.2  # neighbours of noise do not
    assert colour[0] == pytest.approx(0.0) and colour[1] > 0.1
    assert mean[0] == pytest.approx(ramp.mean(), abs=1e-6)


def test_noise_is_flagged_and_cases_of_the_support_classes_mostly_are_not():
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(image_size=SIZE, width=8)).eval()
    data = synthetic_imageset(
        config=PipelineConfig(image_size=SIZE), n_classes=3, per_class=12, size=48, seed=5
    )
    images = torch.from_numpy(data.images)
    first = np.concatenate([np.flatnonzero(data.labels == c)[:5] for c in range(3)])
    rest = np.setdiff1d(np.arange(len(images)), first)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(
        preprocess_arrays(rng.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8), data_pipeline())
    )
    cases = torch.cat([images[rest], noise])
    scores = unusual_scores(
        support_features=embed(model, images[first]),
        case_features=embed(model, cases),
        support_images=images[first],
        case_images=cases,
    )
    flagged = (scores > FLAG_AT).numpy()
    assert flagged[len(rest) :].all()  # every noise image
    assert flagged[: len(rest)].mean() <= 0.2  # at most 1 in 5 ordinary cases (5% measured)


def data_pipeline() -> PipelineConfig:
    return PipelineConfig(image_size=SIZE)
