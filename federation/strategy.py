"""Federated meta-learning as a Flower strategy: every reply passes the validation gate, then the
deltas are aggregated with public site weights and a server learning rate.

A round of a mechanism that releases arrays (dp-prototypes) is not averaged: the sites' releases
are summed into the federation's release, kept for the round's published version, and the
global weights stay as they are."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable
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

from federation.aggregation import aggregate, apply_update
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
from federation.validation import GateResult, validate_release, validate_update
from privacy.dp_config import DPPrototypeConfig
from privacy.errors import LedgerSignatureError, ReportFormatError
from privacy.ledger_head import verify_signature
from privacy.mechanisms import OUTPUT_DELTA, OUTPUT_RELEASE
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


class FederatedMetaStrategy(Strategy):
    """Gate, then aggregate deltas: ``theta + server_lr * aggregate(delta_k)``."""

    def __init__(self, config: ServerConfig, reference: State) -> None:
        self.config = config
        self.reference = reference
        self._sites: dict[int, str] = {}  # node id -> site, from accepted replies (for logs)
        self.keys_dir = config.root / REGISTERED_KEYS
        n_params = sum(a.size for a in reference.values())
        self.norm_bound = config.aggregation.update_norm_bound or (
            ADAM_REACH * config.local_lr * config.steps * math.sqrt(n_params)
        )
        self._round = 0  # the round being configured (releases are kept under it)
        self._prototypes: dict[int, PrototypeRelease] = {}  # round -> the summed release
        self._feature_width: int | None = None  # d of the global model's embedding
        # What the federation's mechanism outputs, and so how a reply is gated and how the
        # accepted replies are combined (a delta: clipped or rejected, then averaged; a
        # release: rejected when too long, then summed).
        self.output = self.round_plan(1).dp_mechanism.output
        self._gates: dict[str, Callable[[State], GateResult]] = {
            OUTPUT_DELTA: self._gate_delta,
            OUTPUT_RELEASE: self._gate_release,
        }
        self._combine: dict[str, Callable[[State, list[AcceptedReply]], State]] = {
            OUTPUT_DELTA: self._average_deltas,
            OUTPUT_RELEASE: self._sum_releases,
        }

    def prototypes_of(self, server_round: int) -> PrototypeRelease | None:
        """The release the sites' replies summed to in ``server_round``, if one was made."""
        return self._prototypes.get(server_round)

    def restore_release(self, server_round: int, release: PrototypeRelease) -> None:
        """Take back a release an earlier run of this federation kept (a resumed server)."""
        self._prototypes[server_round] = release

    def release_shapes(self) -> dict[str, tuple[int, ...]]:
        """The arrays a site's release must hold: ``{SUMS: (K, d+1)}``."""
        dp = self.round_plan(1).dp
        if not isinstance(dp, DPPrototypeConfig):
            raise TypeError(f"no release shape for {type(dp).__name__}")
        if self._feature_width is None:
            from federation.publishing import model_from_state  # torch: server side only

            model = model_from_state(self.reference, self.round_plan(1))
            self._feature_width = int(model.out_features)  # type: ignore[arg-type]
        return {SUMS: (len(dp.classes), self._feature_width + 1)}

    def release_bound(self) -> float:
        """The longest release the gate accepts: ``sqrt(2) C`` per patient for the public
        maximum of patients per site, plus four times the noise's expected norm."""
        plan = self.round_plan(1)
        entries = math.prod(self.release_shapes()[SUMS])
        signal = plan.dp_mechanism.sensitivity * plan.dp.max_grad_norm
        noise = plan.dp.noise_multiplier * plan.dp.max_grad_norm * math.sqrt(entries)
        return signal * self.config.dp.max_site_patients + 4 * noise

    def round_plan(self, server_round: int) -> RoundPlan:
        """The round's plan, with this strategy's delta bound for nodes to clip to (secure
        rounds)."""
        return self.config.round_plan(server_round, norm_bound=self.norm_bound)

    def summary(self) -> None:
        """Log the configuration."""
        logger.info(
            "strategy: %s aggregation%s (defends against: %s), server lr %g, delta norm bound "
            "%.4g (%s), quorum %d",
            self.config.aggregation.rule,
            " of SecAgg+ sums" if self.config.secagg.enabled else "",
            self.config.aggregation.defence,
            self.config.aggregation.server_lr,
            self.norm_bound,
            self.config.aggregation.norm_policy,
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
        gate = self._gates[self.output](from_arrays(record))
        return AcceptedReply(node, report.site, report.weight, report, gate, record.count_bytes())

    def _gate_delta(self, delta: State) -> GateResult:
        return validate_update(
            delta,
            self.reference,
            norm_bound=self.norm_bound,
            policy=self.config.aggregation.norm_policy,
        )

    def _gate_release(self, release: State) -> GateResult:
        return validate_release(release, self.release_shapes(), norm_bound=self.release_bound())

    def aggregate(self, state: State, accepted: Iterable[AcceptedReply]) -> State:
        """The next global model from the accepted deltas; for a releasing mechanism, ``state``
        itself, and the sum of the releases is kept for the round (:meth:`prototypes_of`)."""
        return self._combine[self.output](state, list(accepted))

    def _average_deltas(self, state: State, replies: list[AcceptedReply]) -> State:
        update = aggregate(
            [r.gate.delta for r in replies],
            [r.weight for r in replies],
            method=self.config.aggregation.rule,
            trim=self.config.aggregation.trim,
            byzantine=self.config.aggregation.byzantine,
        )
        return apply_update(state, update, server_lr=self.config.aggregation.server_lr)

    def _sum_releases(self, state: State, replies: list[AcceptedReply]) -> State:
        plan = self.round_plan(self._round or 1)
        if not isinstance(plan.dp, DPPrototypeConfig):
            raise TypeError(f"no release to sum for {type(plan.dp).__name__}")
        # Sum, not a weighted mean: the sum of the sites' S is the federation's S (the noise
        # variances add); site weights do not apply.
        self._prototypes[self._round] = PrototypeRelease.summed(
            [r.gate.delta[SUMS] for r in replies],
            classes=plan.dp.classes,
            clip=plan.dp.max_grad_norm,
            noise_multiplier=plan.dp.noise_multiplier,
            sites=sorted(r.site_id for r in replies),
        )
        return state

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used: Flower's ``Strategy.start`` is never called, the round loop
        (:mod:`federation.rounds`) gates with :meth:`gate` and aggregates with :meth:`aggregate`.

        Raises:
            NotImplementedError: always (Flower's abstract hook must exist).
        """
        raise NotImplementedError(
            "FederatedMetaStrategy runs under federation.rounds.run_rounds, not Strategy.start"
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
