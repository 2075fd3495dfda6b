import numpy as np
import pytest
import torch

from models.episodes import EpisodeConfig
from models.errors import EpisodeError
from models.evaluation import evaluate, leave_one_out, mean_ci95
from models.imageset import ImageSet
from models.networks import BackboneConfig, build_backbone


class Identity(torch.nn.Module):
    """Features = flattened pixels, so separable data gives known accuracies."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)
        self.out_features = 3 * 4 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _separable(n_classes: int, per_class: int, noise: float) -> ImageSet:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(n_classes), per_class)
    centers = rng.normal(size=(n_classes, 3, 4, 4)).astype(np.float32) * 3
    images = centers[labels] + noise * rng.normal(size=(len(labels), 3, 4, 4)).astype(np.float32)
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(n_classes)))


def test_mean_ci95_matches_normal_interval():
    values = np.array([0.5, 0.7, 0.6, 0.8, 0.4])
    mean, ci = mean_ci95(values)
    assert mean == pytest.approx(0.6)
    assert ci == pytest.approx(1.96 * np.std(values, ddof=1) / np.sqrt(5))


def test_evaluate_separable_is_perfect_and_noise_is_chance():
    clean = evaluate(
        Identity(), _separable(5, 20, 0.01), episode=EpisodeConfig(3, 2, 4), episodes=50
    )
    noise = evaluate(
        Identity(), _separable(5, 20, 100.0), episode=EpisodeConfig(3, 2, 4), episodes=200
    )
    assert clean.accuracy == 1.0 and clean.episodes == 50
    assert abs(noise.accuracy - 1 / 3) < 3 * noise.ci95 + 0.02


def test_leave_one_out_flags_the_mislabelled_case():
    data = _separable(2, 5, 0.01)
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels).clone()
    y[0] = 1  # a case of class 0 labelled 1

    result = leave_one_out(Identity(), x, y, ways=2)

    assert result.correct[0] is False and result.predicted[0] == 0
    assert result.accuracy == pytest.approx(9 / 10)


def test_leave_one_out_needs_two_cases_per_class():
    model = build_backbone(BackboneConfig(width=8, image_size=16))
    with pytest.raises(EpisodeError, match=">= 2 labelled cases"):
        leave_one_out(model, torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 1]), ways=2)
