"""Every command's failure path, through the installed ``fedfew`` executable as cron or CI runs it.

CliRunner calls the Typer app and reads ``result.exit_code`` itself, so it never sees what the
console script's ``main()`` does with that code; an administrator's cron job does. Each case here
runs ``.venv/bin/fedfew`` (the script installed beside this interpreter) in a fresh process and
checks the exit status, and that stderr holds one clear line and stdout nothing.

A fedfew process takes ~10 s of CPU to import torch, MONAI and Flower, so the cases are started
together in one module fixture (a few at a time) and each test reads its own outcome.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from privacy.ledger import ChargeRequest, Ledger

FEDFEW = Path(sys.executable).parent / "fedfew"
TIMEOUT_S = 240  # failure paths exit right after the imports; generous for a loaded 2-core box
WORKERS = 2  # processes at once: import time is CPU-bound, and the machine has 2 cores


@dataclass(frozen=True)
class Case:
    """One failing command line, its exit status and a fragment of its one-line message."""

    name: str
    argv: tuple[str, ...]
    status: int
    message: str


# {name} in an argument is replaced by the path of the fixture file of that name.
CASES = (
    Case(
        "budget-verify-spend-halved",
        ("budget", "verify", "--ledger", "{halved}"),
        1,
        "ledger tampered: first bad row 1:",
    ),
    Case(
        "budget-verify-cap-raised",
        ("budget", "verify", "--ledger", "{raised}"),
        1,
        "ledger tampered: first bad row 0: meta row",
    ),
    Case(
        "budget-show-spend-halved",
        ("budget", "show", "--ledger", "{halved}"),
        1,
        "cannot be trusted and are not shown",
    ),
    Case(
        "budget-show-json-cap-raised",
        ("budget", "show", "--json", "--ledger", "{raised}"),
        1,
        "ledger tampered: first bad row 0",
    ),
    Case(
        "budget-report-spend-halved",
        ("budget", "report", "--ledger", "{halved}", "--out", "report.html"),
        1,
        "ledger tampered: first bad row 1",
    ),
    Case(
        "budget-show-missing-ledger",
        ("budget", "show", "--ledger", "missing.db"),
        1,
        "no ledger at missing.db",
    ),
    Case(
        "budget-init-missing-delta",
        ("budget", "init", "--ledger", "new.db", "--site", "a", "--cap-epsilon", "1"),
        2,  # a missing required option is a usage error (click's status 2)
        "Missing option '--delta'",
    ),
    Case(
        "train-missing-data",
        ("train", "--data", "missing.npz", "--out", "model"),
        1,
        "missing.npz",
    ),
    Case(
        "train-corrupt-data",
        ("train", "--data", "{corrupt}", "--out", "model"),
        1,
        "corrupt.npz",
    ),
    Case(
        "evaluate-missing-model",
        ("evaluate", "--model", "nowhere", "--data", "{corrupt}", "--ways", "2", "--shots", "1"),
        1,
        "not a fedfew model directory",
    ),
    Case(
        "pretrain-missing-data",
        ("pretrain", "--data", "missing.npz", "--out", "model"),
        1,
        "missing.npz: file does not exist",
    ),
    Case(
        "adapt-domain-missing-model",
        ("adapt-domain", "--model", "nowhere", "--unlabeled", "images", "--out", "model"),
        1,
        "not a fedfew model directory",
    ),
    Case(
        "users-bad-role",
        ("users", "add", "--role", "nurse", "--username", "ana", "--db", "users.db"),
        1,
        "--role must be one of",
    ),
    Case(
        "dashboard-bad-superlink",
        ("dashboard", "--superlink", "nohost", "--registry", "registry"),
        1,
        "must be host:port",
    ),
    Case(
        "node-run-missing-config",
        ("node", "run", "--config", "node.toml"),
        1,
        "node.toml does not exist",
    ),
    Case(
        "node-init-missing-ca",
        (
            *("node", "init", "--site", "a", "--data", "{corrupt}"),
            *("--superlink", "127.0.0.1:9092", "--ca", "ca.crt", "--budget-epsilon", "8"),
            *("--out", "node"),
        ),
        1,
        "CA certificate ca.crt does not exist",
    ),
    Case(
        "server-run-missing-config",
        ("server", "run", "--config", "server.toml"),
        1,
        "server.toml does not exist",
    ),
    Case(
        "server-start-run-missing-config",
        ("server", "start-run", "--config", "server.toml"),
        1,
        "server.toml does not exist",
    ),
    Case("unknown-command", ("frobnicate",), 2, "No such command 'frobnicate'"),
)


def _ledger(path: Path) -> Path:
    ledger = Ledger.create(path, site="hospital-a", cap_epsilon=8.0, delta=1e-5)
    for round_no in range(2):
        ledger.charge(
            ChargeRequest(
                run_id="run",
                round=round_no,
                mechanism="dp-episodic",
                noise_multiplier=4.0,
                sensitivity_factor=2.0,
                sample_rate=0.05,
                steps=50,
                requester="node-a",
            )
        )
    return path


def _edit(path: Path, *statements: str) -> Path:
    with sqlite3.connect(path) as conn:
        for statement in statements:
            conn.execute(statement)
    conn.close()
    return path


def _run(case: Case, folder: Path, files: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFEW_")}
    # The dashboard's accounts and registry default to FEDFEW_HOME: never the real user's.
    env |= {"FEDFEW_HOME": str(folder / ".fedfew"), "COLUMNS": "200"}
    return subprocess.run(
        [str(FEDFEW), *(a.format(**files) for a in case.argv)],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,  # a prompt reached by mistake ends instead of hanging
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def outcomes(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every case run once, in its own working folder: name -> (folder, completed process)."""
    assert FEDFEW.is_file(), f"{FEDFEW} is missing: install fedfew (`pip install -e .`)"
    root = tmp_path_factory.mktemp("exit-codes")
    files = {
        "halved": _edit(
            _ledger(root / "halved.db"),
            "UPDATE entries SET epsilon_after = epsilon_after / 2",
            "UPDATE entries SET epsilon_before = epsilon_before / 2",
        ),
        "raised": _edit(_ledger(root / "raised.db"), "UPDATE meta SET cap_epsilon = 800"),
        "corrupt": root / "corrupt.npz",
    }
    files["corrupt"].write_bytes(b"PK\x03\x04 truncated")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {c.name: pool.submit(_run, c, root / c.name, files) for c in CASES}
        return {name: (root / name, f.result()) for name, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_failure_exits_non_zero_with_one_line_on_stderr(case: Case, outcomes) -> None:
    folder, result = outcomes[case.name]
    lines = [line for line in result.stderr.splitlines() if line.strip()]

    assert result.returncode == case.status, result.stderr
    assert len(lines) == 1, result.stderr
    assert case.message in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # nothing that could be read as a result
    assert [p.name for p in folder.iterdir() if p.name != ".fedfew"] == []  # nothing written


def test_every_command_and_group_has_a_case() -> None:
    from app.cli import app

    names = {info.name or info.callback.__name__ for info in app.registered_commands}
    names |= {group.name for group in app.registered_groups}
    # demo's input errors are train's (same loader); it is the one command without a case here.
    assert names - {c.argv[0] for c in CASES} == {"demo"}
