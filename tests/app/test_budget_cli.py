"""`fedfew budget`: init, show --json contract, verify, report, one-line errors."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from app.budget_cli import budget_app
from privacy.ledger import ENTRY_FIELDS, ChargeRequest, Ledger

app = typer.Typer()
app.add_typer(budget_app, name="budget")
runner = CliRunner()


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    path = tmp_path / "site.db"
    result = runner.invoke(
        app,
        [
            "budget",
            "init",
            "--ledger",
            str(path),
            "--site",
            "a<b>",
            "--cap-epsilon",
            "3",
            "--delta",
            "1e-5",
        ],
    )
    assert result.exit_code == 0, result.output
    led = Ledger.open(path)
    request = ChargeRequest(
        run_id="r1",
        round=0,
        mechanism="dp-episodic",
        noise_multiplier=2.0,
        sensitivity_factor=2.0,
        sample_rate=0.01,
        steps=300,
        requester="<script>",
    )
    for _ in range(20):
        try:
            led.charge(request)
        except Exception:  # the cap is reached within 20 charges; the refusal is recorded
            break
    return path


def test_show_json_has_the_contract_keys(ledger_path: Path) -> None:
    result = runner.invoke(app, ["budget", "show", "--ledger", str(ledger_path), "--json"])

    assert result.exit_code == 0
    data = json.loads(result.stdout)
    for key in (
        "site",
        "cap_epsilon",
        "delta",
        "epsilon_spent",
        "epsilon_remaining",
        "accountant",
        "refusals",
        "history",
    ):
        assert key in data
    assert data["site"] == "a<b>" and data["cap_epsilon"] == 3.0 and data["refusals"] == 1
    assert data["epsilon_spent"] == pytest.approx(Ledger.open(ledger_path).epsilon_spent())
    assert set(data["history"][0]) >= set(ENTRY_FIELDS)
    assert data["epsilon_remaining"] == pytest.approx(3.0 - data["epsilon_spent"])


def test_show_table(ledger_path: Path) -> None:
    result = runner.invoke(app, ["budget", "show", "--ledger", str(ledger_path)])

    assert result.exit_code == 0
    assert "refusal" in result.stdout and "dp-episodic" in result.stdout


def test_verify_intact_and_tampered(ledger_path: Path) -> None:
    ok = runner.invoke(app, ["budget", "verify", "--ledger", str(ledger_path)])
    n = len(Ledger.open(ledger_path).entries())
    conn = sqlite3.connect(ledger_path)
    with conn:
        conn.execute("UPDATE entries SET steps = 1 WHERE id = 2")
    conn.close()

    bad = runner.invoke(app, ["budget", "verify", "--ledger", str(ledger_path)])

    assert ok.exit_code == 0 and f"ledger intact: {n} rows" in ok.stdout
    assert bad.exit_code == 1
    assert "first bad row 2" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_report_html_and_csv(ledger_path: Path, tmp_path: Path) -> None:
    html_out, csv_out = tmp_path / "r.html", tmp_path / "r.csv"

    r1 = runner.invoke(
        app, ["budget", "report", "--ledger", str(ledger_path), "--out", str(html_out)]
    )
    r2 = runner.invoke(
        app, ["budget", "report", "--ledger", str(ledger_path), "--out", str(csv_out)]
    )

    assert r1.exit_code == 0 and r2.exit_code == 0
    page = html_out.read_text()
    assert "a&lt;b&gt;" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert "<svg" in page and "ledger intact" in page and "refusal" in page
    with csv_out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(Ledger.open(ledger_path).entries())
    assert list(rows[0]) == list(ENTRY_FIELDS)


def halve_spend(path: Path) -> None:
    """Edit the file as an attacker would: every recorded epsilon halved."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE entries SET epsilon_before = epsilon_before / 2")
        conn.execute("UPDATE entries SET epsilon_after = epsilon_after / 2")
    conn.close()


def raise_cap(path: Path) -> None:
    """Edit the file as an attacker would: the cap raised 100x."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET cap_epsilon = cap_epsilon * 100")
    conn.close()


@pytest.mark.parametrize(("tamper", "row"), [(halve_spend, 1), (raise_cap, 0)])
@pytest.mark.parametrize(
    "command", [["show"], ["show", "--json"], ["report", "--out", "r.html"], ["verify"]]
)
def test_a_tampered_ledger_shows_no_numbers(
    command: list[str], tamper, row: int, ledger_path: Path, tmp_path: Path
) -> None:
    tamper(ledger_path)
    args = [a if a != "r.html" else str(tmp_path / "r.html") for a in command]

    result = runner.invoke(app, ["budget", args[0], "--ledger", str(ledger_path), *args[1:]])

    assert result.exit_code == 1
    assert result.stdout == ""  # no number it cannot vouch for
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert f"ledger tampered: first bad row {row}:" in result.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["show", "--ledger", "MISSING"],
        ["verify", "--ledger", "MISSING"],
        ["report", "--ledger", "MISSING", "--out", "x.html"],
        ["init", "--ledger", "NEW", "--site", "a", "--cap-epsilon", "-1", "--delta", "1e-5"],
        ["init", "--ledger", "NEW", "--site", "a", "--cap-epsilon", "1", "--delta", "2"],
        [
            "init",
            "--ledger",
            "NEW",
            "--site",
            "a",
            "--cap-epsilon",
            "1",
            "--delta",
            "1e-5",
            "--accountant",
            "gdp",
        ],
        ["init", "--ledger", "EXISTING", "--site", "a", "--cap-epsilon", "1", "--delta", "1e-5"],
        ["report", "--ledger", "EXISTING", "--out", "r.pdf"],
        ["show", "--ledger", "JUNK"],
    ],
)
def test_bad_inputs_give_one_line_and_non_zero_exit(
    args: list[str], ledger_path: Path, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.db"
    junk.write_text("not a ledger")
    names = {
        "MISSING": tmp_path / "missing.db",
        "NEW": tmp_path / "new.db",
        "EXISTING": ledger_path,
        "JUNK": junk,
    }
    argv = ["budget", *(str(names.get(a, a)) for a in args)]

    result = runner.invoke(app, argv)

    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / "new.db").exists()
