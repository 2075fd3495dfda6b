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
