"""The server's side of a secure round: Flower's SecAgg+ workflow driven from this project's
round loop, then the gate on the unmasked sum.

Flower 1.42 runs SecAgg+ only on its legacy workflow API: ``SecAggPlusWorkflow.__call__``
requires a ``LegacyContext`` whose ``strategy`` is a legacy ``flwr.server.strategy.Strategy``
(``configure_fit`` returning ``(ClientProxy, FitIns)`` pairs, ``aggregate_fit`` receiving the
unmasked result as ``FitRes.parameters``). This module adapts to that without handing the round
loop to Flower's ``DefaultWorkflow`` (which has no quorum, retries, checkpoints or gate):

- :class:`_Collector` is the legacy strategy: one ``FitIns`` (the global model's arrays and the
  round plan) per connected node, and an ``aggregate_fit`` that only keeps what it is given;
- :class:`_WatchedGrid` records, per stage, which nodes answered with an error (its public
  reason code only) or not at all, because the workflow keeps its failures to itself;
- :class:`PrunedSecAggPlusWorkflow` forgets nodes that never shared their keys. Flower's
  ``unmask_stage`` asks every neighbour for key shares of every node that dropped, including
  one that dropped before it shared any (a node that refuses at setup); the neighbours hold no
  such share and the round fails. Such a node's masks were never added to anything, so removing
  it from the neighbour sets is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from federation.errors import InvalidUpdateError, QuorumError
from federation.polling_grid import DelegatingGrid
from federation.reasons import reason_of
from federation.records import State, to_arrays
from federation.secure_aggregation import MODULUS_RANGE, SumGate, gate_sum
from federation.secure_node import fit_instructions
from federation.strategy import LOGGER_NAME, GatedStrategy, check_head
from privacy.errors import LedgerSignatureError, ReportFormatError
from privacy.site_report import SitePrivacyReport

logger = logging.getLogger(LOGGER_NAME)

STAGES = ("setup", "share keys", "masked vectors", "unmask")


@dataclass(frozen=True)
class SecureReply:
    """One contributor to an unmasked sum: its node and its (public) privacy report."""

    node_id: int
    site_id: str
    report: SitePrivacyReport


@dataclass(frozen=True)
class SecureRound:
    """A secure round that passed the sum gate."""

    gate: SumGate
    replies: dict[int, SecureReply]
    problems: list[str]
    attempts: int
    received_bytes: int  # every stage's replies in the accepted attempt, all nodes together


def content_bytes(content: RecordDict) -> int:
    """Bytes of a reply's arrays and config values (lists of bytes included)."""
    total = sum(r.count_bytes() for r in content.array_records.values())
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


