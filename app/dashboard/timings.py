"""How long each adaptation mode took on this machine: every finished adaptation's wall time is
kept in the dashboard's SQLite file, and the adapt page shows the median and range of past runs
instead of a promise ("a few seconds" was 41 s for a clinician; issue 14).
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from app.dashboard.database import connect

TABLE = "adapt_timings"
SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
    "mode TEXT NOT NULL, cases INTEGER NOT NULL, seconds REAL NOT NULL, at REAL NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_mode ON {TABLE} (mode, at)",
)
RECENT_RUNS = 20  # the last runs of a mode speak for this machine as it is now
SIZE_FACTOR = 2.0  # runs with between half and twice the cases count as "a support set like it"


@dataclass(frozen=True)
class TimingSummary:
    """Wall times of past adaptations of one mode on this machine."""

    mode: str
    runs: int
    median_s: float
    low_s: float
    high_s: float
    fewest_cases: int
    most_cases: int

    def sentence(self) -> str:
        """E.g. ``measured here: median 12 s (8 to 41 s) over 5 runs with 10 to 20 cases``."""
        cases = (
            f"{self.fewest_cases} cases"
            if self.fewest_cases == self.most_cases
            else f"{self.fewest_cases} to {self.most_cases} cases"
        )
        if self.runs == 1:
            return f"measured here once: {seconds_text(self.median_s)} with {cases}"
        return (
            f"measured here: median {seconds_text(self.median_s)} "
            f"({seconds_text(self.low_s)} to {seconds_text(self.high_s)}) over {self.runs} runs "
            f"with {cases}"
        )


NOT_MEASURED = "not measured on this machine yet: the first run will tell"


def seconds_text(seconds: float) -> str:
    """``0.4 s``, ``12 s`` or ``2 min 5 s``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{round(seconds)} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


class TimingLog:
    """The table of adaptation wall times in the dashboard's SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> AbstractContextManager[sqlite3.Connection]:
        return connect(self.path, what="timing log", schema=SCHEMA)

    def record(self, mode: str, *, cases: int, seconds: float) -> None:
        """Keep one finished adaptation's wall time.

        Raises:
            AccountError: the database cannot be written.
        """
        with self._connect() as conn:
            conn.execute(
                f"INSERT INTO {TABLE} (mode, cases, seconds, at) VALUES (?, ?, ?, ?)",
                (mode, int(cases), float(seconds), time.time()),
            )

    def summary(self, mode: str, *, cases: int | None = None) -> TimingSummary | None:
        """Median and range of the last :data:`RECENT_RUNS` runs of ``mode``; with ``cases``,
        of runs with a support set of similar size (within :data:`SIZE_FACTOR`) when there are
        any. None when the mode never ran here.

        Raises:
            AccountError: the database cannot be read.
        """
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT cases, seconds FROM {TABLE} WHERE mode = ? ORDER BY at DESC LIMIT ?",
                (mode, RECENT_RUNS),
            ).fetchall()
        if cases is not None:
            similar = [r for r in rows if cases / SIZE_FACTOR <= r[0] <= cases * SIZE_FACTOR]
            rows = similar or rows
        if not rows:
            return None
        seconds = [float(r[1]) for r in rows]
        sizes = [int(r[0]) for r in rows]
        return TimingSummary(
            mode=mode,
            runs=len(rows),
            median_s=statistics.median(seconds),
            low_s=min(seconds),
            high_s=max(seconds),
            fewest_cases=min(sizes),
            most_cases=max(sizes),
        )

    def sentence(self, mode: str, *, cases: int | None = None) -> str:
        """The summary in words, or that the mode has not run here yet."""
        found = self.summary(mode, cases=cases)
        return found.sentence() if found else NOT_MEASURED
