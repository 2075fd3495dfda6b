"""Flower ClientApp: a thin adapter from Messages to :func:`federation.node.run_round`.

A refusal (policy, budget) or unusable data becomes an error reply that names the reason; nothing
computed from the data is in it.
"""

from __future__ import annotations

import json
import time

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from federation.node import run_round
from federation.node_config import NodeConfig
from federation.plan import RoundPlan
from federation.records import DELTA, MODEL, PLAN, REPORT, from_arrays, from_config, to_arrays
from federation.records import to_config as config_record
from models.errors import FedfewError

REFUSED = 1001  # error code of a reply that refuses the round (reason in the message)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Check the plan, charge the ledger, train with DP, reply with the delta."""
    started = time.perf_counter()
    try:
        config = NodeConfig.from_mapping(context.node_config)
        if MODEL not in msg.content.array_records or PLAN not in msg.content.config_records:
            return Message(Error(REFUSED, "message lacks the model or the plan"), reply_to=msg)
        plan = RoundPlan.from_config(from_config(msg.content.config_records[PLAN]))
        reply = run_round(
            config,
            plan,
            from_arrays(msg.content.array_records[MODEL]),
            requester=f"flower run {context.run_id} node {context.node_id}",
        )
    except (FedfewError, ValueError, OSError, RuntimeError) as exc:
        return Message(Error(REFUSED, f"{type(exc).__name__}: {exc}"), reply_to=msg)
    _log_compute_time(config, plan.round, time.perf_counter() - started)
    content = RecordDict({DELTA: to_arrays(reply.delta), REPORT: config_record(reply.report)})
    return Message(content, reply_to=msg)


def _log_compute_time(config: NodeConfig, server_round: int, seconds: float) -> None:
    """Kept on the node's disk (for the benchmark), never sent: timing can depend on data."""
    path = config.replies_dir.parent / "compute-times.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"round": server_round, "seconds": seconds, "time": time.time()}) + "\n")