class _Collector(LegacyStrategy):
    """The legacy strategy SecAgg+ calls: hands out the round's FitIns, keeps the result."""

    def __init__(self, grid: Grid, fitins: FitIns, nodes: Iterable[int]) -> None:
        self.proxies = [GridClientProxy(node_id=n, grid=grid, run_id=0) for n in nodes]
        self.fitins = fitins
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Not used: the round loop owns the model."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every connected node, with the same instructions."""
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Keep the results (each carries the unmasked mean and its node's report)."""
        self.results = results
        return None, {}

    def configure_evaluate(self, *args: Any, **kwargs: Any) -> list[Any]:
        """No evaluation on hospital data."""
        return []

    def aggregate_evaluate(self, *args: Any, **kwargs: Any) -> tuple[None, dict[str, Any]]:
        """Nothing to aggregate."""
        return None, {}

    def evaluate(self, *args: Any, **kwargs: Any) -> None:
        """The round loop evaluates on the public set itself."""
        return None


class _WatchedGrid(DelegatingGrid):
    """Delegates to ``grid``; records error replies (reason codes) and silent nodes."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.problems: list[str] = []
        self.stage = 0
        self.received_bytes = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Delegated; then notes who failed or stayed silent in this stage."""
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        stage = STAGES[min(self.stage, len(STAGES) - 1)]
        answered = {m.metadata.src_node_id for m in replies}
        for msg in replies:
            if msg.has_error():
                reason = reason_of(msg.error).value
                self.problems.append(f"node {msg.metadata.src_node_id} ({stage}): {reason}")
            else:
                self.received_bytes += content_bytes(msg.content)
        for msg in sent:
            if msg.metadata.dst_node_id not in answered:
                self.problems.append(f"node {msg.metadata.dst_node_id} ({stage}): no reply")
        self.stage += 1
        return replies


class PrunedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, forgetting nodes that dropped before sharing their keys."""

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's stage, then drop the nodes whose key shares nobody holds."""
        if not super().share_keys_stage(grid, context, state):
            return False
        gone = state.sampled_node_ids - state.active_node_ids
        if gone:
            state.sampled_node_ids = set(state.active_node_ids)
            for node in state.active_node_ids:
                state.nid_to_neighbours[node] -= gone
        return self._check_threshold(state)


def secure_attempt(
    grid: Grid, strategy: GatedStrategy, state: State, server_round: int
) -> tuple[SecureRound | None, list[str]]:
    """One run of SecAgg+ over every connected node, and the gate on its sum.

    Returns:
        The accepted round (``None`` when the protocol halted or the sum was rejected), and
        every problem seen (public reason codes, silences, the gate's finding).
    """
    plan = strategy.round_plan(server_round)
    values = sum(int(a.size) for a in state.values())
    clipping_range, _ = plan.secure_ranges(contributors=plan.secagg.min_sites, values=values)
    nodes = list(grid.get_node_ids())
    watched = _WatchedGrid(grid)
    collector = _Collector(watched, fit_instructions(state, plan.to_config()), nodes)
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=collector)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: server_round}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = to_arrays(state)
    PrunedSecAggPlusWorkflow(
        num_shares=1.0,  # every node is every node's neighbour (federations are small)
        reconstruction_threshold=plan.secagg.min_sites,
        max_weight=1.0,  # every contribution counts once: the sum, not a weighted mean
        clipping_range=clipping_range,
        quantization_range=plan.secagg.quantization_range,
        modulus_range=MODULUS_RANGE,
        timeout=strategy.config.round_timeout,
    )(watched, context)
    problems = list(watched.problems)
    if not collector.results:
        problems.append(
            f"SecAgg+ halted: fewer than {plan.secagg.min_sites} nodes took part in a stage; "
            "no sum was revealed"
        )
        return None, problems
    replies: dict[int, SecureReply] = {}
    for proxy, fitres in collector.results:
        try:
            report = check_head(
                SitePrivacyReport.from_dict(dict(fitres.metrics)), keys_dir=strategy.keys_dir
            )
        except (ReportFormatError, LedgerSignatureError) as exc:
            problems.append(f"node {proxy.node_id}: report rejected: {exc}")
            continue
        replies[proxy.node_id] = SecureReply(proxy.node_id, report.site, report)
    mean_arrays = parameters_to_ndarrays(collector.results[0][1].parameters)
    if len(mean_arrays) != len(state):
        problems.append(f"the unmasked sum has {len(mean_arrays)} arrays, not {len(state)}")
        return None, problems
    contributors = len(collector.results)
    _, bound = plan.secure_ranges(contributors=contributors, values=values)
    try:
        gate = gate_sum(
            dict(zip(state, mean_arrays, strict=True)),
            state,
            contributors=contributors,
            secagg=plan.secagg,
            bound=bound,
        )
    except InvalidUpdateError as exc:
        problems.append(str(exc))
        return None, problems
    return SecureRound(gate, replies, problems, 1, watched.received_bytes), problems


def collect_secure_round(
    grid: Grid, strategy: GatedStrategy, state: State, server_round: int
) -> SecureRound:
    """Run SecAgg+ until a sum of at least ``min-replies`` contributors passes the gate.

    A retry runs the whole protocol again with every connected node (a sum cannot be combined
    across attempts); each node replays its stored delta, so nothing is charged twice.

    Raises:
        QuorumError: no attempt gave an accepted sum after ``max_retries`` retries.
    """
    config = strategy.config
    problems: list[str] = []
    for attempt in range(1, config.max_retries + 2):
        accepted, seen = secure_attempt(grid, strategy, state, server_round)
        problems += seen
        for line in seen:
            logger.warning("round %d attempt %d: %s", server_round, attempt, line)
        if accepted is not None and accepted.gate.contributors >= config.min_replies:
            if any(r.report.weight != 1.0 for r in accepted.replies.values()):
                logger.warning("secure round: site weights are not applied (unweighted sum)")
            return SecureRound(
                accepted.gate, accepted.replies, problems, attempt, accepted.received_bytes
            )
    raise QuorumError(
        f"round {server_round}: no secure sum of at least {config.min_replies} sites passed "
        f"the gate after {config.max_retries + 1} attempts; the last good model (round "
        f"{server_round - 1}) is kept in the checkpoint. Problems: " + "; ".join(problems[-6:])
    )
