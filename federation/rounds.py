"""The server's round loop: quorum within a deadline, retries, a clean stop, atomic checkpoints
and resume. Flower's ``Strategy.start`` has none of these, so the loop is ours; the strategy's
hooks do the per-round work."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from federation.aggregation import apply_update
from federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from federation.errors import QuorumError
from federation.reasons import reason_of
from federation.records import State, to_arrays
from federation.secure_server import collect_secure_round
from federation.strategy import LOGGER_NAME, AcceptedReply, GatedStrategy
from privacy.round_record import (
    TIME_FORMAT,
    FederationStatus,
    PrototypeSummary,
    RoundRecord,
    SecureSum,
)

logger = logging.getLogger(LOGGER_NAME)

# Keeping a model takes a node seconds; a finished federation does not wait a round's deadline
# for a node that went away (it keeps the earlier versions, and a resume delivers again).
DELIVERY_TIMEOUT_S = 120.0
STATUS_FILE = "status.json"  # in the server's work directory

Evaluate = Callable[[State], dict[str, float]]
Publish = Callable[[State, RoundRecord], object]


def wait_for_nodes(grid: Grid, *, count: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Block until ``count`` nodes are connected.

    Raises:
        QuorumError: fewer connected after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise QuorumError(
                f"only {len(nodes)} of the {count} required nodes connected within {timeout:.0f} s;"
                " check that the hospital nodes are running and registered"
            )
        time.sleep(poll)


def collect_round(
    grid: Grid, strategy: GatedStrategy, state: State, server_round: int
) -> tuple[dict[int, AcceptedReply], list[str], int]:
    """Ask the nodes until the quorum of valid replies is met, retrying the missing ones.

    Returns:
        Accepted replies by node, every problem seen, and the number of attempts made.

    Raises:
        QuorumError: still short of the quorum after ``max_retries`` retries.
    """
    config = strategy.config
    accepted: dict[int, AcceptedReply] = {}
    problems: list[str] = []
    arrays = to_arrays(state)
    for attempt in range(1, config.max_retries + 2):
        messages = [
            m
            for m in strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            if m.metadata.dst_node_id not in accepted
        ]
        replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
        answered = {m.metadata.src_node_id for m in replies}
        silent = [
            m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered
        ]
        problems += [f"node {n}: no reply within {config.round_timeout:.0f} s" for n in silent]
        for n in silent:
            logger.warning("round %d: node %d sent no reply in time", server_round, n)
        ok, bad = strategy.gate(replies)
        accepted.update(ok)
        problems += bad
        if len(accepted) >= config.min_replies:
            return accepted, problems, attempt
        logger.warning(
            "round %d attempt %d: %d valid replies, quorum is %d",
            server_round,
            attempt,
            len(accepted),
            config.min_replies,
        )
    raise QuorumError(
        f"round {server_round}: {len(accepted)} valid replies after {config.max_retries + 1} "
        f"attempts, quorum is {config.min_replies}; the last good model (round "
        f"{server_round - 1}) is kept in the checkpoint. Problems: " + "; ".join(problems[-6:])
    )


def run_rounds(
    grid: Grid,
    strategy: GatedStrategy,
    *,
    initial_state: State,
    evaluate: Evaluate,
    publish: Publish,
) -> Checkpoint:
    """Run (or resume) the federation to ``num_rounds``; returns the final checkpoint.

    Raises:
        QuorumError: a round could not reach its quorum; the checkpoint holds the last good round.
    """
    config = strategy.config
    folder = config.root / "checkpoint"
    checkpoint = load_checkpoint(folder, federation=config.federation)
    if checkpoint is None:
        # Round 0 is the initial model, evaluated and published so every later round has a
        # baseline on the same public set.
        record = RoundRecord(
            0, seconds=0.0, bytes_sent_per_node=0, attempts=0, metrics=evaluate(initial_state)
        )
        publish(initial_state, record)
        checkpoint = Checkpoint(config.federation, 0, initial_state, [record.to_dict()])
        save_checkpoint(folder, checkpoint)
    else:
        logger.info("resuming federation %s after round %d", config.federation, checkpoint.round)
    strategy.summary()
    wait_for_nodes(grid, count=config.min_nodes, timeout=config.node_wait)
    for server_round in range(checkpoint.round + 1, config.num_rounds + 1):
        started = time.perf_counter()
        if config.secagg.enabled:
            state, outcome = _secure_round(grid, strategy, checkpoint.state, server_round)
        else:
            accepted, problems, attempts = collect_round(
                grid, strategy, checkpoint.state, server_round
            )
            state = strategy.aggregate(checkpoint.state, accepted.values())
            outcome = _outcome(accepted, problems, attempts)
            release = strategy.prototypes_of(server_round)
            if release is not None:  # public: the plan's vocabulary and the sites summed
                outcome = dataclasses.replace(
                    outcome, prototypes=PrototypeSummary(release.classes, tuple(release.sites))
                )
        collected = time.perf_counter() - started
        metrics = evaluate(state)
        record = dataclasses.replace(
            outcome,
            round=server_round,
            seconds=collected,
            bytes_sent_per_node=to_arrays(checkpoint.state).count_bytes(),
            metrics=metrics,
        )
        publish(state, record)
        checkpoint = Checkpoint(
            config.federation, server_round, state, [*checkpoint.history, record.to_dict()]
        )
        save_checkpoint(folder, checkpoint)
        write_status(config.root / STATUS_FILE, checkpoint, grid)
        logger.info(
            "round %d done in %.1f s: %d sites accepted, %s",
            server_round,
            collected,
            len(record.sites),
            ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
        )
    deliver_final(grid, strategy, checkpoint)
    return checkpoint


def deliver_final(grid: Grid, strategy: GatedStrategy, checkpoint: Checkpoint) -> list[int]:
    """Hand the final model to every connected node, which keeps it for its clinicians.

    A node missing it still has every earlier version; delivery is repeated (and is idempotent
    on the node) when a finished federation is resumed.

    Returns:
        The nodes that confirmed they keep it.
    """
    arrays = to_arrays(checkpoint.state)
    last = RoundRecord.from_dict(checkpoint.history[-1])
    messages = strategy.configure_final(checkpoint.round, arrays, last, grid)
    timeout = min(strategy.config.round_timeout, DELIVERY_TIMEOUT_S)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    kept = [m.metadata.src_node_id for m in replies if not m.has_error()]
    for reply in replies:
        if reply.has_error():  # the public reason code only, as for round replies
            logger.warning(
                "%s did not keep the final model: %s",
                strategy.site_name(reply.metadata.src_node_id),
                reason_of(reply.error).value,
            )
    missing = {m.metadata.dst_node_id for m in messages} - {m.metadata.src_node_id for m in replies}
    for node in sorted(missing):
        logger.warning("%s did not answer the final model's delivery", strategy.site_name(node))
    logger.info("final model (round %d) kept by %d of %d nodes", checkpoint.round, len(kept),
                len(messages))  # fmt: skip
    return kept


def _outcome(accepted: dict[int, AcceptedReply], problems: list[str], attempts: int) -> RoundRecord:
    """What a plain round's replies make of its record (round, time and metrics come after)."""
    return RoundRecord(
        0,
        seconds=0.0,
        bytes_sent_per_node=0,
        attempts=attempts,
        sites={r.site_id: r.report for r in accepted.values()},
        bytes_received={r.site_id: r.bytes for r in accepted.values()},
        clipped=tuple(r.site_id for r in accepted.values() if r.gate.clipped),
        problems=tuple(problems),
    )


