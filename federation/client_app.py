"""Flower ClientApp: a thin adapter from Messages to :func:`federation.node.run_round`.

A refusal (policy, budget) or a failure becomes an error reply that carries one fixed, public
reason code (:mod:`federation.reasons`) and nothing else; the exception's text and traceback stay
on the node: in its Python log and in ``node-errors.log`` beside the replies it keeps.

Every exception is caught, including unknown ones, which reply ``internal-error``: re-raising
would let Flower build the error reply itself, and Flower puts ``str(exception)`` in it.

Flower starts one ClientApp process per message, so this module imports only Flower and light
modules; the training stack (torch, Opacus, MONAI) is imported by the first message's handling.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from federation.errors import PlanInvalidError, PlanRefusedError
from federation.node_config import NodeConfig
from federation.reasons import ReasonCode, error_for, reason_for
from federation.records import (
    FINAL_MODEL,
    MODEL,
    PLAN,
    PUBLISHED,
    PUBLISHED_METRICS,
    PUBLISHED_PRIVACY,
    PUBLISHED_PROTOTYPES,
    RELEASE,
    REPORT,
    from_arrays,
    from_config,
    to_arrays,
)
from federation.records import to_config as config_record

if TYPE_CHECKING:
    from federation.node import NodeReply, State
    from federation.plan import RoundPlan
    from privacy.prototype_release import PrototypeRelease

# Not a child of Flower's logger: the node's log stays on the node.
logger = logging.getLogger("fedfew.node")
FAILURE_LOG = "node-errors.log"  # beside the node's kept replies, on the node's disk

app = ClientApp()


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ stages through Flower's ``secaggplus_mod`` with this node's checks around
    it (:mod:`federation.secure_node`); a plain round goes straight to :func:`train`.

    Every failure in a stage, Flower's own included, replies a public reason code only.
    """
    from federation import secure_node

    stage = secure_node.stage_of(msg)
    if stage is None:
        return call_next(msg, context)
    config = None
    try:
        from flwr.client.mod import secaggplus_mod

        config = NodeConfig.from_mapping(context.node_config)
        if stage == Stage.SETUP:
            secure_node.check_setup(config, msg)
        elif stage == Stage.UNMASK:
            secure_node.check_unmask(msg, context, config)
        node_config = config
        return secaggplus_mod(
            msg, context, lambda m, c: secure_node.train_masked(m, c, node_config)
        )
    except Exception as exc:  # every failure replies a code; its text stays on the node
        return _failed(msg, config, exc)


def run_round(
    config: NodeConfig, plan: RoundPlan, global_state: State, *, requester: str
) -> NodeReply:
    """:func:`federation.node.run_round`, imported when the first message is handled."""
    from federation.node import run_round as node_run_round

    return node_run_round(config, plan, global_state, requester=requester)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Check the plan, charge the ledger, train with DP, reply with the delta."""
    try:
        config = NodeConfig.from_mapping(context.node_config)
    except Exception as exc:  # every failure replies a code; its text stays on the node
        return _failed(msg, None, exc)
    try:
        return _round(msg, context, config)
    except Exception as exc:
        return _failed(msg, config, exc)


@app.query(FINAL_MODEL)
def keep_final_model(msg: Message, context: Context) -> Message:
    """Keep the federation's final model for this hospital's clinicians; reply an empty
    acknowledgement (nothing computed from the site's data, nothing charged)."""
    config = None
    try:
        config = NodeConfig.from_mapping(context.node_config)
        from federation import node

        published = from_config(msg.content.config_records[PUBLISHED])
        node.keep_final_model(
            config,
            _plan(msg),
            from_arrays(msg.content.array_records[MODEL]),
            privacy=json.loads(str(published[PUBLISHED_PRIVACY])),
            metrics=json.loads(str(published[PUBLISHED_METRICS])),
            prototypes=_release(msg, published),
        )
    except Exception as exc:  # every failure replies a code; its text stays on the node
        return _failed(msg, config, exc)
    return Message(RecordDict(), reply_to=msg)


def _round(msg: Message, context: Context, config: NodeConfig) -> Message:
    started = time.perf_counter()
    plan = _plan(msg)
    if plan.secagg.enabled:  # the reply of a plain message leaves the node unmasked
        raise PlanInvalidError("the plan asks for secure aggregation but the message is plain")
    reply = run_round(
        config,
        plan,
        from_arrays(msg.content.array_records[MODEL]),
        requester=f"flower run {context.run_id} node {context.node_id}",
    )
    _log_compute_time(config, plan.round, time.perf_counter() - started)
    report = config_record(reply.report.to_dict())
    # The mechanism's output under its own key: DELTA, or RELEASE for a one-shot release.
    content = RecordDict({reply.output: to_arrays(reply.arrays), REPORT: report})
    return Message(content, reply_to=msg)


def _release(msg: Message, published: dict[str, object]) -> PrototypeRelease | None:
    """The final round's prototype release, when the server sent one with the model."""
    if PUBLISHED_PROTOTYPES not in published:
        return None
    from privacy.prototype_release import SUMS, PrototypeRelease

    if RELEASE not in msg.content.array_records:
        raise PlanInvalidError("the final model names a prototype release but carries none")
    sums = from_arrays(msg.content.array_records[RELEASE])[SUMS]
    return PrototypeRelease.from_metadata(sums, json.loads(str(published[PUBLISHED_PROTOTYPES])))


def _failed(msg: Message, config: NodeConfig | None, exc: Exception) -> Message:
    reason = reason_for(exc)
    log_failure(config, exc, reason)
    return Message(error_for(reason), reply_to=msg)


def _plan(msg: Message) -> RoundPlan:
    from federation.plan import RoundPlan

    if MODEL not in msg.content.array_records or PLAN not in msg.content.config_records:
        raise PlanInvalidError("message lacks the model or the plan")
    try:
        return RoundPlan.from_config(from_config(msg.content.config_records[PLAN]))
    except PlanRefusedError as exc:  # a plan that does not parse is invalid, not refused
        raise PlanInvalidError(str(exc)) from exc


def failure_log_path(config: NodeConfig) -> Path:
    """The node's own file of failed rounds (detail and traceback; never sent)."""
    return config.replies_dir.parent / FAILURE_LOG


def log_failure(config: NodeConfig | None, exc: BaseException, reason: ReasonCode) -> None:
    """Keep a failure's detail on the node: Python logging, and the failure log when known.

    Expected refusals log a warning; ``internal-error`` logs the traceback as an error.
    """
    if reason is ReasonCode.INTERNAL_ERROR:
        logger.error("round failed (%s): %s", reason.value, exc, exc_info=exc)
    else:
        logger.warning("round refused or failed (%s): %s", reason.value, exc)
    if config is None:  # the node config itself is unreadable: the Python log is all we have
        return
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": reason.value,
        "error": type(exc).__name__,
        "detail": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }
    path = failure_log_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError as write_error:
        logger.error("cannot write the node's failure log %s: %s", path, write_error)


def _log_compute_time(config: NodeConfig, server_round: int, seconds: float) -> None:
    """Kept on the node's disk (for the benchmark), never sent: timing can depend on data."""
    path = config.replies_dir.parent / "compute-times.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"round": server_round, "seconds": seconds, "time": time.time()}) + "\n")
