"""Where a classification came from, carried by every export, and the audit log of who
classified what.

The audit log names cases by the SHA-256 of their pixels and file name, never by the name
itself: file names of patient images often hold patient names or record numbers.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from app.dashboard.database import connect

NOTICE = (
    "Decision support only, not a diagnosis; not cleared as a medical device; every result "
    "must be checked by a clinician."
)
ACTION_CLASSIFY = "classify"
ACTION_EXPORT = "export"
# Account events (no adapter, no case): who logged in or failed to, and what administrators did.
ACTION_LOGIN = "login"
ACTION_LOGIN_FAILED = "login failed"
ACTION_LOCKED = "login throttled"  # a client's failures made it wait (see auth.UserStore)
ACTION_LOGOUT = "logout"
ACTION_ROLES_CHANGED = "roles changed"  # a hospital identity's mapped roles differ from last time
ACTION_ACCOUNT_ADDED = "account added"
ACTION_DISABLED = "account disabled"
ACTION_ENABLED = "account enabled"
ACTION_UNLOCKED = "account unlocked"
ACTION_PASSWORD_RESET = "password reset"
AUDIT_LIMIT = 500  # rows the administrator page shows, newest first

_SCHEMA = """CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    user TEXT NOT NULL,
    action TEXT NOT NULL,
    adapter TEXT NOT NULL,
    adapter_version INTEGER,
    base_model TEXT NOT NULL,
    condition TEXT NOT NULL,
    cases INTEGER NOT NULL,
    case_digests TEXT NOT NULL,
    outcomes TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
)"""


def _add_detail(conn: sqlite3.Connection) -> None:
    """Audit logs written before account events had no ``detail`` column."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(audit)")}
    if "detail" not in columns:
        conn.execute("ALTER TABLE audit ADD COLUMN detail TEXT NOT NULL DEFAULT ''")


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Provenance:
    """What produced a set of predictions, written beside them wherever they go."""

    adapter: str  # the registry label, or "unsaved adaptation of this session"
    adapter_version: int | None  # registry id; None when not saved
    base_model: str  # base version label
    base_privacy: str  # its privacy status (epsilon and sites, or "not DP-trained")
    condition: str
    user: str
    time: str
    reliability: str  # the interval sentence (or that it could not be estimated)
    notice: str = NOTICE

    def columns(self) -> dict[str, str]:
        """The provenance as CSV columns (every row carries them, so no row loses its origin)."""
        row = {k: "" if v is None else str(v) for k, v in asdict(self).items()}
        return row


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log."""

    time: str
    user: str
    action: str
    adapter: str
    adapter_version: int | None
    base_model: str
    condition: str
    cases: int
    case_digests: tuple[str, ...]
    outcomes: dict[str, int]  # outcome (class or "uncertain") -> cases
    detail: str = ""  # an account event's account and circumstances

    def row(self) -> dict[str, object]:
        """A table row (digests shortened to 12 hex digits, as git does)."""
        return {
            "time": self.time,
            "user": self.user,
            "action": self.action,
            "adapter": self.adapter,
            "version": self.adapter_version,
            "base model": self.base_model,
            "condition": self.condition,
            "cases": self.cases,
            "outcomes": ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items())),
            "case digests": " ".join(d[:12] for d in self.case_digests),
            "detail": self.detail,
        }


class AuditLog:
    """Append-only log of classifications and exports (a table in the dashboard's SQLite)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path, what="audit log", schema=(_SCHEMA,), migrate=_add_detail)

    def record(
        self,
        provenance: Provenance,
        *,
        action: str,
        case_digests: Sequence[str],
        outcomes: Sequence[str],
    ) -> AuditEntry:
        """Append one entry: who did ``action`` with which adapter on which cases."""
        entry = AuditEntry(
            time=provenance.time,
            user=provenance.user,
            action=action,
            adapter=provenance.adapter,
            adapter_version=provenance.adapter_version,
            base_model=provenance.base_model,
            condition=provenance.condition,
            cases=len(case_digests),
            case_digests=tuple(case_digests),
            outcomes=dict(Counter(outcomes)),
        )
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO audit (time, user, action, adapter, adapter_version, base_model, "
                "condition, cases, case_digests, outcomes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.time,
                    entry.user,
                    entry.action,
                    entry.adapter,
                    entry.adapter_version,
                    entry.base_model,
                    entry.condition,
                    entry.cases,
                    json.dumps(list(entry.case_digests)),
                    json.dumps(entry.outcomes, sort_keys=True),
                ),
            )
        return entry

    def entries(self, *, user: str | None = None, limit: int = AUDIT_LIMIT) -> list[AuditEntry]:
        """The newest ``limit`` entries (of ``user`` only, when given), newest first."""
        if not self.path.is_file():
            return []
        query = (
            "SELECT time, user, action, adapter, adapter_version, base_model, condition, cases, "
            "case_digests, outcomes, detail FROM audit"
        )
        args: tuple[object, ...] = ()
        if user:
            query += " WHERE user = ?"
            args = (user,)
        query += " ORDER BY id DESC LIMIT ?"
        with self._connect() as conn:
            rows = conn.execute(query, (*args, limit)).fetchall()
        return [
            AuditEntry(
                time=when,
                user=who,
                action=action,
                adapter=adapter,
                adapter_version=version,
                base_model=base,
                condition=condition,
                cases=cases,
                case_digests=tuple(json.loads(digests)),
                outcomes=json.loads(outcomes),
                detail=detail,
            )
            for (
                when,
                who,
                action,
                adapter,
                version,
                base,
                condition,
                cases,
                digests,
                outcomes,
                detail,
            ) in rows
        ]

    def record_event(self, *, user: str, action: str, detail: str = "") -> AuditEntry:
        """Append one account event (a login, a failed login, an administrator's change):
        ``user`` did ``action``; ``detail`` names the account acted on and the circumstances
        (never a patient identifier)."""
        entry = AuditEntry(
            time=utc_now(),
            user=user,
            action=action,
            adapter="",
            adapter_version=None,
            base_model="",
            condition="",
            cases=0,
            case_digests=(),
            outcomes={},
            detail=detail,
        )
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO audit (time, user, action, adapter, adapter_version, base_model, "
                "condition, cases, case_digests, outcomes, detail) "
                "VALUES (?, ?, ?, '', NULL, '', '', 0, '[]', '{}', ?)",
                (entry.time, user, action, detail),
            )
        return entry

    def record_export(
        self,
        provenance: Provenance,
        *,
        case_digests: Sequence[str],
        outcomes: Sequence[str],
    ) -> None:
        """Record that results were downloaded (a download button's callback)."""
        self.record(provenance, action=ACTION_EXPORT, case_digests=case_digests, outcomes=outcomes)
