"""``fedfew users`` (the dashboard's local accounts) and ``fedfew dashboard`` (start it).

Registered in ``app/cli.py`` as ``fedfew dashboard`` and ``fedfew users``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, NoReturn

import typer

from app.dashboard.auth import ROLES, UserStore
from app.dashboard.errors import DashboardError
from app.dashboard.settings import (
    ENV_DATA_ROOTS,
    ENV_DICOMWEB,
    ENV_FEDERATION_STATUS,
    ENV_LEDGERS,
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
        user = store.add(name, password, role=role, replace=replace)
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


def streamlit_command(*, port: int, host: str) -> list[str]:
    """The ``streamlit run`` command line, with every value of the dashboard's config.toml."""
    config = tomllib.loads(STREAMLIT_CONFIG.read_text(encoding="utf-8"))
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ENTRY_FILE),
        *_flags(config),
        "--server.port",
        str(port),
        "--server.address",
        host,
    ]


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
) -> None:
    """Start the dashboard (Streamlit) for clinicians, administrators and IT."""
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
    }
    env.update({k: str(v) for k, v in values.items() if v is not None})
    try:
        if superlink:
            parse_superlink(superlink)
        settings = load_settings(env)
    except DashboardError as exc:
        _fail(exc)
    if not UserStore(settings.users_db).users():
        typer.echo(
            f"no dashboard account yet in {settings.users_db}: create one with "
            f"`fedfew users add --role clinician --users-db {settings.users_db}` (or "
            "administrator, it)",
            err=True,
        )
    typer.echo(f"dashboard on http://{host}:{port} (registry {settings.registry})")
    code = subprocess.call(streamlit_command(port=port, host=host), env=env)
    if code:
        raise typer.Exit(code)
