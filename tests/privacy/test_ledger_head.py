"""Signed ledger heads and the check of a ledger against the server's record of them: a rebuilt,
truncated or rolled-back ledger is detected; an intact one passes."""

from __future__ import annotations

import shutil

import pytest

from privacy.errors import LedgerRecordMismatchError, LedgerSignatureError
from privacy.ledger import Ledger
from privacy.ledger_head import (
    LedgerHead,
    RecordedHead,
    check_against_record,
    load_signing_key,
    read_head,
    sign_head,
    verify_signature,
)
from tests.privacy.ledger_helpers import rebuild, truncate

from .conftest import charge, write_key

DELTA = 1e-5


@pytest.fixture
def key(tmp_path):
    return load_signing_key(write_key(tmp_path / "node"))


def run_rounds(ledger: Ledger, key, rounds: range) -> list[RecordedHead]:
    """Charge each round and record the signed head, as the server does with each reply."""
    record = []
    for r in rounds:
        charge(ledger, r)
        record.append(RecordedHead(r, sign_head(read_head(ledger), key)))
    return record


def test_a_signed_head_verifies_and_any_changed_field_does_not(tmp_path, key):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=50.0, delta=DELTA)
    charge(ledger, 1)
    head = sign_head(read_head(ledger), key)
    verify_signature(head)
    assert head.entries == 1 and head.epsilon_spent == pytest.approx(ledger.epsilon_spent())
    assert LedgerHead.from_dict(head.to_dict()) == head
    forged = LedgerHead(**{**head.to_dict(), "epsilon_spent": head.epsilon_spent / 2})
    with pytest.raises(LedgerSignatureError, match="does not verify"):
        verify_signature(forged)
    other = load_signing_key(write_key(tmp_path / "other"))
    resigned = sign_head(forged, other)
    verify_signature(resigned)  # self-consistent with its own key ...
    with pytest.raises(LedgerSignatureError, match="does not verify"):
        verify_signature(resigned, head.public_key)  # ... but not with the site's key


def test_an_intact_ledger_matches_the_server_record(tmp_path, key):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=50.0, delta=DELTA)
    record = run_rounds(ledger, key, range(1, 4))
    assert check_against_record(ledger, record) == 3
    charge(ledger, 4)  # a row the server has not seen yet is fine
    assert check_against_record(ledger, record) == 3


def test_a_rebuilt_chain_with_other_numbers_is_detected(tmp_path, key):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=50.0, delta=DELTA)
    record = run_rounds(ledger, key, range(1, 4))
    rebuild(ledger.path, row=2, steps=1)
    assert ledger.verify() == 3  # the chain alone cannot tell
    with pytest.raises(LedgerRecordMismatchError, match="rebuilt: row 2 does not match"):
        check_against_record(ledger, record)


def test_a_truncated_ledger_is_detected(tmp_path, key):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=50.0, delta=DELTA)
    record = run_rounds(ledger, key, range(1, 4))
    truncate(ledger.path, keep=1)
    assert ledger.verify() == 1
    with pytest.raises(LedgerRecordMismatchError, match="has 1 rows but the server recorded 3"):
        check_against_record(ledger, record)


def test_a_ledger_restored_from_an_older_backup_is_detected(tmp_path, key):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=50.0, delta=DELTA)
    record = run_rounds(ledger, key, range(1, 2))
    shutil.copy(ledger.path, tmp_path / "backup.db")
    record += run_rounds(ledger, key, range(2, 4))
    shutil.copy(tmp_path / "backup.db", ledger.path)
    with pytest.raises(LedgerRecordMismatchError, match="rolled back to its state of round 1"):
        check_against_record(Ledger.open(ledger.path), record)


def test_a_forged_head_in_the_record_is_not_evidence(tmp_path, key):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=50.0, delta=DELTA)
    record = run_rounds(ledger, key, range(1, 3))
    bad = LedgerHead(**{**record[0].head.to_dict(), "entries": 2})
    with pytest.raises(LedgerSignatureError):
        check_against_record(ledger, [RecordedHead(1, bad), record[1]])


def test_unsigned_heads_still_detect_a_rewrite(tmp_path):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=50.0, delta=DELTA)
    charge(ledger, 1)
    charge(ledger, 2)
    record = [RecordedHead(2, read_head(ledger))]
    assert not record[0].head.signed
    rebuild(ledger.path, row=1, steps=2)
    with pytest.raises(LedgerRecordMismatchError, match="rebuilt"):
        check_against_record(ledger, record)


def test_an_unusable_key_is_a_typed_error(tmp_path):
    (tmp_path / "bad").write_text("not a key")
    with pytest.raises(LedgerSignatureError, match="unusable for signing"):
        load_signing_key(tmp_path / "bad")
    with pytest.raises(LedgerSignatureError, match="unusable for signing"):
        load_signing_key(tmp_path / "missing")
