"""Leave-one-out of the ridge and prototype heads in closed form and of the linear head in one
batched fit (models/adaptation.py): the same logits as refitting the head without each case."""

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


@pytest.mark.parametrize("steps", [100, 0])
def test_batched_linear_leave_one_out_equals_refitting_per_fold(steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2] * 5)
    raw = torch.randn(len(labels), 24, generator=generator) + 0.7 * labels[:, None].float()
    mapped = FeatureMap(mean=raw.mean(0), normalise=True)(raw)
    config = AdaptConfig(mode="linear", linear_steps=steps)
    batched = ADAPT_MODES["linear"].held_out
    assert batched is not None
    rows = [3, 0, 14, 7]  # a subset, in the caller's order
    heard: list[tuple[int, int]] = []

    every = batched(mapped, labels, 3, config, rows=rows, on_step=lambda d, t: heard.append((d, t)))

    assert every.shape == (len(rows), 3)
    assert heard == [(i, steps) for i in range(1, steps + 1)]  # one report per batched step
    for j, i in enumerate(rows):
        keep = torch.arange(len(labels)) != i
        head = fit_head(mapped[keep], labels[keep], ways=3, config=config)
        refit = mapped[i] @ head["head.weight"].T + head["head.bias"]
        torch.testing.assert_close(every[j], refit, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(every[j].softmax(-1), refit.softmax(-1), atol=1e-5, rtol=0)


def test_a_batched_leave_one_out_reports_its_folds_one_by_one_and_can_be_stopped() -> None:
    from models.calibration import fold_progress

    class Stop(Exception):
        pass

    seen: list[tuple[int, int]] = []
    progress = fold_progress(lambda done, total: seen.append((done, total)), 4)
    for step in range(1, 11):
        progress(step, 10)
    progress(1, 1)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def cancel(done: int, total: int) -> None:
        raise Stop

    generator = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1] * 4)
    features = torch.randn(len(labels), 6, generator=generator)
    batched = ADAPT_MODES["linear"].held_out
    assert batched is not None
    with pytest.raises(Stop):  # Cancel stops the batched fit at its first fold's share
        batched(features, labels, 2, AdaptConfig(mode="linear"), on_step=fold_progress(cancel, 8))
