"""Shared helpers of the privacy tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from privacy.ledger import ChargeRequest


def episodic_charge(**overrides: object) -> ChargeRequest:
    """A dp-episodic charge (sigma 2 on C, sensitivity 2C, q 0.1, 10 steps), with overrides."""
    fields: dict[str, object] = {
        "run_id": "run",
        "round": 1,
        "mechanism": "dp-episodic",
        "noise_multiplier": 2.0,
        "sensitivity_factor": 2.0,
        "sample_rate": 0.1,
        "steps": 10,
        "requester": "test",
        **overrides,
    }
    return ChargeRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture
def charge_request() -> Callable[..., ChargeRequest]:
    """:func:`episodic_charge`, for tests that build charges."""
    return episodic_charge
