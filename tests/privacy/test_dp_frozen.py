"""DP training of a partly frozen backbone: only trainable parameters are differentiated, clipped,
noised and updated; frozen BatchNorm statistics never move (models/freezing.py)."""

import pytest
import torch

from models.freezing import FrozenBatchNorm2d, frozen_parameters, trainable_parameters
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from privacy.dp_meta import DPConfig, DPMetaTrainer
from privacy.dp_supervised import DPPretrainConfig, DPPretrainer
from tests.privacy.patients import random_set


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("learner", ["protonet", "fomaml"])
def test_dp_meta_step_moves_only_trainable_parameters(learner):
    model = build_backbone(BackboneConfig(width=8, image_size=16, trainable="norm-affine"))
    trainer = DPMetaTrainer(
        model,
        [random_set(0, 60)],
        dp=DPConfig(noise_multiplier=1.0, sample_rate=0.5, episodes=2),
        meta=MetaConfig(learner=learner, inner_steps=1),
        seed=0,
    )
    before = _snapshot(model)

    trainer.train(1)

    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == set(trainable_parameters(model))  # noise alone moves every trainable one
    for p in frozen_parameters(model).values():
        assert not hasattr(p, "grad_sample")


def test_dp_meta_trains_a_public_batchnorm_backbone_on_frozen_statistics():
    config = BackboneConfig(name="resnet10", image_size=16, norm="batch", trainable="norm-affine")
    model = build_backbone(config)
    trainer = DPMetaTrainer(
        model,
        [random_set(1, 40)],
        dp=DPConfig(noise_multiplier=1.0, sample_rate=0.5, episodes=2),
        meta=MetaConfig(),
        seed=0,
    )
    before = _snapshot(model)

    trainer.train(1)

    after = model.state_dict()
    bn = [n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)]
    assert bn
    for name in bn:
        for stat in ("running_mean", "running_var"):
            assert torch.equal(before[f"{name}.{stat}"], after[f"{name}.{stat}"])
        assert not torch.equal(before[f"{name}.weight"], after[f"{name}.weight"])
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_dp_supervised_step_with_a_frozen_encoder_moves_only_the_head():
    backbone = build_backbone(BackboneConfig(width=8, image_size=16, trainable="none"))
    before = _snapshot(backbone)
    trainer = DPPretrainer(
        backbone,
        [random_set(2, 40)],
        dp=DPPretrainConfig(noise_multiplier=1.0, sample_rate=0.5, expected_patients=20),
        augment=False,
        seed=0,
    )
    head = _snapshot(trainer.model.head)

    trainer.train(1)

    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())
    assert not any(hasattr(p, "grad_sample") for p in backbone.parameters())
    assert set(trainable_parameters(trainer.model)) == {"head.weight", "head.bias"}
    assert not torch.equal(head["weight"], trainer.model.head.weight)
