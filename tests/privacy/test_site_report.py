"""The one privacy report record: round trip through its flat form, strict reading, and the
server's record of ledger heads read back from a registry or an exported JSON file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from models.registry import Registry
from privacy.errors import LedgerError, ReportFormatError
from privacy.ledger import Ledger
from privacy.ledger_head import check_against_record, load_signing_key, read_head, sign_head
from privacy.site_report import SitePrivacyReport, recorded_heads, write_heads

from .conftest import charge, write_key


def report_for(ledger: Ledger, round_no: int, head) -> SitePrivacyReport:
    entry = ledger.entries()[-1]
    return SitePrivacyReport.of_charge(
        entry, head, site=ledger.site, weight=1.0, round=round_no, replayed=False
    )


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger.create(tmp_path / "a.db", site="a", cap_epsilon=50.0, delta=1e-5)


def test_the_flat_form_round_trips_and_is_what_a_config_record_carries(ledger, tmp_path):
    charge(ledger, 1)
    key = load_signing_key(write_key(tmp_path / "k"))
    report = report_for(ledger, 1, sign_head(read_head(ledger), key))
    flat = report.to_dict()
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())
    assert SitePrivacyReport.from_dict(flat) == report
    assert report.head.signed and report.head.entries == 1


def test_a_report_with_a_missing_unknown_or_mistyped_key_is_refused(ledger):
    charge(ledger, 1)
    flat = report_for(ledger, 1, read_head(ledger)).to_dict()
    with pytest.raises(ReportFormatError, match="privacy report: missing epsilon-spent"):
        SitePrivacyReport.from_dict({k: v for k, v in flat.items() if k != "epsilon-spent"})
    with pytest.raises(ReportFormatError, match=r"unknown key.* epsilon_spent;"):
        SitePrivacyReport.from_dict({**flat, "epsilon_spent": 1.0})
    with pytest.raises(ReportFormatError, match="privacy report: steps must be int, got '20'"):
        SitePrivacyReport.from_dict({**flat, "steps": "20"})
    with pytest.raises(ReportFormatError, match="head-check"):
        SitePrivacyReport.from_dict({**flat, "head-check": "trust-me"})


def test_the_server_record_is_read_from_its_registry_and_from_an_export(ledger, tmp_path):
    registry = Registry.open(tmp_path / "registry", create=True)
    for r in (1, 2):
        charge(ledger, r)
        report = report_for(ledger, r, read_head(ledger))
        registry.publish(
            lambda folder: folder.mkdir(),
            kind="global",
            name=f"round {r}",
            privacy={"a": report.to_dict(), "b": dataclasses.replace(report, site="b").to_dict()},
            info={"round": r},
        )
    heads = recorded_heads(tmp_path / "registry", site="a")
    assert [(h.round, h.head.entries) for h in heads] == [(1, 1), (2, 2)]
    assert check_against_record(ledger, heads) == 2
    exported = write_heads(heads, tmp_path / "heads.json")
    assert recorded_heads(exported, site="a") == heads
    assert recorded_heads(exported, site="c") == []


def test_an_unreadable_server_record_is_a_typed_error(tmp_path: Path):
    with pytest.raises(LedgerError, match="no model registry"):
        recorded_heads(tmp_path / "nothing", site="a")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LedgerError, match="JSON list"):
        recorded_heads(tmp_path / "bad.json", site="a")
