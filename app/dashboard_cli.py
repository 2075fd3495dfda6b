"""``fedfew users`` (the dashboard's local accounts) and ``fedfew dashboard`` (start it).

Registered in ``app/cli.py`` as ``fedfew dashboard`` and ``fedfew users``.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import typer

from app.dashboard.auth import ROLES, UserStore
from app.dashboard.errors import DashboardError, SettingsError
from app.dashboard.oidc import load_oidc_config
from app.dashboard.persistence import ENDED_DISABLED, SessionStore
from app.dashboard.provenance import ACTION_ROLES_CHANGED, AuditLog
from app.dashboard.settings import (
    ENV_DATA_ROOTS,
    ENV_DICOMWEB,
    ENV_FEDERATION_STATUS,
    ENV_IDLE_MINUTES,
    ENV_INSECURE_HTTP,
    ENV_LEDGERS,
    ENV_OIDC_CONFIG,
    ENV_REGISTRY,
    ENV_SESSION_HOURS,
    ENV_SITE_NAME,
    ENV_SUPERLINK,
    ENV_USERS_DB,
    load_settings,
    parse_superlink,
)

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
ENTRY_FILE = DASHBOARD_DIR / "main.py"
SERVER_FILE = DASHBOARD_DIR / "server.py"  # Streamlit's ASGI app around ENTRY_FILE, with routes
STREAMLIT_CONFIG = DASHBOARD_DIR / ".streamlit" / "config.toml"
DEFAULT_PORT = 8501  # Streamlit's
DEFAULT_HOST = "127.0.0.1"  # this machine only; serving the ward network is a deliberate choice

users_app = typer.Typer(
    help="The dashboard's local accounts (salted scrypt hashes; no default account).",
    no_args_is_help=True,
)

UsersDbOption = typer.Option(
    None,
    "--users-db",
    "--db",  # the name it had first
    help=f"Account database (default: ${ENV_USERS_DB} or ~/.fedfew/dashboard.sqlite); the "
    "same option as `fedfew dashboard --users-db`.",
)


def _store(db: Path | None) -> UserStore:
    try:
        return UserStore(db or load_settings().users_db)
    except DashboardError as exc:
        _fail(exc)


def _fail(exc: Exception) -> NoReturn:
    typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
    raise typer.Exit(1)


@users_app.command("add")
def add_user(
    role: str = typer.Option(..., "--role", help=f"One of: {', '.join(ROLES)}."),
    username: str | None = typer.Option(None, "--username", help="Asked for when not given."),
    replace: bool = typer.Option(False, "--replace", help="Reset an existing account."),
    db: Path | None = UsersDbOption,
) -> None:
    """Create an account; the password is asked for twice and never shown."""
    if role not in ROLES:
        _fail(DashboardError(f"--role must be one of {', '.join(ROLES)}, got {role!r}"))
    name = username or typer.prompt("Username")
    password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    store = _store(db)
    try:
        before = {u.username: u.role for u in store.users()}.get(name.strip())
        user = store.add(name, password, role=role, replace=replace)
        if before is not None:  # replaced: its open sessions end, a new role is on record
            SessionStore(store.path).end_user(user.username, reason=ENDED_DISABLED)
            if before != user.role:
                AuditLog(store.path).record_event(
                    user="fedfew users add --replace",
                    action=ACTION_ROLES_CHANGED,
                    detail=f"account {user.username}: {before} -> {user.role}",
                )
    except DashboardError as exc:
        _fail(exc)
    typer.echo(f"account {user.username!r} ({user.role}) saved in {store.path}")


@users_app.command("list")
def list_users(db: Path | None = UsersDbOption) -> None:
    """List the accounts (name, role, created)."""
    store = _store(db)
    try:
        users = store.users()
    except DashboardError as exc:
        _fail(exc)
    if not users:
        typer.echo(f"no accounts in {store.path}; create one with `fedfew users add --role ROLE`")
    for user in users:
        typer.echo(f"{user.username}\t{user.role}\t{user.created}")


@users_app.command("remove")
def remove_user(
    username: str = typer.Option(..., "--username", help="The account to delete."),
    db: Path | None = UsersDbOption,
) -> None:
    """Delete an account."""
    store = _store(db)
    try:
        store.remove(username)
    except DashboardError as exc:
        _fail(exc)
    typer.echo(f"account {username!r} removed")


def _flags(config: dict[str, Any], prefix: str = "") -> list[str]:
    flags: list[str] = []
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flags += _flags(value, name)
        else:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            flags += [f"--{name}", text]
    return flags


def streamlit_command(*, port: int, host: str, tls: tuple[Path, Path] | None = None) -> list[str]:
    """The ``streamlit run`` command line, with every value of the dashboard's config.toml, and
    Streamlit's own TLS (``server.sslCertFile`` / ``server.sslKeyFile``) when ``tls`` is given."""
    config = tomllib.loads(STREAMLIT_CONFIG.read_text(encoding="utf-8"))
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(SERVER_FILE),
        *_flags(config),
        "--server.port",
        str(port),
        "--server.address",
        host,
    ]
    if tls is not None:
        command += ["--server.sslCertFile", str(tls[0]), "--server.sslKeyFile", str(tls[1])]
    return command


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_transport(
    *, host: str, tls_cert: Path | None, tls_key: Path | None, insecure_http: bool
) -> tuple[Path, Path] | None:
    """The TLS pair to serve with, or None for plain HTTP where that is allowed.

    Raises:
        SettingsError: only one of the pair, a file missing, or plain HTTP on a non-loopback
            address without ``--insecure-http``.
    """
    if (tls_cert is None) != (tls_key is None):
        raise SettingsError("give both --tls-cert and --tls-key (the certificate and its key)")
    if tls_cert is not None and tls_key is not None:
        for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if not path.is_file():
                raise SettingsError(f"{flag} {path} does not exist")
        return tls_cert, tls_key
    if not is_loopback(host) and not insecure_http:
        raise SettingsError(
            f"refusing to serve plain HTTP on {host}: passwords and patient data would cross "
            "the network unencrypted. Give --tls-cert FILE --tls-key FILE, put the TLS proxy of "
            "deploy/README.md in front (and keep --host 127.0.0.1), or, on a network that is "
            "itself encrypted, say so with --insecure-http"
        )
    return None


