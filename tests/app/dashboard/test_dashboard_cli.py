"""`fedfew users` and `fedfew dashboard` through typer's CliRunner (Streamlit not started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from app import dashboard_cli
from app.cli import app as fedfew_app
from app.dashboard import settings
from app.dashboard.auth import UserStore

runner = CliRunner()
PASSWORD = "a long enough password"


def invoke(*args: str, stdin: str | None = None):
    return runner.invoke(fedfew_app, list(args), input=stdin)


def test_users_add_list_remove(tmp_path: Path) -> None:
    db = tmp_path / "users.sqlite"
    added = invoke(
        "users",
        "add",
        "--role",
        "clinician",
        "--db",
        str(db),
        stdin=f"ana\n{PASSWORD}\n{PASSWORD}\n",
    )
    assert added.exit_code == 0, added.output
    assert PASSWORD not in added.output  # hidden input
    assert UserStore(db).authenticate("ana", PASSWORD).role == "clinician"
    listed = invoke("users", "list", "--db", str(db))
    assert listed.exit_code == 0 and "ana\tclinician" in listed.output
    removed = invoke("users", "remove", "--username", "ana", "--db", str(db))
    assert removed.exit_code == 0
    assert "no accounts" in invoke("users", "list", "--db", str(db)).output


def test_users_add_errors_are_one_line(tmp_path: Path) -> None:
    db = str(tmp_path / "users.sqlite")
    bad_role = invoke("users", "add", "--role", "root", "--username", "x", "--db", db)
    assert bad_role.exit_code == 1 and "--role must be one of" in bad_role.output
    short = invoke(
        "users", "add", "--role", "it", "--username", "x", "--db", db, stdin="short\nshort\n"
    )
    assert short.exit_code == 1 and "at least 10 characters" in short.output
    assert "Traceback" not in short.output
    mismatch = invoke(
        "users",
        "add",
        "--role",
        "it",
        "--username",
        "x",
        "--db",
        db,
        stdin=f"{PASSWORD}\nsomething else\n{PASSWORD}\n{PASSWORD}\n",
    )
    assert mismatch.exit_code == 0 and "do not match" in mismatch.output.lower()
    missing = invoke("users", "remove", "--username", "nobody", "--db", db)
    assert missing.exit_code == 1 and "no user 'nobody'" in missing.output


def test_dashboard_passes_settings_and_upload_cap(tmp_path: Path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(
        dashboard_cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0
    )
    for var in settings.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    result = invoke(
        "dashboard",
        "--port",
        "8600",
        "--registry",
        str(tmp_path / "reg"),
        "--ledger",
        str(tmp_path / "a.db"),
        "--ledger",
        str(tmp_path / "b.db"),
        "--users-db",
        str(tmp_path / "u.sqlite"),
        "--superlink",
        "10.0.0.5:9092",
        "--dicomweb",
        "http://pacs:8042/dicom-web",
        "--site-name",
        "St Elsewhere",
    )
    assert result.exit_code == 0, result.output
    # First run: how to get an account, in the same database (one option name for both).
    hint = f"fedfew users add --role clinician --users-db {tmp_path / 'u.sqlite'}"
    assert hint in " ".join(result.output.split())
    ((cmd, env),) = calls
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("app/dashboard/main.py")
    flags = dict(zip(cmd[5::2], cmd[6::2], strict=True))
    assert flags["--server.maxUploadSize"] == str(settings.MAX_UPLOAD_MB)
    assert flags["--server.port"] == "8600" and flags["--server.address"] == "127.0.0.1"
    assert flags["--client.showErrorDetails"] == "none"  # no exception class name, no trace
    loaded = settings.load_settings(env)
    assert loaded.ledgers == (tmp_path / "a.db", tmp_path / "b.db")
    assert loaded.superlink == ("10.0.0.5", 9092) and loaded.registry == tmp_path / "reg"
    assert loaded.dicomweb == "http://pacs:8042/dicom-web" and loaded.site_name == "St Elsewhere"
    added = invoke(
        "users", "add", "--role", "it", "--users-db", str(tmp_path / "u.sqlite"),
        stdin=f"ian\n{PASSWORD}\n{PASSWORD}\n",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert UserStore(tmp_path / "u.sqlite").authenticate("ian", PASSWORD).role == "it"


def test_dashboard_refuses_a_bad_superlink(monkeypatch) -> None:
    monkeypatch.setattr(dashboard_cli.subprocess, "call", lambda *a, **k: pytest.fail("started"))
    result = invoke("dashboard", "--superlink", "nohost")
    assert result.exit_code == 1 and "host:port" in result.output


def test_settings_defaults_and_errors(tmp_path: Path) -> None:
    loaded = settings.load_settings({settings.ENV_HOME: str(tmp_path)})
    assert loaded.registry == tmp_path / "registry" and loaded.ledgers == ()
    assert loaded.session_hours == settings.DEFAULT_SESSION_HOURS and loaded.superlink is None
    with pytest.raises(settings.SettingsError, match="FEDFEW_SESSION_HOURS"):
        settings.load_settings({settings.ENV_SESSION_HOURS: "soon"})
    with pytest.raises(settings.SettingsError, match="FEDFEW_SESSION_HOURS"):
        settings.load_settings({settings.ENV_SESSION_HOURS: "0"})
    assert settings.parse_superlink("[::1]:9092") == ("::1", 9092)
