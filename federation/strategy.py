"""The gate every reply passes, as the base of fedfew's Flower strategies.

``GatedStrategy`` sends the round's model and plan, checks each reply's signed privacy report and
its output with the gate of the output's kind, and hands the accepted replies to
:meth:`GatedStrategy.aggregate`. What the federation's mechanism outputs decides the subclass
(:mod:`federation.strategies`): a model delta is averaged (:mod:`federation.delta_strategy`), a
release is summed (:mod:`federation.release_strategy`), as Flower splits its strategies by what
they aggregate."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from federation.errors import InvalidUpdateError
from federation.plan import RoundPlan
from federation.reasons import reason_of
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
    State,
    from_arrays,
    from_config,
    to_arrays,
)
from federation.server_config import ServerConfig
from federation.validation import GateResult
from privacy.errors import LedgerSignatureError, ReportFormatError
from privacy.ledger_head import verify_signature
from privacy.prototype_release import SUMS, PrototypeRelease
from privacy.round_record import RoundRecord
from privacy.site_report import HeadCheck, SitePrivacyReport

# A child of Flower's logger: `flwr run --stream` shows what the ServerApp logs through it.
LOGGER_NAME = "flwr.fedfew"
logger = logging.getLogger(LOGGER_NAME)

REGISTERED_KEYS = "node-keys"  # under the server's workdir: <site>.pub, the keys the operator
# registered with the SuperLink; a site's ledger heads are verified with its key when it is here.
ADAM_REACH = 3.0  # an Adam step moves a coordinate by at most about lr * (1 - b1) / sqrt(1 - b2)


@dataclass(frozen=True)
class AcceptedReply:
    """A reply that passed the gate."""

    node_id: int
    site_id: str
    weight: float
    report: SitePrivacyReport
    gate: GateResult
    bytes: int


def check_head(report: SitePrivacyReport, *, keys_dir: Path) -> SitePrivacyReport:
    """``report`` with its ledger head checked: with the site's registered key when the server
    has it (``keys_dir/<site>.pub``), else with the key the head carries (self-consistency only).

    Raises:
        LedgerSignatureError: a signed head whose signature does not verify.
    """
    if not report.signed:
        return dataclasses.replace(report, head_check=HeadCheck.UNSIGNED.value)
    registered = keys_dir / f"{report.site}.pub"
    if registered.is_file():
        verify_signature(report.head, registered.read_text(encoding="utf-8"))
        return dataclasses.replace(report, head_check=HeadCheck.REGISTERED_KEY.value)
    verify_signature(report.head)
    return dataclasses.replace(report, head_check=HeadCheck.CARRIED_KEY.value)


class GatedStrategy(Strategy, ABC):
    """Send the model and the plan, gate every reply, combine the accepted ones (a subclass
    per output kind: :meth:`check_output` and :meth:`aggregate`)."""

    output: str  # the reply's array record holding the mechanism's output (privacy.mechanisms)

    def __init__(self, config: ServerConfig, reference: State) -> None:
        self.config = config
        self.reference = reference
        self._sites: dict[int, str] = {}  # node id -> site, from accepted replies (for logs)
        self.keys_dir = config.root / REGISTERED_KEYS
        n_params = sum(a.size for a in reference.values())
        self.norm_bound = config.aggregation.update_norm_bound or (
            ADAM_REACH * config.local_lr * config.steps * math.sqrt(n_params)
        )
        self._round = 0  # the round being configured

    @abstractmethod
    def check_output(self, arrays: State) -> GateResult:
        """The gate of this output kind on one reply's arrays.

        Raises:
            InvalidUpdateError: the arrays are rejected (naming why).
        """

    @abstractmethod
    def aggregate(self, state: State, accepted: Iterable[AcceptedReply]) -> State:
        """The next global model from ``state`` and the accepted replies of the current round."""

    def prototypes_of(self, server_round: int) -> PrototypeRelease | None:
        """The release the sites' replies summed to in ``server_round`` (none: not a releasing
        mechanism's round)."""
        return None

    def round_plan(self, server_round: int) -> RoundPlan:
        """The round's plan, with this strategy's delta bound for nodes to clip to (secure
        rounds)."""
        return self.config.round_plan(server_round, norm_bound=self.norm_bound)

    def bound_text(self) -> str:
        """What the gate bounds a reply's length by, for the start-up log."""
        return f"delta norm bound {self.norm_bound:.4g} ({self.config.aggregation.norm_policy})"

    def summary(self) -> None:
        """Log the configuration."""
        logger.info(
            "strategy: %s aggregation%s (defends against: %s), server lr %g, %s, quorum %d",
            self.config.aggregation.rule,
            " of SecAgg+ sums" if self.config.secagg.enabled else "",
            self.config.aggregation.defence,
            self.config.aggregation.server_lr,
            self.bound_text(),
            self.config.min_replies,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The global model and the round's DP plan, to every connected node."""
        self._round = server_round
        plan = ConfigRecord(self.round_plan(server_round).to_config())
        return [
            Message(
                content=RecordDict({MODEL: arrays, PLAN: plan}),
                message_type=MessageType.TRAIN,
                dst_node_id=node_id,
            )
            for node_id in grid.get_node_ids()
        ]

    def configure_final(
        self, server_round: int, arrays: ArrayRecord, record: RoundRecord, grid: Grid
    ) -> list[Message]:
        """The final model (after ``server_round``), with that round's plan (which says how to
        build it), its published record (each site's privacy report and the metrics) and, when
        that round made one, its prototype release, to every connected node: nothing to train,
        nothing to charge."""
        plan = ConfigRecord(self.round_plan(server_round).to_config())
        published: dict[str, ConfigRecordValues] = {
            PUBLISHED_PRIVACY: json.dumps({k: r.to_dict() for k, r in record.sites.items()}),
            PUBLISHED_METRICS: json.dumps(record.metrics),
        }
        content: dict[str, ArrayRecord | ConfigRecord] = {MODEL: arrays, PLAN: plan}
        release = self.prototypes_of(server_round)
        if release is not None:  # public: DP sums and the plan's vocabulary
            published[PUBLISHED_PROTOTYPES] = json.dumps(release.metadata())
            content[RELEASE] = to_arrays({SUMS: release.sums})
        return [
            Message(
                content=RecordDict({**content, PUBLISHED: ConfigRecord(published)}),
                message_type=f"{MessageType.QUERY}.{FINAL_MODEL}",
                dst_node_id=node_id,
            )
            for node_id in grid.get_node_ids()
        ]

    def site_name(self, node: int) -> str:
        """A node as the logs name it: its id, and its site once a reply has said it."""
        return f"node {node}" + (f" ({self._sites[node]})" if node in self._sites else "")

    def gate(self, replies: Iterable[Message]) -> tuple[dict[int, AcceptedReply], list[str]]:
        """Run every reply through the validation gate.

        Returns:
            Accepted replies by node id, and one line per refused or rejected reply.
        """
        accepted: dict[int, AcceptedReply] = {}
        problems: list[str] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            name = self.site_name(node)
            if msg.has_error():
                # The public reason code only: whatever text the reply holds is never kept.
                problems.append(f"{name} refused or failed: {reason_of(msg.error).value}")
                continue
            try:
                accepted[node] = self._check(node, msg)
            except InvalidUpdateError as exc:
                problems.append(f"{name}: {exc}")
            else:
                self._sites[node] = accepted[node].site_id
        for line in problems:
            logger.warning(line)
        for reply in accepted.values():
            if reply.gate.clipped:
                logger.warning(
                    "site %s: delta norm %.4g clipped to %.4g",
                    reply.site_id,
                    reply.gate.norm,
                    self.norm_bound,
                )
        return accepted, problems

    def _check(self, node: int, msg: Message) -> AcceptedReply:
        content = msg.content
        if self.output not in content.array_records or REPORT not in content.config_records:
            raise InvalidUpdateError(f"update rejected: reply lacks {self.output!r} or {REPORT!r}")
        try:
            report = SitePrivacyReport.from_dict(from_config(content.config_records[REPORT]))
            report = check_head(report, keys_dir=self.keys_dir)
        except (ReportFormatError, LedgerSignatureError) as exc:
            raise InvalidUpdateError(f"update rejected: {exc}") from exc
        record = content.array_records[self.output]
        gate = self.check_output(from_arrays(record))
        return AcceptedReply(node, report.site, report.weight, report, gate, record.count_bytes())

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used: Flower's ``Strategy.start`` is never called, the round loop
        (:mod:`federation.rounds`) gates with :meth:`gate` and aggregates with :meth:`aggregate`.

        Raises:
            NotImplementedError: always (Flower's abstract hook must exist).
        """
        raise NotImplementedError(
            "fedfew's strategies run under federation.rounds.run_rounds, not Strategy.start"
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No evaluation on hospital data: the server evaluates on its public set."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None
