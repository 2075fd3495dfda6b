"""`fedfew budget verify --against SERVER_RECORD` as an administrator runs it (the installed
executable, a real process): an intact ledger passes; a rebuilt, truncated or rolled-back one
exits 1 with one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.ledger import Ledger
from privacy.ledger_head import RecordedHead, load_signing_key, read_head, sign_head
from privacy.site_report import write_heads
from tests.privacy.conftest import charge, write_key
from tests.privacy.ledger_helpers import rebuild, truncate

FEDFEW = Path(sys.executable).with_name("fedfew")


def verify(ledger: Path, against: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FEDFEW), "budget", "verify", "--ledger", str(ledger), "--against", str(against)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def site(tmp_path) -> tuple[Path, Path]:
    """A ledger after 3 rounds and the server's exported record of its signed heads."""
    key = load_signing_key(write_key(tmp_path / "node"))
    ledger = Ledger.create(tmp_path / "a.db", site="a", cap_epsilon=50.0, delta=1e-5)
    heads = []
    for r in (1, 2, 3):
        charge(ledger, r)
        heads.append(RecordedHead(r, sign_head(read_head(ledger), key)))
        if r == 1:
            shutil.copy(ledger.path, tmp_path / "backup.db")
    return ledger.path, write_heads(heads, tmp_path / "heads.json")


def test_an_intact_ledger_matches(site):
    ledger, record = site
    result = verify(ledger, record)
    assert result.returncode == 0, result.stderr
    assert "matches the server's record of site 'a' (3 heads, up to round 3)" in result.stdout


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        (lambda path, backup: rebuild(path, row=2, steps=1), "was rebuilt: row 2"),
        (lambda path, backup: truncate(path, keep=2), "has 2 rows but the server recorded 3"),
        (lambda path, backup: shutil.copy(backup, path), "rolled back to its state of round 1"),
    ],
    ids=["rebuilt", "truncated", "rolled-back"],
)
def test_a_rewritten_ledger_exits_1_with_one_line(site, attack, message):
    ledger, record = site
    attack(ledger, ledger.with_name("backup.db"))
    assert (
        subprocess.run(
            [str(FEDFEW), "budget", "verify", "--ledger", str(ledger)], capture_output=True
        ).returncode
        == 0
    )  # the chain alone cannot tell
    result = verify(ledger, record)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("ledger does not match the server's record") and message in line


def test_an_unreadable_record_exits_1_with_one_line(site, tmp_path):
    ledger, _ = site
    (tmp_path / "bad.json").write_text("not json")
    result = verify(ledger, tmp_path / "bad.json")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: server record") and "unreadable" in line
