"""Choices a user made that stay put: the base model, the adapter and the class that pulled
images go to. Kept per user in the dashboard's SQLite file, so a page switch, a reload or the
next login finds them again, and changed only when the user changes them.

A choice is stored as text (a registry version's id, an option's label); the page offers it
again only while it is still among the options.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from app.dashboard.database import connect

# Names of the remembered choices (one per widget that offers them).
BASE_MODEL = "base-model"
ADAPTER = "adapter"
PULL_TARGET = "pull-target"  # + ":" + panel: where pulled archive images go (a class)
T = TypeVar("T")

_SCHEMA = """CREATE TABLE IF NOT EXISTS preferences (
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (user, name)
)"""


class Preferences:
    """Each user's remembered choices (a table in the dashboard's SQLite file)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path, what="preferences database", schema=(_SCHEMA,))

    def get(self, user: str, name: str) -> str | None:
        """The value ``user`` last chose for ``name``, or None."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT value FROM preferences WHERE user = ? AND name = ?", (user, name)
            ).fetchone()
        return None if row is None else str(row[0])

    def set(self, user: str, name: str, value: str) -> None:
        """Remember ``value`` as ``user``'s choice for ``name``."""
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO preferences (user, name, value) VALUES (?, ?, ?) "
                "ON CONFLICT (user, name) DO UPDATE SET value = excluded.value",
                (user, name, value),
            )

    def forget(self, user: str, name: str) -> None:
        """Forget ``user``'s choice for ``name``."""
        with self._connect() as conn:
            conn.execute("DELETE FROM preferences WHERE user = ? AND name = ?", (user, name))


def chosen(
    options: Sequence[T], stored: str | None, *, fallback: Callable[[], T | None] = lambda: None
) -> T | None:
    """The option whose text is ``stored`` (the user's remembered choice) when it is still
    offered, else ``fallback()`` (which may be None: nothing chosen)."""
    if stored is not None:
        for option in options:
            if str(option) == stored:
                return option
    return fallback()
