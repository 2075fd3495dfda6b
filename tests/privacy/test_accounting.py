"""Accountant checks: Opacus's golden values, Google's dp_accounting cross-check, edge cases."""

from __future__ import annotations

import itertools
import logging

import dp_accounting
import pytest
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accounting import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    compress_history,
    epsilon_for,
    worst_epsilon,
)

# (q, sigma, steps, delta): 48 subsampled points + 12 full-batch (q = 1) + 4 tiny-q long runs.
# Every point has epsilon >= 0.05, where PRV's absolute error floor (1e-3) is under 2%.
GRID = (
    list(itertools.product([0.01, 0.04, 0.1], [0.8, 1.2, 2.0, 3.5], [30, 300], [1e-5, 1e-7]))
    + list(itertools.product([1.0], [4.0, 8.0, 16.0], [1, 10], [1e-5, 1e-7]))
    + list(itertools.product([0.002], [0.8, 1.0], [300, 1000], [1e-5]))
)


def _dp_event(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def test_golden_rdp_matches_opacus_pinned_value() -> None:
    eps = epsilon_for([(1.5, 0.04, 2250)], delta=1e-5, accountant="rdp")

    assert eps == pytest.approx(7.32911117143, rel=1e-6)


def test_golden_prv_matches_opacus_pinned_value() -> None:
    # Opacus's test uses steps = int(90 // 0.04), which is 2249 in floating point, not 2250.
    eps = epsilon_for([(1.5, 0.04, 2249)], delta=1e-5, accountant="prv")

    assert eps == pytest.approx(6.777395712150674, rel=1e-6)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_same_as_a_fresh_opacus_accountant(accountant: str) -> None:
    history = [(1.1, 0.02, 40), (2.0, 0.05, 10), (1.1, 0.02, 60)]
    opacus_acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    opacus_acc.history = [(1.1, 0.02, 100), (2.0, 0.05, 10)]

    eps = epsilon_for(history, delta=1e-5, accountant=accountant)

    # Ours is never looser than Opacus's default orders / error, and close to it.
    assert eps <= float(opacus_acc.get_epsilon(delta=1e-5)) + 1e-9
    assert eps == pytest.approx(float(opacus_acc.get_epsilon(delta=1e-5)), rel=0.01)


def test_cross_check_against_google_dp_accounting(caplog: pytest.LogCaptureFixture) -> None:
    assert len(GRID) >= 60
    worst_rdp = worst_prv = 0.0
    for q, sigma, steps, delta in GRID:
        ours_rdp = epsilon_for([(sigma, q, steps)], delta=delta, accountant="rdp")
        ours_prv = epsilon_for([(sigma, q, steps)], delta=delta, accountant="prv")
        google_rdp = dp_rdp.RdpAccountant()
        google_rdp.compose(_dp_event(q, sigma, steps))
        google_pld = dp_pld.PLDAccountant(value_discretization_interval=1e-3)
        google_pld.compose(_dp_event(q, sigma, steps))
        ref_rdp, ref_pld = google_rdp.get_epsilon(delta), google_pld.get_epsilon(delta)

        assert ours_rdp == pytest.approx(ref_rdp, rel=0.01), (q, sigma, steps, delta)
        assert ours_prv == pytest.approx(ref_pld, rel=0.02), (q, sigma, steps, delta)
        worst_rdp = max(worst_rdp, abs(ours_rdp / ref_rdp - 1))
        worst_prv = max(worst_prv, abs(ours_prv / ref_pld - 1))
    logging.getLogger(__name__).info("max rel diff rdp %.4f prv/pld %.4f", worst_rdp, worst_prv)


def test_prv_is_an_upper_bound_of_pld_for_small_epsilon() -> None:
    # Below eps ~ 0.05 the absolute error floor dominates: still conservative, within 1.5e-3.
    ours = epsilon_for([(6.0, 0.002, 20)], delta=1e-5, accountant="prv")
    google = dp_pld.PLDAccountant(value_discretization_interval=1e-4)
    google.compose(_dp_event(0.002, 6.0, 20))

    assert google.get_epsilon(1e-5) <= ours <= google.get_epsilon(1e-5) + 1.5e-3


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_calibration_round_trip(accountant: str) -> None:
    sigma = calibrate_noise_multiplier(
        target_epsilon=4.0, delta=1e-5, sample_rate=0.02, steps=500, accountant=accountant
    )

    eps = epsilon_for([(sigma, 0.02, 500)], delta=1e-5, accountant=accountant)
    assert 0.99 * 4.0 <= eps <= 4.0


def test_calibration_unreachable_target_raises() -> None:
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=10**6)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_compression_gives_the_same_epsilon(accountant: str) -> None:
    long_history = [(1.3, 0.03, 5)] * 40 + [(0.9, 0.01, 0)] + [(2.0, 0.05, 3)] * 10
    long_history.insert(7, (2.0, 0.05, 3))

    eps_long = epsilon_for(long_history, delta=1e-6, accountant=accountant)
    eps_short = epsilon_for([(1.3, 0.03, 200), (2.0, 0.05, 33)], delta=1e-6, accountant=accountant)

    assert compress_history(long_history) == [(1.3, 0.03, 200), (2.0, 0.05, 33)]
    assert eps_long == pytest.approx(eps_short, rel=1e-12)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_empty_and_zero_step_histories_cost_nothing(accountant: str) -> None:
    assert epsilon_for([], delta=1e-5, accountant=accountant) == 0.0
    assert epsilon_for([(1.0, 0.1, 0)], delta=1e-5, accountant=accountant) == 0.0


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_full_batch_is_allowed_and_costs_more(accountant: str) -> None:
    full = epsilon_for([(4.0, 1.0, 10)], delta=1e-5, accountant=accountant)
    sampled = epsilon_for([(4.0, 0.5, 10)], delta=1e-5, accountant=accountant)

    assert full > sampled > 0


def test_epsilon_grows_with_steps_and_falls_with_noise() -> None:
    base = epsilon_for([(1.0, 0.01, 100)], delta=1e-5, accountant="rdp")

    assert epsilon_for([(1.0, 0.01, 200)], delta=1e-5, accountant="rdp") > base
    assert epsilon_for([(2.0, 0.01, 100)], delta=1e-5, accountant="rdp") < base


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ((0.0, 0.1, 1), "noise_multiplier"),
        ((-1.0, 0.1, 1), "noise_multiplier"),
        ((float("nan"), 0.1, 1), "noise_multiplier"),
        ((1.0, 0.0, 1), "sample_rate"),
        ((1.0, 1.5, 1), "sample_rate"),
        ((1.0, 0.1, -1), "steps"),
        ((1.0, 0.1, 1.5), "steps"),
    ],
)
def test_invalid_entries_name_the_field(entry: tuple[float, float, int], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        epsilon_for([entry], delta=1e-5, accountant="rdp")


def test_invalid_delta_and_accountant() -> None:
    with pytest.raises(ValueError, match="delta"):
        epsilon_for([(1.0, 0.1, 1)], delta=0.0, accountant="rdp")
    with pytest.raises(ValueError, match="accountant"):
        epsilon_for([(1.0, 0.1, 1)], delta=1e-5, accountant="gdp")


def test_worst_epsilon_is_the_larger_of_both() -> None:
    history = [(1.5, 0.04, 500)]

    eps, name = worst_epsilon(history, delta=1e-5)

    rdp = epsilon_for(history, delta=1e-5, accountant="rdp")
    prv = epsilon_for(history, delta=1e-5, accountant="prv")
    assert eps == max(rdp, prv)
    assert name == ("rdp" if rdp >= prv else "prv")
