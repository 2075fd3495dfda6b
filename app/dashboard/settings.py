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
)

# A clinical shift: long enough not to interrupt work, short enough that a left-open browser
# on a shared ward computer does not stay logged in overnight.
DEFAULT_SESSION_HOURS = 8.0
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

    def __post_init__(self) -> None:
        if not self.session_hours > 0:
            raise SettingsError(
                f"{ENV_SESSION_HOURS} must be a number of hours > 0, got {self.session_hours!r}"
            )


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


def load_settings(environ: dict[str, str] | None = None) -> DashboardSettings:
    """Read the settings from the environment (``os.environ`` by default).

    Raises:
        SettingsError: a malformed value; the message names the variable.
    """
    env = dict(os.environ if environ is None else environ)
    home = Path(env.get(ENV_HOME) or Path.home() / ".fedfew").expanduser()
    hours_text = env.get(ENV_SESSION_HOURS) or str(DEFAULT_SESSION_HOURS)
    try:
        hours = float(hours_text)
    except ValueError:
        raise SettingsError(
            f"{ENV_SESSION_HOURS} must be a number of hours, got {hours_text!r}"
        ) from None
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
    )
