import numpy as np
import pytest
import torch

from models.errors import DataError
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.pretraining import PretrainConfig, supervised_pretrain
from models.synthetic import synthetic_imageset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions: on a busy 2-core machine, thread hand-offs cost more than the maths.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_sets():
    config = PipelineConfig(image_size=32)
    a = synthetic_imageset(config=config, n_classes=4, per_class=12, size=32, seed=0)
    b = synthetic_imageset(config=config, n_classes=4, per_class=12, size=32, seed=1)
    return a, b


def test_loss_decreases_on_synthetic_sets(tiny_sets):
    # Arrange
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig(width=16, image_size=32))
    config = PretrainConfig(steps=40, batch_size=48, lr=3e-3, augment=False)

    # Act
    losses = supervised_pretrain(model, tiny_sets, config=config)

    # Assert: 8 classes in the union, so the first loss is about log(8) ~ 2.08
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:5])


def test_trains_the_backbone_in_place_and_reports_every_step(tiny_sets):
    model = build_backbone(BackboneConfig(width=16, image_size=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps: list[int] = []

    supervised_pretrain(
        model,
        tiny_sets,
        config=PretrainConfig(steps=3, batch_size=8),
        on_step=lambda step, loss: steps.append(step),
    )

    assert steps == [0, 1, 2]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_same_seed_same_losses(tiny_sets):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # the backbone's initialisation is the caller's
        model = build_backbone(BackboneConfig(width=16, image_size=32))
        runs.append(supervised_pretrain(model, tiny_sets, config=PretrainConfig(steps=3)))
    assert runs[0] == runs[1]


def test_no_images_is_a_data_error():
    model = build_backbone(BackboneConfig(width=16, image_size=32))
    with pytest.raises(DataError, match="needs images"):
        supervised_pretrain(model, [], config=PretrainConfig(steps=1))


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("batch_size", 0), ("steps", 1.5), ("lr", 0.0), ("lr", float("nan"))],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"PretrainConfig.{field}"):
        PretrainConfig(**{field: value})


def test_config_to_dict_round_trips():
    config = PretrainConfig(steps=7, batch_size=5, lr=0.01, seed=3, augment=False)
    assert PretrainConfig(**config.to_dict()) == config
