"""Grids that wrap the one Flower hands the ServerApp.

Flower's ``Grid.send_and_receive`` sleeps 3 s between pulls of the replies, so a round ends on
average 1.5 s after its last reply arrives (framework overhead in bench/federation_cost.py). A
pull is one small request to the SuperLink: :class:`PollingGrid` pulls every :data:`POLL_S`
seconds instead, with Flower's semantics otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

POLL_S = 0.25  # between pulls of the replies not yet in


class DelegatingGrid(Grid):
    """Delegates every call to ``grid``; subclasses change what they need."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Delegated."""
        self.grid.set_run(run_id)  # type: ignore[arg-type]

    @property
    def run(self) -> Any:
        """Delegated."""
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Delegated."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Delegated."""
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegated."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegated."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegated."""
        return self.grid.send_and_receive(messages, timeout=timeout)


class PollingGrid(DelegatingGrid):
    """A SuperLink's grid whose ``send_and_receive`` pulls replies every :data:`POLL_S` s."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all are in or ``timeout`` seconds
        pass (none: until all are in)."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(POLL_S)
        return replies
