import pytest
import torch

from models.freezing import (
    PARAMETER_SUBSETS,
    apply_freezing,
    frozen_parameters,
    is_fully_frozen,
    last_block_name,
    trainable_parameters,
)
from models.networks import BackboneConfig, build_backbone

SIZE = 32


def _loss(model):
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    return model(x).pow(2).mean()


@pytest.mark.parametrize("subset", sorted(PARAMETER_SUBSETS))
def test_only_trainable_parameters_get_gradients(subset):
    model = build_backbone(BackboneConfig(width=16, image_size=SIZE, trainable=subset))
    if is_fully_frozen(model):
        assert subset == "none" and not _loss(model).requires_grad
        return

    _loss(model).backward()

    trainable = trainable_parameters(model)
    assert trainable and set(trainable) | set(frozen_parameters(model)) == {
        n for n, _ in model.named_parameters()
    }
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_subsets_select_the_documented_parameters():
    def names(name, subset):
        config = BackboneConfig(name=name, width=16, image_size=SIZE, trainable=subset)
        return set(trainable_parameters(build_backbone(config)))

    assert names("conv4", "norm-affine") == {
        f"blocks.{i}.0.adn.N.{w}" for i in range(4) for w in ("weight", "bias")
    }
    assert names("conv4", "last-block") == {
        n for n in names("conv4", "all") if n.startswith("blocks.3.")
    }
    resnet = names("resnet10", "last-block")
    assert resnet and all(n.startswith("layer4.") for n in resnet)
    vit = names("vit_tiny", "last-block")
    assert {n.split(".")[0] for n in vit} == {"blocks", "norm"}
    assert all(n.startswith(("blocks.11.", "norm.")) for n in vit)
    assert names("resnet10", "none") == set()


def test_last_block_is_found_without_a_declaration():
    model = build_backbone(BackboneConfig(name="resnet12", width=16, image_size=SIZE))

    assert last_block_name(model) == "blocks.3"


def test_frozen_modules_stay_in_eval_mode_in_a_train_mode_model():
    model = build_backbone(BackboneConfig(name="vit_tiny", image_size=SIZE, trainable="last-block"))
    x = torch.randn(2, 3, SIZE, SIZE)

    model.train()
    model(x)

    assert not model.blocks[0].training and not model.patch_embedding.training
    assert model.blocks[11].training and model.training


def test_fully_frozen_encoder_runs_in_eval_mode_and_is_cacheable():
    model = build_backbone(
        BackboneConfig(name="efficientnet_b0", image_size=SIZE, trainable="none")
    )
    x = torch.randn(2, 3, SIZE, SIZE)

    model.train()
    first = model(x)
    second = model(x)

    assert is_fully_frozen(model)
    assert not any(m.training for m in model.modules())
    assert torch.equal(first, second)


def test_apply_freezing_is_idempotent_and_reversible():
    model = build_backbone(BackboneConfig(width=16, image_size=SIZE, trainable="none"))
    hooks = len(model._forward_pre_hooks)

    apply_freezing(model, BackboneConfig(width=16, image_size=SIZE, trainable="none"))
    assert len(model._forward_pre_hooks) == hooks == 1
    apply_freezing(model, BackboneConfig(width=16, image_size=SIZE, trainable="all"))
    model.train()
    model(torch.randn(1, 3, SIZE, SIZE))

    assert not is_fully_frozen(model) and model.training


def test_frozen_batchnorm_is_in_eval_mode_from_construction() -> None:
    from models.freezing import FrozenBatchNorm2d

    assert not FrozenBatchNorm2d(4).training  # a direct call (not forward's hook) must not see
    # batch statistics either
