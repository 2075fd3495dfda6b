"""Shared helpers of the privacy tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.ledger import ChargeRequest, Ledger


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


def charge(ledger: Ledger, round_no: int, *, steps: int = 20) -> None:
    """Charge ``ledger`` for one dp-episodic round (q 0.05, ``steps`` steps) of run "fed"."""
    ledger.charge(episodic_charge(run_id="fed", round=round_no, sample_rate=0.05, steps=steps))


def write_key(path: Path) -> Path:
    """An ECDSA P-384 private key in OpenSSH format, as `fedfew node init` writes it."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    return path