def _secure_round(
    grid: Grid, strategy: GatedStrategy, state: State, server_round: int
) -> tuple[State, RoundRecord]:
    """A SecAgg+ round: the next model from the gated mean, and what its replies make of its
    record (round, time and metrics come after).

    Under SecAgg+ the server never sees one site's delta, so there is no per-site byte count
    and no "clipped" list: each node clipped its own delta, and whether it had to is data-
    dependent, so it stays on the node.
    """
    secure = collect_secure_round(grid, strategy, state, server_round)
    update = apply_update(state, secure.gate.mean, server_lr=strategy.config.aggregation.server_lr)
    return update, RoundRecord(
        0,
        seconds=0.0,
        bytes_sent_per_node=0,
        attempts=secure.attempts,
        sites={r.site_id: r.report for r in secure.replies.values()},
        problems=tuple(secure.problems),
        secure_aggregation=SecureSum(
            contributors=secure.gate.contributors,
            sum_norm=secure.gate.norm,
            sum_bound=secure.gate.bound,
            bytes_received=secure.received_bytes,  # all stages, all nodes
        ),
    )


def write_status(path: Path, checkpoint: Checkpoint, grid: Grid) -> None:
    """The federation's status for the IT page and the demo (atomic replace)."""
    FederationStatus(
        federation=checkpoint.federation,
        round=checkpoint.round,
        nodes_connected=len(list(grid.get_node_ids())),
        updated=time.strftime(TIME_FORMAT, time.gmtime()),
        rounds=tuple(RoundRecord.from_dict(r) for r in checkpoint.history),
    ).write(path)
