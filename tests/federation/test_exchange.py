"""PollingGrid: Flower's send-and-receive semantics, pulling replies often."""

import dataclasses
import time

from flwr.app import Message, RecordDict

from federation.client_app import app as client_app
from federation.exchange import POLL_S, PollingGrid
from federation.inprocess import InProcessGrid
from federation.server_app import run_federation

from .conftest import make_site
from .test_client_app import context


def echo(msg: Message) -> Message:
    return Message(RecordDict(), reply_to=msg)


def messages(nodes):
    return [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]


def test_every_reply_comes_back_at_once_when_all_nodes_answer():
    grid = PollingGrid(InProcessGrid({1: echo, 2: echo}))
    began = time.monotonic()
    replies = list(grid.send_and_receive(messages([1, 2]), timeout=60))
    assert time.monotonic() - began < POLL_S
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]


def test_a_silent_node_costs_the_timeout_and_the_others_replies_are_kept():
    grid = PollingGrid(InProcessGrid({1: echo, 2: lambda msg: None}))
    began = time.monotonic()
    replies = list(grid.send_and_receive(messages([1, 2]), timeout=1.0))
    assert 1.0 <= time.monotonic() - began < 1.0 + 2 * POLL_S
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
