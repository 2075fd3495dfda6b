"""The Flower app of bench/reply_latency.py: every node answers a query at once; the ServerApp
times exchanges through Flower's grid and through :class:`federation.polling_grid.PollingGrid`,
alternating, and writes the seconds to the run config's ``result-path`` (JSON)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from federation.polling_grid import PollingGrid

serverapp = ServerApp()
clientapp = ClientApp()


@clientapp.query()
def answer(message: Message, context: Context) -> Message:
    """An empty reply, at once: what is timed is the framework, not the node's work."""
    return Message(RecordDict(), reply_to=message)


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """Wait for ``expected-nodes``, then ``exchanges`` pairs of exchanges (one query to every
    node), Flower's grid and the polling grid in turn, the order swapped every pair."""
    config = context.run_config
    deadline = time.monotonic() + float(config["wait-timeout"])
    while len(list(grid.get_node_ids())) < int(config["expected-nodes"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the nodes did not connect in time")
        time.sleep(0.2)
    nodes = sorted(grid.get_node_ids())
    grids = {"flower": grid, "polling": PollingGrid(grid)}
    rows = []
    for pair in range(int(config["exchanges"])):
        order = ["flower", "polling"] if pair % 2 == 0 else ["polling", "flower"]
        for name in order:
            messages = [
                Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
            ]
            began = time.perf_counter()
            replies = list(grids[name].send_and_receive(messages, timeout=120.0))
            rows.append({"grid": name, "pair": pair, "seconds": time.perf_counter() - began,
                         "replies": len(replies), "nodes": len(nodes)})  # fmt: skip
    Path(str(config["result-path"])).write_text(json.dumps(rows))
