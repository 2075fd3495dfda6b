"""Work that survives a reload: login sessions kept on the server, and each session's draft (the
clinician's condition, class names and uploaded cases).

A browser reload starts a new Streamlit session with empty state. So a login also creates a
server-side session row, found again by a random token that the dashboard keeps in the page URL
(``?session=...``). Only the token's SHA-256 is stored, so a copy of the database cannot be used
to log in; and a session resumes only for the client address that logged in, so a URL pasted
into a message to a colleague does not log the colleague in as its author. The draft belongs to
that session row: it is deleted at logout, and with the session when it expires, so uploaded
images never outlive the login that brought them.
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

TOKEN_BYTES = 32  # 256 bits: not guessable, and short enough for a URL
QUERY_PARAM = "session"  # the URL's query parameter holding the token

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
    """CREATE TABLE IF NOT EXISTS draft_uploads (
        token_hash TEXT NOT NULL,
        slot TEXT NOT NULL,
        position INTEGER NOT NULL,
        name TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (token_hash, slot, position)
    )""",
)


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
            self.path, what="session database", schema=_SCHEMA, unreadable_hint="; log in again"
        )

    def create(self, session: Session, *, client: str = "") -> str:
        """Store ``session`` for ``client`` (the browser's address) and return its new token (to
        put in the URL)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with self._connect() as conn:
            self._purge_expired(conn)
            conn.execute(
                "INSERT INTO web_sessions "
                "(token_hash, username, roles, expires_at, source, client) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    _digest(token),
                    session.username,
                    json.dumps(list(session.roles)),
                    session.expires_at,
                    session.source,
                    client,
                ),
            )
        return token

    def resume(self, token: str, *, client: str = "", now: float | None = None) -> Session | None:
        """The live session of ``token`` for ``client``; None for an unknown token, another
        client's, or an expired one (which is deleted with its draft)."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            row = conn.execute(
                "SELECT username, roles, expires_at, source, client FROM web_sessions "
                "WHERE token_hash = ?",
                (_digest(token),),
            ).fetchone()
            if row is None:
                return None
            username, roles, expires_at, source, owner = row
            if owner != client:
                return None
            if now >= expires_at:
                self._delete(conn, _digest(token))
                return None
        return Session(
            username=username,
            roles=tuple(json.loads(roles)),
            expires_at=float(expires_at),
            source=source,
        )

    def end(self, token: str) -> None:
        """Log the session out: forget it and its draft."""
        with self._connect() as conn:
            self._delete(conn, _digest(token))

    def end_user(self, username: str) -> int:
        """End every session of ``username`` (an account disabled or reset); returns how many."""
        with self._connect() as conn:
            hashes = [
                r[0]
                for r in conn.execute(
                    "SELECT token_hash FROM web_sessions WHERE username = ?", (username,)
                )
            ]
            for token_hash in hashes:
                self._delete(conn, token_hash)
        return len(hashes)

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
    def _delete(conn: sqlite3.Connection, token_hash: str) -> None:
        for table in ("web_sessions", "drafts", "draft_uploads", "audited"):
            conn.execute(f"DELETE FROM {table} WHERE token_hash = ?", (token_hash,))

    def _purge_expired(self, conn: sqlite3.Connection) -> None:
        expired = [
            r[0]
            for r in conn.execute(
                "SELECT token_hash FROM web_sessions WHERE expires_at <= ?", (time.time(),)
            )
        ]
        for token_hash in expired:
            self._delete(conn, token_hash)


def draft_of(fields: Mapping[str, object], uploads: Mapping[str, Sequence[Upload]]) -> Draft:
    """A draft of text widget values (non-strings are left out) and uploads per slot."""
    return Draft(
        fields={k: v for k, v in fields.items() if isinstance(v, str)},
        uploads={k: list(v) for k, v in uploads.items() if v},
    )
