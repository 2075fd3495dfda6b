"""Ledger: fail-closed cap, exact totals under concurrency, crash safety, tamper detection."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from privacy.accounting import epsilon_for
from privacy.errors import BudgetExhaustedError, LedgerError, LedgerTamperedError
from privacy.ledger import ENTRY_FIELDS, ChargeRequest, Ledger

DELTA = 1e-5


def _request(**overrides: object) -> ChargeRequest:
    fields: dict[str, object] = {
        "run_id": "run-1",
        "round": 0,
        "mechanism": "dp-episodic",
        "noise_multiplier": 2.0,
        "sensitivity_factor": 2.0,
        "sample_rate": 0.01,
        "steps": 10,
        "requester": "test",
    }
    fields.update(overrides)
    return ChargeRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger.create(tmp_path / "site.db", site="a", cap_epsilon=50.0, delta=DELTA)
    for i in range(6):
        led.charge(_request(round=i, steps=5 + i))
    return led


def _raw(ledger: Ledger, sql: str, *args: object) -> None:
    conn = sqlite3.connect(ledger.path)
    with conn:
        conn.execute(sql, args)
    conn.close()


# -- charging ---------------------------------------------------------------------------------


def test_charge_records_every_field(tmp_path: Path) -> None:
    led = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=5.0, delta=DELTA)

    entry = led.charge(_request(noise_multiplier=3.0, sensitivity_factor=2.0))

    assert entry.kind == "charge" and entry.id == 1
    assert entry.accounted_noise_multiplier == 1.5
    assert entry.epsilon_before == 0.0
    assert entry.epsilon_after == epsilon_for([(1.5, 0.01, 10)], delta=DELTA, accountant="rdp")
    assert led.entries() == [entry]
    assert led.history() == [(1.5, 0.01, 10)]
    assert entry.code_version.startswith("0.1.0")


def test_refuses_just_past_the_cap_and_records_the_refusal(tmp_path: Path) -> None:
    first = _request(steps=100)
    eps_one = epsilon_for([(1.0, 0.01, 100)], delta=DELTA, accountant="rdp")
    eps_two = epsilon_for([(1.0, 0.01, 200)], delta=DELTA, accountant="rdp")
    led = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=eps_two - 1e-6, delta=DELTA)
    led.charge(first)

    with pytest.raises(BudgetExhaustedError) as info:
        led.charge(first)

    assert info.value.epsilon_spent == pytest.approx(eps_one)
    assert info.value.epsilon_requested_after == pytest.approx(eps_two)
    assert info.value.cap_epsilon == eps_two - 1e-6 and info.value.site == "a"
    assert [e.kind for e in led.entries()] == ["charge", "refusal"]
    assert led.epsilon_spent() == pytest.approx(eps_one)
    assert led.verify() == 2


def test_a_charge_exactly_at_the_cap_is_accepted(tmp_path: Path) -> None:
    eps = epsilon_for([(1.0, 0.01, 100)], delta=DELTA, accountant="rdp")
    led = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=eps, delta=DELTA)

    assert led.charge(_request(steps=100)).epsilon_after == eps


def test_prv_ledger_uses_prv(tmp_path: Path) -> None:
    led = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=9.0, delta=DELTA, accountant="prv")

    entry = led.charge(_request(steps=50))

    assert entry.accountant == "prv"
    assert entry.epsilon_after == epsilon_for([(1.0, 0.01, 50)], delta=DELTA, accountant="prv")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("round", -1),
        ("noise_multiplier", 0.0),
        ("sensitivity_factor", -2.0),
        ("sample_rate", 0.0),
        ("sample_rate", 1.01),
        ("run_id", ""),
        ("requester", " "),
    ],
)
def test_charge_request_validates(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        _request(**{field: value})


def test_create_refuses_to_overwrite_and_open_refuses_junk(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger.create(path, site="a", cap_epsilon=1.0, delta=DELTA)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)

    with pytest.raises(LedgerError, match="already exists"):
        Ledger.create(path, site="a", cap_epsilon=2.0, delta=DELTA)
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger.open(tmp_path / "missing.db")
    with pytest.raises(LedgerError):
        Ledger.open(junk)
    assert Ledger.open(path).cap_epsilon == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cap_epsilon": 0.0},
        {"cap_epsilon": float("inf")},
        {"delta": 1.0},
        {"accountant": "gdp"},
        {"site": ""},
    ],
)
def test_create_validates(tmp_path: Path, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"site": "a", "cap_epsilon": 1.0, "delta": DELTA, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Ledger.create(tmp_path / "l.db", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "l.db").exists()


# -- concurrency and crashes ------------------------------------------------------------------

WRITERS, CHARGES = 8, 60  # every writer overlaps the others for most of its charges
PAIRS = [(1.6, 0.002), (2.4, 0.004), (3.0, 0.001)]


def _writer(path: str, worker: int) -> None:
    led = Ledger.open(path)
    for i in range(CHARGES):
        sigma, q = PAIRS[(worker + i) % len(PAIRS)]
        led.charge(_request(run_id=f"w{worker}", round=i, noise_multiplier=sigma, sample_rate=q))


def _forever(path: str) -> None:
    led = Ledger.open(path)
    i = 0
    while True:
        led.charge(_request(run_id=f"k{os.getpid()}", round=i))
        i += 1


def _context() -> multiprocessing.context.BaseContext:
    # forkserver: each worker is a fresh process (no inherited connections or threads) forked from
    # one server that imported privacy.ledger once, instead of 16 separate opacus/torch imports.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["privacy.ledger", "tests.privacy.test_ledger"])
    return ctx


def test_concurrent_writers_give_exact_totals(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger.create(path, site="a", cap_epsilon=1e6, delta=DELTA)
    ctx = _context()
    procs = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(WRITERS)]

    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)

    assert [p.exitcode for p in procs] == [0] * WRITERS
    led = Ledger.open(path)
    entries = led.entries()
    assert len(entries) == WRITERS * CHARGES and {e.kind for e in entries} == {"charge"}
    assert led.verify() == WRITERS * CHARGES
    assert led.epsilon_spent() == epsilon_for(led.history(), delta=DELTA, accountant="rdp")
    assert entries[-1].epsilon_after == pytest.approx(led.epsilon_spent(), rel=1e-12)
    expected_steps = {pair: 0 for pair in PAIRS}
    for worker in range(WRITERS):
        for i in range(CHARGES):
            expected_steps[PAIRS[(worker + i) % len(PAIRS)]] += 10
    got_steps = {pair: 0 for pair in PAIRS}
    for e in entries:
        got_steps[(e.accounted_noise_multiplier * 2.0, e.sample_rate)] += e.steps
    assert got_steps == expected_steps


def test_killed_writers_leave_a_verifiable_ledger(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    led = Ledger.create(path, site="a", cap_epsilon=1e6, delta=DELTA)
    ctx = _context()
    rng = random.Random(7)
    kills = 0
    for _ in range(12):
        before = len(led.entries())
        proc = ctx.Process(target=_forever, args=(str(path),))
        proc.start()
        deadline = time.monotonic() + 60
        while len(led.entries()) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        kills += proc.exitcode == -signal.SIGKILL

        rows = led.verify()
        assert rows == len(led.entries()) > before

    assert kills >= 10
    assert led.epsilon_spent() == pytest.approx(led.entries()[-1].epsilon_after, rel=1e-12)


# -- tampering --------------------------------------------------------------------------------


def _changed(value: object) -> object:
    # A different value of the same type: the smallest visible edit of each field.
    if value in ("charge", "refusal"):  # the CHECK constraint allows only these two
        return "refusal" if value == "charge" else "charge"
    if isinstance(value, str):
        return value[:-1] + ("0" if value[-1:] != "0" else "1")
    if isinstance(value, int):
        return value + 1
    assert isinstance(value, float)
    return value * 1.5 + 1e-9


def test_editing_any_field_of_any_row_is_detected(ledger: Ledger) -> None:
    pristine = ledger.path.read_bytes()
    entries = ledger.entries()
    for entry in entries:
        for field in ENTRY_FIELDS:
            if field == "id":
                continue
            value = _changed(getattr(entry, field))
            _raw(ledger, f"UPDATE entries SET {field} = ? WHERE id = ?", value, entry.id)

            with pytest.raises(LedgerTamperedError) as info:
                ledger.verify()

            assert info.value.row == entry.id, (field, entry.id)
            ledger.path.write_bytes(pristine)
        assert ledger.verify() == len(entries) == 6


def test_deleting_a_middle_row_is_detected(ledger: Ledger) -> None:
    _raw(ledger, "DELETE FROM entries WHERE id = 3")

    with pytest.raises(LedgerTamperedError) as info:
        ledger.verify()
    assert info.value.row == 3


def test_deleting_the_last_row_is_detected_and_blocks_charges(ledger: Ledger) -> None:
    _raw(ledger, "DELETE FROM entries WHERE id = 6")

    with pytest.raises(LedgerTamperedError) as info:
        ledger.verify()
    assert info.value.row == 6
    with pytest.raises(LedgerTamperedError):
        ledger.charge(_request())


def test_reordering_rows_is_detected(ledger: Ledger) -> None:
    _raw(ledger, "UPDATE entries SET id = 100 WHERE id = 2")
    _raw(ledger, "UPDATE entries SET id = 2 WHERE id = 4")
    _raw(ledger, "UPDATE entries SET id = 4 WHERE id = 100")

    with pytest.raises(LedgerTamperedError) as info:
        ledger.verify()
    assert info.value.row == 2


def test_inserting_a_row_is_detected(ledger: Ledger) -> None:
    columns = ", ".join(f for f in ENTRY_FIELDS if f != "id")
    _raw(
        ledger, f"INSERT INTO entries (id, {columns}) SELECT 7, {columns} FROM entries WHERE id = 6"
    )

    with pytest.raises(LedgerTamperedError) as info:
        ledger.verify()
    assert info.value.row == 7


@pytest.mark.parametrize(("field", "value"), [("cap_epsilon", 1e9), ("delta", 0.5), ("site", "b")])
def test_editing_the_meta_row_is_detected_and_blocks_charges(
    ledger: Ledger, field: str, value: object
) -> None:
    _raw(ledger, f"UPDATE meta SET {field} = ?", value)

    with pytest.raises(LedgerTamperedError) as info:
        ledger.verify()
    assert info.value.row == 0
    with pytest.raises(LedgerTamperedError):
        Ledger.open(ledger.path).charge(_request())


def test_editing_the_cap_of_an_empty_ledger_is_detected(tmp_path: Path) -> None:
    led = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=1.0, delta=DELTA)
    _raw(led, "UPDATE meta SET cap_epsilon = 100")

    with pytest.raises(LedgerTamperedError) as info:
        led.verify()
    assert info.value.row == 0
