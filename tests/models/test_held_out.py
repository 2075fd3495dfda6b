"""Closed-form leave-one-out of the ridge and prototype heads (models/adaptation.py): the same
logits as refitting the head without each case, in one pass."""

from __future__ import annotations

import pytest
import torch

from models.adaptation import ADAPT_MODES, AdaptConfig, FeatureMap, fit_head


@pytest.mark.parametrize("mode", ["ridge", "prototype"])
@pytest.mark.parametrize("parts", [(), (12, 8)])
def test_closed_form_leave_one_out_equals_refitting(mode: str, parts: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2] * 4 + [1, 2])
    raw = torch.randn(len(labels), 20, generator=generator) + labels[:, None].float()
    mapped = FeatureMap(mean=raw.mean(0), normalise=True, parts=parts)(raw)
    config = AdaptConfig(mode=mode)
    closed_form = ADAPT_MODES[mode].held_out
    assert closed_form is not None

    every = closed_form(mapped, labels, 3, config)

    for i in range(len(labels)):
        keep = torch.arange(len(labels)) != i
        head = fit_head(mapped[keep], labels[keep], ways=3, config=config)
        refit = mapped[i] @ head["head.weight"].T + head["head.bias"]
        torch.testing.assert_close(every[i], refit, atol=1e-4, rtol=1e-4)


def test_an_iterative_head_has_no_closed_form() -> None:
    assert ADAPT_MODES["linear"].held_out is None