def dashboard(
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port to serve on."),
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to serve on."),
    registry: Path | None = typer.Option(
        None, "--registry", help=f"This node's model registry (default: ${ENV_REGISTRY})."
    ),
    ledger: list[Path] | None = typer.Option(
        None, "--ledger", help=f"A site's budget ledger; repeat for several ({ENV_LEDGERS})."
    ),
    users_db: Path | None = typer.Option(
        None, "--users-db", help=f"Account database (default: ${ENV_USERS_DB})."
    ),
    federation_status: Path | None = typer.Option(
        None, "--federation-status", help="JSON status file the federation writes, if any."
    ),
    superlink: str | None = typer.Option(
        None, "--superlink", help="HOST:PORT of the Flower SuperLink to check."
    ),
    session_hours: float | None = typer.Option(
        None, "--session-hours", help="Login lifetime (default 8)."
    ),
    dicomweb: str | None = typer.Option(
        None, "--dicomweb", help=f"The image archive's DICOMweb root URL (${ENV_DICOMWEB})."
    ),
    data_root: list[Path] | None = typer.Option(
        None,
        "--data-root",
        help=f"A folder the Prepare page may read studies from; repeat for several "
        f"({ENV_DATA_ROOTS}). None: only the image archive and uploads.",
    ),
    site_name: str | None = typer.Option(
        None, "--site-name", help=f"The hospital's name, shown on the login page ({ENV_SITE_NAME})."
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="Serve HTTPS with this certificate (PEM, with its chain)."
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", help="The private key of --tls-cert (PEM)."
    ),
    insecure_http: bool = typer.Option(
        False,
        "--insecure-http",
        help="Allow plain HTTP on a non-loopback --host (every page then says so).",
    ),
    oidc: Path | None = typer.Option(
        None,
        "--oidc",
        help="Sign in through the hospital's identity provider (OpenID Connect): a TOML file "
        "with issuer, client_id, client_secret, redirect_uri and [roles] (deploy/README.md).",
    ),
    idle_minutes: float | None = typer.Option(
        None, "--idle-minutes", help="Sign out after this many minutes without activity (15)."
    ),
) -> None:
    """Start the dashboard (Streamlit) for clinicians, administrators and IT."""
    try:
        tls = check_transport(
            host=host, tls_cert=tls_cert, tls_key=tls_key, insecure_http=insecure_http
        )
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    env = dict(os.environ)
    values = {
        ENV_REGISTRY: registry,
        ENV_LEDGERS: os.pathsep.join(str(p) for p in ledger) if ledger else None,
        ENV_USERS_DB: users_db,
        ENV_FEDERATION_STATUS: federation_status,
        ENV_SUPERLINK: superlink,
        ENV_SESSION_HOURS: session_hours,
        ENV_DICOMWEB: dicomweb,
        ENV_DATA_ROOTS: os.pathsep.join(str(p) for p in data_root) if data_root else None,
        ENV_SITE_NAME: site_name,
        ENV_IDLE_MINUTES: idle_minutes,
        ENV_INSECURE_HTTP: "1" if insecure_http and tls is None and not is_loopback(host) else None,
        ENV_OIDC_CONFIG: oidc.resolve() if oidc else None,
    }
    env.update({k: str(v) for k, v in values.items() if v is not None})
    try:
        if superlink:
            parse_superlink(superlink)
        settings = load_settings(env)
        oidc_config = load_oidc_config(oidc) if oidc else None
    except DashboardError as exc:
        _fail(exc)
    if oidc_config is not None and oidc_config.ca_file is not None:
        env["SSL_CERT_FILE"] = str(oidc_config.ca_file)  # the provider's CA, for Authlib (httpx)
    if not UserStore(settings.users_db).users():
        typer.echo(
            f"no dashboard account yet in {settings.users_db}: create one with "
            f"`fedfew users add --role clinician --users-db {settings.users_db}` (or "
            "administrator, it)",
            err=True,
        )
    scheme = "https" if tls else "http"
    typer.echo(f"dashboard on {scheme}://{host}:{port} (registry {settings.registry})")
    code = subprocess.call(streamlit_command(port=port, host=host, tls=tls), env=env)
    if code:
        raise typer.Exit(code)
