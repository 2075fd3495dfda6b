"""A long adaptation run in a background thread, so the page can show its progress and a Cancel
button while it works.

The worker never touches Streamlit (it has no script context): it only updates this object, which
the page reads on each rerun. Cancelling sets an event that the progress callback checks at every
step of the adaptation; the callback then raises :class:`AdaptationCancelled`, which unwinds the
work before any result exists, so a cancelled run leaves nothing half done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from app.dashboard.errors import AdaptationCancelled, unexpected_failure
from models.errors import FedfewError

LOG = logging.getLogger(__name__)
T = TypeVar("T")
ProgressFn = Callable[[float, str], None]
Work = Callable[[ProgressFn], T]


class Job(Generic[T]):
    """One piece of work in a daemon thread, with progress, cancel, result or error message."""

    def __init__(self, work: Work[T], *, what: str) -> None:
        self.what = what  # e.g. "adaptation (finetune)", for messages and the log
        self.fraction = 0.0
        self.text = "starting"
        self.result: T | None = None
        self.error = ""  # a message for the user ("" when none)
        self.cancelled = False
        self.started = time.perf_counter()
        self.seconds: float | None = None  # wall time of a finished run
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _progress(self, fraction: float, text: str) -> None:
        if self._cancel.is_set():
            raise AdaptationCancelled(f"{self.what} cancelled")
        with self._lock:
            self.fraction = min(max(fraction, 0.0), 1.0)
            self.text = text

    def _run(self, work: Work[T]) -> None:
        try:
            result = work(self._progress)
        except AdaptationCancelled:
            self.cancelled = True
        except FedfewError as exc:  # a typed error: its message says what to do
            self.error = str(exc)
        except Exception:  # a bug: the trace goes to the server log, plain words to the user
            LOG.exception("%s failed", self.what)
            self.error = unexpected_failure(self.what)
        else:
            self.seconds = time.perf_counter() - self.started
            self.result = result

    def cancel(self) -> None:
        """Ask the work to stop at its next step (a button's callback)."""
        self._cancel.set()

    @property
    def cancelling(self) -> bool:
        """Whether Cancel was pressed and the work has not stopped yet."""
        return self._cancel.is_set() and self.running

    @property
    def running(self) -> bool:
        """Whether the work is still going."""
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the work to end; whether it has."""
        self._thread.join(timeout)
        return not self.running

    def progress(self) -> tuple[float, str]:
        """The latest (fraction done, what is happening)."""
        with self._lock:
            return self.fraction, self.text
