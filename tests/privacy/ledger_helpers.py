"""Helpers shared by several test modules."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from privacy.ledger import _entry_hash


def rebuild(path: Path, *, row: int, steps: int) -> None:
    """What someone with write access can do: change a row and recompute the whole chain."""
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM entries ORDER BY id")]
    meta = dict(conn.execute("SELECT * FROM meta").fetchone())
    prev = rows[0]["prev_hash"]
    for r in rows:
        if r["id"] == row:
            r["steps"] = steps
        r["prev_hash"] = prev
        r["hash"] = prev = _entry_hash(r)
        conn.execute(
            "UPDATE entries SET steps = ?, prev_hash = ?, hash = ? WHERE id = ?",
            (r["steps"], r["prev_hash"], r["hash"], r["id"]),
        )
    conn.execute("UPDATE meta SET head_hash = ? WHERE id = 1", (prev,))
    conn.commit()
    conn.close()
    assert meta["row_count"] == len(rows)


def truncate(path: Path, *, keep: int) -> None:
    """Drop the last rows and set the recorded head to the new last row (chain stays valid)."""
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM entries WHERE id > ?", (keep,))
    (last,) = conn.execute("SELECT hash FROM entries WHERE id = ?", (keep,)).fetchone()
    conn.execute("UPDATE meta SET head_hash = ?, row_count = ? WHERE id = 1", (last, keep))
    conn.commit()
    conn.close()
