"""An in-process Grid: hands each Message to a ClientApp handler in this process.

Used where the transport is not what is measured (unit tests of the round loop, the accuracy
benchmark): the ServerApp's round loop and the ClientApp handler are the real ones, only the
SuperLink/SuperNode hop is skipped. The real deployment is tested in tests/e2e.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

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
        self._replies: dict[str, Message] = {}  # pushed message id -> its reply, until pulled

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
        """Give each message an id (as Flower's in-memory grid does) and answer it at once; the
        replies wait for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            reply = self._answer(msg)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that came (each handed out once)."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Answer each message in turn; collect the replies that came."""
        return [reply for msg in messages if (reply := self._answer(msg)) is not None]

    def _answer(self, msg: Message) -> Message | None:
        """The destination's handler on its own copy of the message (as the wire would give it:
        Flower's SecAgg+ workflow sends one content object to every node, and its mod edits
        what it receives)."""
        self.sent.append(msg)
        return self.handlers[msg.metadata.dst_node_id](copy.deepcopy(msg))
