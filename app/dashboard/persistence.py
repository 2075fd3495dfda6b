"""Work that survives a reload: login sessions kept on the server, and each session's draft (the
clinician's condition, class names and uploaded cases).

A browser reload starts a new Streamlit session with empty state. So a sign-in also creates a
server-side session row, found again by a random token that the browser holds in a cookie, never
in the address bar: for a local account the dashboard's own ``fedfew_session`` cookie (HttpOnly,
Secure, SameSite=Strict; set by app/dashboard/web_session.py), for the hospital's sign-in
Streamlit's signed identity cookie (whose value is the token). Only the token's SHA-256 is
stored, so a copy of the database cannot be used to sign in; and a session resumes only for the
client address that signed in. A session ends at its absolute expiry, after ``idle_s`` without
activity, at sign-out, or when its account is disabled; an ended session leaves a tombstone (its
reason) until its absolute expiry, so an identity cookie still in the browser is not taken for a
new sign-in. The draft belongs to the session row and is deleted when the session ends, so
uploaded images never outlive the sign-in that brought them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.dashboard.auth import Session
from app.dashboard.database import connect
from app.dashboard.uploads import Upload

TOKEN_BYTES = 32  # 256 bits: not guessable
# Why a session ended (the ``ended`` column; NULL while it is live).
ENDED_LOGOUT = "signed out"
ENDED_IDLE = "idle"
ENDED_EXPIRED = "expired"
ENDED_DISABLED = "account disabled"
ENDED_REFUSED = "refused"  # a hospital identity with no dashboard role

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS web_sessions (
        token_hash TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        roles TEXT NOT NULL,
        expires_at REAL NOT NULL,
        source TEXT NOT NULL,
        client TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS drafts (
        token_hash TEXT NOT NULL,
        field TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (token_hash, field)
    )""",
    """CREATE TABLE IF NOT EXISTS audited (
        token_hash TEXT NOT NULL,
        adapter TEXT NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (token_hash, adapter, digest)
    )""",
    """CREATE TABLE IF NOT EXISTS identities (
        username TEXT PRIMARY KEY,
        roles TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS draft_uploads (
        token_hash TEXT NOT NULL,
        slot TEXT NOT NULL,
        position INTEGER NOT NULL,
        name TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (token_hash, slot, position)
    )""",
)


# Columns added after the first release: (table, column, declaration) for older databases.
_MIGRATIONS = (
    ("web_sessions", "last_seen", "REAL NOT NULL DEFAULT 0"),
    ("web_sessions", "ended", "TEXT"),
)


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, declaration in _MIGRATIONS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


@dataclass(frozen=True)
class Resumed:
    """What a session token stands for now: a live session, or why there is none."""

    session: Session | None
    ended: str | None = None  # one of the ENDED_* reasons; None with no session: unknown token


