"""The server's round records and status file, typed (privacy/round_record.py): the JSON they
read and write is the form the checkpoint's history and ``status.json`` have always held, and the
dashboard's reader (app/dashboard/network.py) finds its keys in it."""

from __future__ import annotations

import json

import pytest

from app.dashboard import network
from privacy.errors import ReportFormatError
from privacy.ledger import Ledger
from privacy.ledger_head import read_head
from privacy.round_record import FederationStatus, PrototypeSummary, RoundRecord, SecureSum
from privacy.site_report import SitePrivacyReport


@pytest.fixture
def report(tmp_path, charge_request) -> SitePrivacyReport:
    ledger = Ledger.create(tmp_path / "a.db", site="a", cap_epsilon=50.0, delta=1e-5)
    entry = ledger.charge(charge_request(run_id="f", steps=3))
    head = read_head(ledger)
    return SitePrivacyReport.of_charge(entry, head, site="a", weight=1.0, round=1, replayed=False)


def plain(report) -> RoundRecord:
    return RoundRecord(
        1,
        seconds=2.5,
        bytes_sent_per_node=100,
        attempts=2,
        sites={"a": report},
        bytes_received={"a": 90},
        clipped=("a",),
        problems=("node 3: no reply within 5 s",),
        metrics={"accuracy-5way-1shot": 0.4},
    )


def test_a_plain_round_is_the_json_the_server_has_always_written(report):
    record = plain(report)
    expected = {
        "round": 1,
        "seconds": 2.5,
        "bytes-sent-per-node": 100,
        "attempts": 2,
        "sites": {"a": report.to_dict()},
        "bytes-received": {"a": 90},
        "clipped": ["a"],
        "problems": ["node 3: no reply within 5 s"],
        "metrics": {"accuracy-5way-1shot": 0.4},
    }
    assert record.to_dict() == expected
    assert list(record.to_dict()) == list(expected)  # the same key order in the checkpoint
    assert RoundRecord.from_dict(json.loads(json.dumps(expected))) == record


def test_secure_and_prototype_rounds_add_their_objects_and_round_trip(report):
    secure = RoundRecord(
        2,
        seconds=1.0,
        bytes_sent_per_node=100,
        attempts=1,
        sites={"a": report},
        secure_aggregation=SecureSum(contributors=3, sum_norm=0.5, sum_bound=2.0, bytes_received=7),
    )
    flat = secure.to_dict()
    assert flat["secure-aggregation"] == {
        "contributors": 3,
        "sum-norm": 0.5,
        "sum-bound": 2.0,
        "bytes-received": 7,
    }
    assert flat["bytes-received"] == {} and flat["clipped"] == []
    released = RoundRecord(1, 1.0, 100, 1, prototypes=PrototypeSummary(("x", "y"), ("a", "b")))
    assert released.to_dict()["prototypes"] == {"classes": ["x", "y"], "sites": ["a", "b"]}
    for record in (secure, released):
        assert RoundRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record


def test_a_malformed_record_is_a_typed_error_naming_the_key(report):
    flat = plain(report).to_dict()
    with pytest.raises(ReportFormatError, match="lacks 'attempts'"):
        RoundRecord.from_dict({k: v for k, v in flat.items() if k != "attempts"})
    with pytest.raises(ReportFormatError, match="privacy report: steps must be int"):
        RoundRecord.from_dict({**flat, "sites": {"a": {**report.to_dict(), "steps": "2"}}})


def test_the_status_file_round_trips_and_the_dashboard_reads_it(tmp_path, report):
    status = FederationStatus(
        federation="f",
        round=1,
        nodes_connected=3,
        updated="2026-12-05T10:00:00Z",
        rounds=(RoundRecord(0, 0.0, 0, 0), plain(report)),
    )
    path = status.write(tmp_path / "status.json")
    assert FederationStatus.read(path) == status
    assert set(json.loads(path.read_text())) == {
        network.STATUS_FEDERATION,
        network.STATUS_ROUND,
        network.STATUS_NODES,
        network.STATUS_UPDATED,
        network.STATUS_ROUNDS,
    }
    shown = network.read_status(path)
    assert shown is not None and (shown.federation, shown.round) == ("f", 1)
    assert shown.nodes_reported == 3 and shown.updated is not None
    assert [r["round"] for r in shown.rounds] == [0, 1]
    path.write_text("[1, 2]")
    with pytest.raises(ReportFormatError, match=r"status file .* is malformed"):
        FederationStatus.read(path)
