"""Where the dashboard's files are: environment variables, set by ``fedfew dashboard`` options.

One place reads them (this module); pages receive a :class:`DashboardSettings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from app.dashboard.errors import SettingsError

ENV_HOME = "FEDFEW_HOME"  # default folder of everything below: ~/.fedfew
ENV_REGISTRY = "FEDFEW_REGISTRY"  # this node's model registry (global models and adapters)
ENV_LEDGERS = "FEDFEW_LEDGERS"  # one or more ledger files, separated by os.pathsep or commas
ENV_USERS_DB = "FEDFEW_USERS_DB"  # the dashboard's SQLite database of local accounts
ENV_FEDERATION_STATUS = "FEDFEW_FEDERATION_STATUS"  # JSON written by the federation, optional
ENV_SUPERLINK = "FEDFEW_SUPERLINK"  # host:port of the Flower SuperLink, optional
ENV_SESSION_HOURS = "FEDFEW_SESSION_HOURS"  # login lifetime
# Folders the "Prepare for a new modality" page may read unlabelled studies from (os.pathsep or
# commas); unset: none (the page then takes studies from the archive or uploads only).
ENV_DATA_ROOTS = "FEDFEW_DATA_ROOTS"
ENV_DICOMWEB = "FEDFEW_DICOMWEB"  # the image archive's DICOMweb root URL, optional
ENV_SITE_NAME = "FEDFEW_SITE_NAME"  # the hospital's name, on the login page
ENV_IDLE_MINUTES = "FEDFEW_IDLE_MINUTES"  # minutes without activity before a session ends
# "1": served over plain HTTP to the network on purpose (`--insecure-http`): a banner says so,
# and the session cookie is sent without Secure (a browser drops Secure cookies over HTTP).
ENV_INSECURE_HTTP = "FEDFEW_INSECURE_HTTP"
ENV_OIDC_CONFIG = "FEDFEW_OIDC_CONFIG"  # the hospital sign-in's config file (app/dashboard/oidc.py)
ENV_VARS = (
    ENV_HOME,
    ENV_REGISTRY,
    ENV_LEDGERS,
    ENV_USERS_DB,
    ENV_FEDERATION_STATUS,
    ENV_SUPERLINK,
    ENV_SESSION_HOURS,
    ENV_DATA_ROOTS,
    ENV_DICOMWEB,
    ENV_SITE_NAME,
    ENV_IDLE_MINUTES,
    ENV_INSECURE_HTTP,
    ENV_OIDC_CONFIG,
)

# A clinical shift: long enough not to interrupt work, short enough that a left-open browser
# on a shared ward computer does not stay logged in overnight.
DEFAULT_SESSION_HOURS = 8.0
# A walk-away workstation: 15 minutes without a click ends the session (the common hospital
# screen-lock time; HIPAA's automatic logoff leaves the value to the site).
DEFAULT_IDLE_MINUTES = 15.0
# Streamlit's upload cap in MB, the same as the input guard's file limit (GuardConfig: 50 MB).
MAX_UPLOAD_MB = 50
SUPERLINK_TIMEOUT_S = 1.0  # a LAN connect answers in milliseconds; do not hang the page


@dataclass(frozen=True)
class DashboardSettings:
    """The dashboard's resolved configuration."""

    registry: Path
    ledgers: tuple[Path, ...]
    users_db: Path
    federation_status: Path | None
    superlink: tuple[str, int] | None
    session_hours: float = DEFAULT_SESSION_HOURS
    data_roots: tuple[Path, ...] = ()  # empty: no folder may be read
    dicomweb: str | None = None  # the archive's DICOMweb root; None: no archive
    site_name: str = ""  # the hospital's name ("": the login page names no site)
    idle_minutes: float = DEFAULT_IDLE_MINUTES
    insecure_http: bool = False  # plain HTTP to the network, chosen with --insecure-http
    oidc_config: Path | None = None  # the hospital sign-in (None: local accounts only)

    def __post_init__(self) -> None:
        if not self.session_hours > 0:
            raise SettingsError(
                f"{ENV_SESSION_HOURS} must be a number of hours > 0, got {self.session_hours!r}"
            )
        if not self.idle_minutes > 0:
            raise SettingsError(
                f"{ENV_IDLE_MINUTES} must be a number of minutes > 0, got {self.idle_minutes!r}"
            )

    @property
    def idle_s(self) -> float:
        """The idle timeout in seconds."""
        return self.idle_minutes * 60.0


def parse_superlink(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6).

    Raises:
        SettingsError: no port, or a port outside 1..65535.
    """
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(
            f"{ENV_SUPERLINK} must be host:port with a port in 1..65535, got {value!r}"
        )
    return host, int(port)


def parse_ledgers(value: str) -> tuple[Path, ...]:
    """Ledger paths separated by ``os.pathsep`` or commas; empty parts are ignored."""
    parts = value.replace(",", os.pathsep).split(os.pathsep)
    return tuple(Path(p.strip()).expanduser() for p in parts if p.strip())


def _number(env: dict[str, str], name: str, default: float, unit: str) -> float:
    text = env.get(name) or str(default)
    try:
        return float(text)
    except ValueError:
        raise SettingsError(f"{name} must be a number of {unit}, got {text!r}") from None


def load_settings(environ: dict[str, str] | None = None) -> DashboardSettings:
    """Read the settings from the environment (``os.environ`` by default).

    Raises:
        SettingsError: a malformed value; the message names the variable.
    """
    env = dict(os.environ if environ is None else environ)
    home = Path(env.get(ENV_HOME) or Path.home() / ".fedfew").expanduser()
    hours = _number(env, ENV_SESSION_HOURS, DEFAULT_SESSION_HOURS, "hours")
    status = env.get(ENV_FEDERATION_STATUS)
    superlink = env.get(ENV_SUPERLINK)
    return DashboardSettings(
        registry=Path(env.get(ENV_REGISTRY) or home / "registry").expanduser(),
        ledgers=parse_ledgers(env.get(ENV_LEDGERS, "")),
        users_db=Path(env.get(ENV_USERS_DB) or home / "dashboard.sqlite").expanduser(),
        federation_status=Path(status).expanduser() if status else None,
        superlink=parse_superlink(superlink) if superlink else None,
        session_hours=hours,
        data_roots=parse_ledgers(env.get(ENV_DATA_ROOTS, "")),
        dicomweb=env.get(ENV_DICOMWEB) or None,
        site_name=(env.get(ENV_SITE_NAME) or "").strip(),
        idle_minutes=_number(env, ENV_IDLE_MINUTES, DEFAULT_IDLE_MINUTES, "minutes"),
        insecure_http=env.get(ENV_INSECURE_HTTP) == "1",
        oidc_config=Path(env[ENV_OIDC_CONFIG]).expanduser() if env.get(ENV_OIDC_CONFIG) else None,
    )
