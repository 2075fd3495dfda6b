"""A tiny Flower app for deployment tests: each SuperNode answers with its `site-id`.

The ServerApp waits until `expected-nodes` SuperNodes are connected, sends each one query, and
writes what came back to the JSON file named by the run config key `result-path`. It is copied
into the test's app folder (tests/ is not an installed package), so it imports only Flower.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

RECORD = "echo"
CONFIG_FILE = "config-file"  # the one --node-config key `fedfew node run` passes
SITE_ID = "site-id"

serverapp = ServerApp()
clientapp = ClientApp()


@clientapp.query()
def answer(message: Message, context: Context) -> Message:
    """Reply with this node's `site-id` from the node.toml that `fedfew node init` wrote."""
    path = Path(str(context.node_config[CONFIG_FILE]))
    site = str(tomllib.loads(path.read_text(encoding="utf-8"))["node"][SITE_ID])
    reply = RecordDict({RECORD: ConfigRecord({SITE_ID: site})})
    return Message(reply, reply_to=message)


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """Query every connected node once and write the replies to `result-path`."""
    expected = int(context.run_config["expected-nodes"])
    deadline = time.monotonic() + float(context.run_config["wait-timeout"])
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        node_ids = sorted(grid.get_node_ids())
    messages = [
        Message(
            RecordDict({RECORD: ConfigRecord({})}), dst_node_id=node, message_type=MessageType.QUERY
        )
        for node in node_ids
    ]
    replies = grid.send_and_receive(messages, timeout=float(context.run_config["wait-timeout"]))
    answers = {}
    errors = {}
    for reply in replies:
        source = str(reply.metadata.src_node_id)
        if reply.has_error():
            errors[source] = reply.error.reason
        else:
            answers[source] = str(reply.content.config_records[RECORD][SITE_ID])
    result = {
        "node_ids": [str(node) for node in node_ids],
        # Again after the replies, seconds later: a node let in late would show up here.
        "node_ids_after": [str(node) for node in sorted(grid.get_node_ids())],
        "answers": answers,
        "errors": errors,
    }
    Path(str(context.run_config["result-path"])).write_text(json.dumps(result), encoding="utf-8")
