"""An in-process Grid: hands each Message to a ClientApp handler in this process.

Used where the transport is not what is measured (unit tests of the round loop, the accuracy
benchmark): the ServerApp's round loop and the ClientApp handler are the real ones, only the
SuperLink/SuperNode hop is skipped. The real deployment is tested in tests/e2e.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message], Message | None]


def set_task_identity(*, run_id: int = 1, node_id: int = 0) -> None:
    """Set what Flower's runtime sets before Messages are built in a process."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, node_id


class InProcessGrid(Grid):
    """Routes each Message to ``handlers[dst_node_id]``; a handler returning ``None`` is a node
    that never answers (dead)."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.sent: list[Message] = []

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Not needed in process."""

    @property
    def run(self) -> Any:
        """Not needed in process."""
        raise NotImplementedError("InProcessGrid has no Run")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Not needed in process (build Messages directly)."""
        raise NotImplementedError("build Messages with flwr.app.Message")

    def get_node_ids(self) -> Iterable[int]:
        """The handlers' node ids."""
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not needed in process (use send_and_receive)."""
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not needed in process (use send_and_receive)."""
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Call each destination's handler in turn with its own copy of the message (as the wire
        would give it: Flower's SecAgg+ workflow sends one content object to every node, and
        its mod edits what it receives); collect the replies that came."""
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.handlers[msg.metadata.dst_node_id](copy.deepcopy(msg))
            if reply is not None:
                replies.append(reply)
        return replies