def new_token() -> str:
    """A fresh random session token (:data:`TOKEN_BYTES` bytes, URL-safe base64)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class Draft:
    """What a clinician entered and uploaded in one login session."""

    fields: dict[str, str] = field(default_factory=dict)  # widget key -> text
    uploads: dict[str, list[Upload]] = field(default_factory=dict)  # uploader key -> files

    def digest(self) -> str:
        """A fingerprint of the whole draft, so an unchanged draft is not written again."""
        h = hashlib.sha256(json.dumps(self.fields, sort_keys=True).encode("utf-8"))
        for slot in sorted(self.uploads):
            for upload in self.uploads[slot]:
                h.update(f"{slot}|{upload.name}|".encode())
                h.update(hashlib.sha256(upload.data).digest())
        return h.hexdigest()


class SessionStore:
    """Server-side login sessions and their drafts (tables in the dashboard's SQLite file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(
            self.path,
            what="session database",
            schema=_SCHEMA,
            migrate=_migrate,
            unreadable_hint="; sign in again",
        )

    def create(
        self,
        session: Session,
        *,
        client: str = "",
        token: str | None = None,
        ended: str | None = None,
        now: float | None = None,
    ) -> str:
        """Store ``session`` for ``client`` (the browser's address) and return its token (a new
        random one unless ``token`` is given: the identity cookie of a hospital sign-in).
        ``ended`` stores it as already ended (a refused sign-in, remembered so that it is
        recorded once)."""
        token = token or new_token()
        now = time.time() if now is None else now
        with self._connect() as conn:
            self._purge_expired(conn, now)
            conn.execute(
                "INSERT OR REPLACE INTO web_sessions (token_hash, username, roles, expires_at, "
                "source, client, last_seen, ended) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _digest(token),
                    session.username,
                    json.dumps(list(session.roles)),
                    session.expires_at,
                    session.source,
                    client,
                    now,
                    ended,
                ),
            )
        return token

    def resume(
        self,
        token: str,
        *,
        client: str = "",
        idle_s: float | None = None,
        touch: bool = True,
        now: float | None = None,
    ) -> Resumed:
        """What ``token`` stands for, for ``client``: its live session (its idle clock restarted
        when ``touch``), or why it has none. A session past its absolute expiry or ``idle_s``
        seconds without activity is ended here (its draft deleted). Another client's token is
        as good as unknown."""
        now = time.time() if now is None else now
        key = _digest(token)
        with self._connect() as conn:
            row = conn.execute(
                "SELECT username, roles, expires_at, source, client, last_seen, ended "
                "FROM web_sessions WHERE token_hash = ?",
                (key,),
            ).fetchone()
            if row is None or row[4] != client:
                return Resumed(None)
            username, roles, expires_at, source, _, last_seen, ended = row
            if ended is None and now >= expires_at:
                ended = ENDED_EXPIRED
            elif ended is None and idle_s is not None and now - last_seen >= idle_s:
                ended = ENDED_IDLE
            if ended is not None:
                self._end(conn, key, ended)
                return Resumed(None, ended)
            if touch:
                conn.execute(
                    "UPDATE web_sessions SET last_seen = ? WHERE token_hash = ?", (now, key)
                )
        session = Session(
            username=username,
            roles=tuple(json.loads(roles)),
            expires_at=float(expires_at),
            source=source,
        )
        return Resumed(session)

    def idle_for(self, token: str, *, now: float | None = None) -> float | None:
        """Seconds since the session of ``token`` was last active; None when it is not live."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            row = conn.execute(
                "SELECT last_seen FROM web_sessions WHERE token_hash = ? AND ended IS NULL",
                (_digest(token),),
            ).fetchone()
        return None if row is None else max(0.0, now - float(row[0]))

    def touch(self, token: str, *, now: float | None = None) -> None:
        """Restart the idle clock of a live session (activity that reran only part of a page)."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            conn.execute(
                "UPDATE web_sessions SET last_seen = ? WHERE token_hash = ? AND ended IS NULL",
                (now, _digest(token)),
            )

    def end(self, token: str, *, reason: str = ENDED_LOGOUT) -> bool:
        """End the session: forget its draft, keep why it ended until its absolute expiry.
        Returns whether it was live until now."""
        with self._connect() as conn:
            return self._end(conn, _digest(token), reason)

    def end_user(self, username: str, *, reason: str = ENDED_LOGOUT) -> int:
        """End every live session of ``username`` (a sign-out, an account disabled or reset);
        returns how many."""
        with self._connect() as conn:
            hashes = [
                r[0]
                for r in conn.execute(
                    "SELECT token_hash FROM web_sessions WHERE username = ? AND ended IS NULL",
                    (username,),
                )
            ]
            for token_hash in hashes:
                self._end(conn, token_hash, reason)
        return len(hashes)

    def remember_roles(self, username: str, roles: Sequence[str]) -> tuple[str, ...] | None:
        """Store the roles a hospital identity signed in with; returns the roles of its previous
        sign-in (None at the first), so a change can be recorded in the audit log."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT roles FROM identities WHERE username = ?", (username,)
            ).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO identities (username, roles) VALUES (?, ?)",
                (username, json.dumps(list(roles))),
            )
        return None if row is None else tuple(json.loads(row[0]))

    def save_draft(self, token: str, draft: Draft) -> None:
        """Replace the session's draft with ``draft``."""
        key = _digest(token)
        with self._connect() as conn:
            conn.execute("DELETE FROM drafts WHERE token_hash = ?", (key,))
            conn.execute("DELETE FROM draft_uploads WHERE token_hash = ?", (key,))
            conn.executemany(
                "INSERT INTO drafts (token_hash, field, value) VALUES (?, ?, ?)",
                [(key, name, value) for name, value in draft.fields.items()],
            )
            conn.executemany(
                "INSERT INTO draft_uploads (token_hash, slot, position, name, data) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (key, slot, i, u.name, u.data)
                    for slot, uploads in draft.uploads.items()
                    for i, u in enumerate(uploads)
                ],
            )

    def load_draft(self, token: str) -> Draft:
        """The session's draft (empty when none was saved)."""
        key = _digest(token)
        with self._connect() as conn:
            fields = dict(
                conn.execute("SELECT field, value FROM drafts WHERE token_hash = ?", (key,))
            )
            uploads: dict[str, list[Upload]] = {}
            for slot, name, data in conn.execute(
                "SELECT slot, name, data FROM draft_uploads WHERE token_hash = ? "
                "ORDER BY slot, position",
                (key,),
            ):
                uploads.setdefault(slot, []).append(Upload(name=name, data=bytes(data)))
        return Draft(fields=fields, uploads=uploads)

    def audited(self, token: str, *, adapter: str) -> set[str]:
        """Digests of the cases this session has already classified with ``adapter`` (and
        recorded in the audit log): a reload classifies them again without a new audit row."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT digest FROM audited WHERE token_hash = ? AND adapter = ?",
                (_digest(token), adapter),
            ).fetchall()
        return {str(r[0]) for r in rows}

    def mark_audited(self, token: str, *, adapter: str, digests: Sequence[str]) -> None:
        """Remember that this session's classification of ``digests`` with ``adapter`` is in the
        audit log (forgotten with the session)."""
        with self._connect() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO audited (token_hash, adapter, digest) VALUES (?, ?, ?)",
                [(_digest(token), adapter, d) for d in digests],
            )

    @staticmethod
    def _forget_work(conn: sqlite3.Connection, token_hash: str) -> None:
        for table in ("drafts", "draft_uploads", "audited"):
            conn.execute(f"DELETE FROM {table} WHERE token_hash = ?", (token_hash,))

    def _end(self, conn: sqlite3.Connection, token_hash: str, reason: str) -> bool:
        self._forget_work(conn, token_hash)
        changed = conn.execute(
            "UPDATE web_sessions SET ended = ? WHERE token_hash = ? AND ended IS NULL",
            (reason, token_hash),
        ).rowcount
        return changed > 0

    def _purge_expired(self, conn: sqlite3.Connection, now: float) -> None:
        """Past their absolute expiry, sessions and their tombstones go entirely."""
        expired = [
            r[0]
            for r in conn.execute(
                "SELECT token_hash FROM web_sessions WHERE expires_at <= ?", (now,)
            )
        ]
        for token_hash in expired:
            self._forget_work(conn, token_hash)
            conn.execute("DELETE FROM web_sessions WHERE token_hash = ?", (token_hash,))


def draft_of(fields: Mapping[str, object], uploads: Mapping[str, Sequence[Upload]]) -> Draft:
    """A draft of text widget values (non-strings are left out) and uploads per slot."""
    return Draft(
        fields={k: v for k, v in fields.items() if isinstance(v, str)},
        uploads={k: list(v) for k, v in uploads.items() if v},
    )
