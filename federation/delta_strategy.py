"""The strategy of a mechanism whose reply is a model delta (``OUTPUT_DELTA``): the gate clips or
rejects a delta over the norm bound, and the accepted deltas are aggregated with public site
weights (FedAvg, or a robust rule) and applied with the server learning rate."""

from __future__ import annotations

from collections.abc import Iterable

from federation.aggregation import aggregate, apply_update
from federation.records import State
from federation.strategy import AcceptedReply, GatedStrategy
from federation.validation import GateResult, validate_update
from privacy.mechanisms import OUTPUT_DELTA


class DeltaStrategy(GatedStrategy):
    """Gate each delta, then ``theta + server_lr * aggregate(delta_k)``."""

    output = OUTPUT_DELTA

    def check_output(self, arrays: State) -> GateResult:
        """Names, shapes, dtypes and finite values against the global model, and the norm
        bound (clip or reject: the run config's ``aggregation.norm-policy``)."""
        return validate_update(
            arrays,
            self.reference,
            norm_bound=self.norm_bound,
            policy=self.config.aggregation.norm_policy,
        )

    def aggregate(self, state: State, accepted: Iterable[AcceptedReply]) -> State:
        """The aggregation rule of the run config's defence over the accepted deltas, applied
        to ``state``."""
        replies = list(accepted)
        update = aggregate(
            [r.gate.delta for r in replies],
            [r.weight for r in replies],
            method=self.config.aggregation.rule,
            trim=self.config.aggregation.trim,
            byzantine=self.config.aggregation.byzantine,
        )
        return apply_update(state, update, server_lr=self.config.aggregation.server_lr)
