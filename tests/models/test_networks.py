import pytest
import torch
from opacus.validators import ModuleValidator

from models.networks import BACKBONES, BackboneConfig, build_backbone


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_is_dp_compatible_and_embeds(name):
    config = BackboneConfig(name=name, width=16, image_size=32)
    model = build_backbone(config)

    ModuleValidator.validate(model, strict=True)
    x = torch.randn(3, 3, 32, 32)
    model.train()
    out = model(x)

    assert out.shape == (3, model.out_features)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # deterministic in train mode (no dropout or drop-path) and per-example independent: what
    # per-episode gradients under DP need
    alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, out, rtol=1e-4, atol=1e-4)


def test_embeddings_are_per_example_independent():
    model = build_backbone(BackboneConfig(width=16, image_size=32)).eval()
    x = torch.randn(4, 3, 32, 32)
    together = model(x)
    alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="name"):
        BackboneConfig(name="vgg")
    with pytest.raises(ValueError, match="groups"):
        BackboneConfig(width=12, groups=8)
