"""Fixtures for the federation unit tests: a small model, a site's data and config, and a
loopback Grid that hands Messages to the real ClientApp handler in this process."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from federation.server_app import initial_state
from federation.server_config import ServerConfig
from models.synthetic import write_synthetic_npz


@pytest.fixture(autouse=True)
def task_identity():
    """What Flower's runtime sets before any Message is built in a process."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    """Two sites, a tiny network and 2 local steps: seconds per round on 2 cores."""
    return ServerConfig(
        federation="unit",
        num_rounds=2,
        min_nodes=2,
        min_replies=2,
        node_wait=5,
        round_timeout=5,
        max_retries=1,
        local_steps=2,
        episodes=2,
        width=8,
        image_size=32,
        eval_episodes=5,
        workdir=str(tmp_path / "server"),
        seed=0,
    )


@pytest.fixture
def global_state(server_config: ServerConfig):
    return initial_state(server_config)


def make_site(root: Path, site: str, *, cap: float = 8.0, seed: int = 1) -> dict[str, object]:
    """A site's node config (as --node-config would give it) with its own synthetic data."""
    folder = root / site
    folder.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_npz(folder / "data.npz", n_classes=4, per_class=10, seed=seed)
    return {
        "site-id": site,
        "data": str(data),
        "ledger": str(folder / "ledger.db"),
        "registry": str(folder / "registry"),
        "budget-epsilon": cap,
        "budget-delta": 1e-5,
    }


Handler = Callable[[Message], Message | None]


class LoopbackGrid(Grid):
    """Routes each Message to a handler in this process; ``None`` from a handler is a node that
    never answers (dead). The real transport is tested in tests/e2e."""

    def __init__(self, handlers: dict[int, Handler]) -> None:
        self.handlers = handlers
        self.sent: list[Message] = []

    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Unused by the loop under test."""

    @property
    def run(self):  # type: ignore[override]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.handlers[msg.metadata.dst_node_id](msg)
            if reply is not None:
                replies.append(reply)
        return replies
