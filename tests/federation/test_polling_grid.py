"""PollingGrid: Flower's send-and-receive semantics, pulling replies often."""

import dataclasses
import time

from flwr.app import Message, RecordDict

from federation.client_app import app as client_app
from federation.inprocess_grid import InProcessGrid
from federation.polling_grid import POLL_S, PollingGrid
from federation.server_app import run_federation

from .conftest import context, make_site


def echo(msg: Message) -> Message:
    return Message(RecordDict(), reply_to=msg)


def messages(nodes):
    return [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]


class CountingGrid(InProcessGrid):
    """The loopback grid, counting how often replies are pulled."""

    def __init__(self, handlers) -> None:
        super().__init__(handlers)
        self.pulls = 0

    def pull_messages(self, message_ids):
        self.pulls += 1
        return super().pull_messages(message_ids)


def test_every_reply_comes_back_at_once_when_all_nodes_answer(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    inner = CountingGrid({1: echo, 2: echo})
    replies = list(PollingGrid(inner).send_and_receive(messages([1, 2]), timeout=60))
    assert inner.pulls == 1 and slept == []  # one pull, no wait: the replies were all in
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]


def test_a_silent_node_costs_the_timeout_and_the_others_replies_are_kept(monkeypatch):
    clock = [100.0]  # a fake clock: sleeping advances it, so no wall time is measured
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    inner = CountingGrid({1: echo, 2: lambda msg: None})
    replies = list(PollingGrid(inner).send_and_receive(messages([1, 2]), timeout=1.0))
    assert clock[0] >= 101.0  # waited the whole timeout for node 2
    # A pull every POLL_S until the deadline: the first, then one after each sleep.
    assert inner.pulls == round(1.0 / POLL_S) + 1
    assert [r.metadata.src_node_id for r in replies] == [1]


def test_a_federation_through_it_ends_as_through_the_plain_grid(
    tmp_path, server_config, global_state
):
    def run(root, wrap):
        sites = {n: make_site(root, s, seed=n) for n, s in enumerate("ab", start=1)}
        handlers = {n: (lambda m, s=s: client_app(m, context(s))) for n, s in sites.items()}
        config = dataclasses.replace(server_config, workdir=str(root / "server"))
        return run_federation(wrap(InProcessGrid(handlers)), config, global_state)

    plain = run(tmp_path / "plain", lambda grid: grid)
    polled = run(tmp_path / "polled", PollingGrid)
    assert polled.round == plain.round == server_config.num_rounds
    assert [set(r["sites"]) for r in polled.history] == [set(r["sites"]) for r in plain.history]
