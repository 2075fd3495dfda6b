"""The in-memory feature cache of a frozen encoder (models/feature_cache.py)."""

from __future__ import annotations

import torch
from torch import nn

from models.feature_cache import FeatureCache


def _frozen_linear() -> nn.Module:
    model = nn.Linear(4, 2)
    model.requires_grad_(False)
    return model


def test_a_call_larger_than_the_bound_gets_every_row_and_keeps_the_newest() -> None:
    model = _frozen_linear()
    cache = FeatureCache(max_images=3)
    images = torch.arange(20, dtype=torch.float32).view(5, 4)
    computed: list[int] = []

    def compute(batch: torch.Tensor) -> torch.Tensor:
        computed.append(len(batch))
        return model(batch)

    out = cache.features(model, images, compute)
    torch.testing.assert_close(out, model(images))
    assert computed == [5]
    cache.features(model, images[2:], compute)  # the three newest rows are still kept
    assert computed == [5]
    cache.features(model, images[:1], compute)  # the oldest was dropped
    assert computed == [5, 1]


def test_an_adapted_classifier_reuses_its_frozen_encoders_features() -> None:
    """A classifier adapted on an encoder under a trainable feature adapter embeds with the
    model's own weights: the frozen encoder inside keeps its cache (no image embedded twice)."""
    from models.adaptation import adapt, embed
    from models.networks import BackboneConfig, build_backbone

    torch.manual_seed(0)
    model = build_backbone(
        BackboneConfig(image_size=32, width=8, trainable="none", adapter="scale")
    )
    calls: list[int] = []
    model.encoder.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    images, labels = torch.rand(6, 3, 32, 32), torch.tensor([0, 0, 0, 1, 1, 1])

    first = embed(model, images)
    classifier = adapt(model, images, labels, ways=2)
    again = classifier.embed(images)
    assert calls == [6]
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(classifier.head_logits(again), classifier.logits(images))
