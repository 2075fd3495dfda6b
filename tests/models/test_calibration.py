"""Calibration: golden Wilson intervals, temperature recovery, the ignorance prior, decisions,
ECE references, and leave-one-out logits against the reference leave-one-out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.adaptation import AdaptConfig
from models.calibration import (
    UNCERTAIN,
    CalibrationConfig,
    decide,
    expected_calibration_error,
    fit_temperature,
    held_out_logits,
    held_out_order,
    reliability_sentence,
    softmax,
    wilson_interval,
)
from models.evaluation import leave_one_out
from models.networks import BackboneConfig, build_backbone


def test_wilson_interval_golden_values() -> None:
    # Reference values: Wilson (1927) score interval, z = 1.96 (statsmodels proportion_confint
    # method="wilson" gives the same to 1e-9).
    five = wilson_interval(5, 5)
    assert five.low == pytest.approx(0.565508505, abs=1e-8) and five.high == 1.0
    eight = wilson_interval(8, 10)
    assert (eight.low, eight.high) == pytest.approx((0.490156847, 0.943319052), abs=1e-8)
    none = wilson_interval(0, 4)
    assert none.low == 0.0 and none.high == pytest.approx(0.489900020, abs=1e-8)
    with pytest.raises(ValueError, match="right <= cases"):
        wilson_interval(6, 5)


def test_sentence_gives_the_interval_and_says_when_it_is_too_wide() -> None:
    few = reliability_sentence(5, 5)
    assert few.startswith("Between 57% and 100%") and "too few cases to rely on" in few
    many = reliability_sentence(180, 200)
    assert "Between 85% and 93%" in many and "too few" not in many
    assert "5 of the 15 cases were held out" in reliability_sentence(4, 5, of=15)


def test_fitted_temperature_recovers_the_scale_of_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    calibrated = rng.normal(0, 2, (3000, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(calibrated)])
    t = fit_temperature(4.0 * calibrated, labels)
    assert t == pytest.approx(4.0, rel=0.1)


def test_prior_keeps_a_few_right_cases_from_claiming_certainty() -> None:
    logits = 10.0 * np.eye(3)[[0, 1, 2, 0, 1]]
    labels = np.array([0, 1, 2, 0, 1])
    without = fit_temperature(logits, labels, config=CalibrationConfig(prior_cases=0))
    assert without == CalibrationConfig().t_min  # all right: the likelihood alone sharpens
    t = fit_temperature(logits, labels)
    top = softmax(logits, t).max(axis=1)
    assert t > 1.0 and np.all(top < 0.95) and np.all(top > 0.8)


def test_temperature_never_changes_the_ranking() -> None:
    logits = np.random.default_rng(1).normal(0, 3, (50, 4))
    for t in (0.3, 1.0, 7.0):
        assert np.array_equal(softmax(logits, t).argmax(1), logits.argmax(1))


def test_fit_temperature_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="m = len"):
        fit_temperature(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    assert fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int)) == CalibrationConfig().t_max
    with pytest.raises(ValueError, match="min_confidence"):
        CalibrationConfig(min_confidence=0.0)


def test_decide_withholds_labels_below_the_threshold() -> None:
    p = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8]])
    assert decide(p, min_confidence=0.8).tolist() == [0, UNCERTAIN, 1]
    assert decide(p, min_confidence=0.5).tolist() == [0, 0, 1]


def test_expected_calibration_error_references() -> None:
    labels = np.array([0, 0, 0, 1])
    matched = np.tile([0.75, 0.25], (4, 1))  # says 75%, is right 3 of 4
    assert expected_calibration_error(matched, labels) == pytest.approx(0.0)
    wrong = np.tile([0.99, 0.01], (4, 1))
    assert expected_calibration_error(wrong, np.ones(4, dtype=int)) == pytest.approx(0.99)
    # Two bins: 0.95 right twice (gap 0.05), 0.6 right once of two (gap 0.1): mean 0.075.
    mixed = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(mixed, np.array([0, 0, 0, 1])) == pytest.approx(0.075)


def test_held_out_order_takes_classes_in_turn() -> None:
    assert held_out_order(np.array([0, 0, 0, 1, 1, 2])) == [0, 3, 5, 1, 4, 2]


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(image_size=16, width=8)).eval()


def test_held_out_logits_predict_like_the_reference_leave_one_out(tiny_model) -> None:
    x = torch.rand(9, 3, 16, 16)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    config = AdaptConfig(centre=False)
    held = held_out_logits(tiny_model, x, y, ways=3, config=config)
    reference = leave_one_out(tiny_model, x, y, ways=3, adapt_config=config)
    assert sorted(held.indices) == list(range(9))
    assert held.logits.argmax(1).tolist() == [reference.predicted[i] for i in held.indices]
    assert held.right == sum(reference.correct)
    few = held_out_logits(tiny_model, x, y, ways=3, config=config, max_folds=4)
    assert few.indices == (0, 3, 6, 1)
    with pytest.raises(ValueError, match=">= 2 cases"):
        held_out_logits(tiny_model, x[:4], torch.tensor([0, 0, 1, 2]), ways=3, config=config)


def test_held_out_logits_of_a_mode_that_adapts_the_backbone(tiny_model) -> None:
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 0, 1, 1])
    config = AdaptConfig(mode="finetune", centre=False, finetune_steps=1)
    held = held_out_logits(tiny_model, x, y, ways=2, config=config)
    reference = leave_one_out(tiny_model, x, y, ways=2, adapt_config=config)
    assert held.logits.argmax(1).tolist() == [reference.predicted[i] for i in held.indices]
