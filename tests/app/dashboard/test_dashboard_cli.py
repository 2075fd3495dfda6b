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
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4].endswith("app/dashboard/server.py")
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


def _no_start(monkeypatch) -> None:
    monkeypatch.setattr(dashboard_cli.subprocess, "call", lambda *a, **k: pytest.fail("started"))


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "dashboard.hospital.example"])
def test_plain_http_off_loopback_needs_insecure_http(host: str, monkeypatch) -> None:
    _no_start(monkeypatch)
    result = invoke("dashboard", "--host", host)
    assert result.exit_code == 2
    assert "--insecure-http" in result.output and "--tls-cert" in result.output
    assert "Traceback" not in result.output


def _started(monkeypatch, tmp_path: Path, *args: str) -> tuple[dict[str, str], dict[str, str]]:
    calls = []
    monkeypatch.setattr(
        dashboard_cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0
    )
    for var in settings.ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    result = invoke("dashboard", "--users-db", str(tmp_path / "u.sqlite"), *args)
    assert result.exit_code == 0, result.output
    ((cmd, env),) = calls
    return dict(zip(cmd[5::2], cmd[6::2], strict=True)), env


def test_insecure_http_is_allowed_and_said(tmp_path: Path, monkeypatch) -> None:
    flags, env = _started(monkeypatch, tmp_path, "--host", "0.0.0.0", "--insecure-http")
    assert flags["--server.address"] == "0.0.0.0" and "--server.sslCertFile" not in flags
    assert settings.load_settings(env).insecure_http  # every page shows the banner
    _, local = _started(monkeypatch, tmp_path, "--idle-minutes", "5")
    assert not settings.load_settings(local).insecure_http  # loopback: nothing to warn about
    assert settings.load_settings(local).idle_s == 300


def test_tls_serves_https_with_streamlits_own_options(tmp_path: Path, monkeypatch) -> None:
    cert, key = tmp_path / "dashboard.pem", tmp_path / "dashboard.key"
    cert.write_text("certificate")
    key.write_text("key")
    flags, env = _started(
        monkeypatch, tmp_path, "--host", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    assert flags["--server.sslCertFile"] == str(cert)
    assert flags["--server.sslKeyFile"] == str(key)
    assert not settings.load_settings(env).insecure_http
    _no_start(monkeypatch)
    half = invoke("dashboard", "--tls-cert", str(cert))
    assert half.exit_code == 2 and "both --tls-cert and --tls-key" in half.output
    missing = invoke("dashboard", "--tls-cert", str(cert), "--tls-key", str(tmp_path / "no.key"))
    assert missing.exit_code == 2 and "no.key does not exist" in missing.output


OIDC = """issuer = "https://login.hospital.example/realms/clinic"
client_id = "fedfew-dashboard"
client_secret = "s3cret-from-the-provider"
redirect_uri = "https://fedfew.hospital.example:8501/oauth2callback"
role_claim = "groups"
[roles]
"fedfew-clinicians" = "clinician"
"""


def test_oidc_config_is_checked_and_passed_by_path(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "oidc.toml"
    config.write_text(OIDC)
    flags, env = _started(monkeypatch, tmp_path, "--oidc", str(config))
    assert settings.load_settings(env).oidc_config == config.resolve()
    assert "s3cret-from-the-provider" not in " ".join([*flags, *flags.values(), *env.values()])
    from app.dashboard.oidc import load_oidc_config, streamlit_secrets

    auth = streamlit_secrets(load_oidc_config(config))["auth"]
    assert auth["server_metadata_url"] == (
        "https://login.hospital.example/realms/clinic/.well-known/openid-configuration"
    )
    assert auth["client_kwargs"]["prompt"] == "login" and len(auth["cookie_secret"]) == 64

    _no_start(monkeypatch)
    for text, message in [
        (OIDC.replace('"clinician"', '"doctor"'), "role must be one of"),
        (OIDC.replace("https://login", "http://login"), "issuer must be an https:// URL"),
        ('clent_id = "typo"\n' + OIDC, "unknown key(s) clent_id"),
        (OIDC.replace("/oauth2callback", "/callback"), "must end in /oauth2callback"),
        ("issuer = [", "not valid TOML"),
    ]:
        config.write_text(text)
        result = invoke("dashboard", "--oidc", str(config))
        assert result.exit_code == 1 and message in " ".join(result.output.split()), text


def test_replacing_an_account_ends_its_sessions_and_records_a_new_role(tmp_path: Path) -> None:
    import time

    from app.dashboard.auth import Session
    from app.dashboard.persistence import ENDED_DISABLED, SessionStore
    from app.dashboard.provenance import ACTION_ROLES_CHANGED, AuditLog

    db = tmp_path / "users.sqlite"
    args = ("users", "add", "--username", "ana", "--db", str(db))
    assert invoke(*args, "--role", "clinician", stdin=f"{PASSWORD}\n{PASSWORD}\n").exit_code == 0
    token = SessionStore(db).create(Session("ana", ("clinician",), time.time() + 60))
    again = invoke(*args, "--role", "it", "--replace", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert again.exit_code == 0, again.output
    assert SessionStore(db).resume(token).ended == ENDED_DISABLED
    (entry,) = AuditLog(db).entries()
    assert entry.action == ACTION_ROLES_CHANGED and entry.detail == "account ana: clinician -> it"


def test_the_real_command_refuses_plain_http_off_loopback_with_exit_2() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "dashboard", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "--insecure-http" in result.stderr and "Traceback" not in result.stderr
