"""Opening the dashboard's SQLite files (accounts, sessions and drafts, the audit log) the same way:
create the schema on first use, commit on success, and turn SQLite's failures into one typed,
plain-words error that names the file."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from app.dashboard.errors import AccountError


@contextlib.contextmanager
def connect(
    path: Path,
    *,
    what: str,
    schema: Sequence[str],
    migrate: Callable[[sqlite3.Connection], None] | None = None,
    unreadable_hint: str = "",
) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` inside one transaction, with ``schema`` (and ``migrate``) applied.

    Raises:
        AccountError: the file cannot be opened, or is not a readable database (the message names
            ``what`` and the file, then ``unreadable_hint``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=10)
    except sqlite3.Error as exc:
        raise AccountError(f"cannot open the {what} {path}: {exc}") from exc
    try:
        with conn:
            for statement in schema:
                conn.execute(statement)
            if migrate is not None:
                migrate(conn)
            yield conn
    except sqlite3.DatabaseError as exc:
        raise AccountError(f"the {what} {path} is unreadable: {exc}{unreadable_hint}") from exc
    finally:
        conn.close()
