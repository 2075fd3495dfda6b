"""The strategy of a mechanism whose reply is a release (``OUTPUT_RELEASE``, dp-prototypes): the
gate rejects a release of the wrong shape or longer than the public bound allows, the accepted
releases are summed into the federation's release (kept for the round's published version), and
the global weights stay as they are."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable

from federation.records import State
from federation.server_config import ServerConfig
from federation.strategy import AcceptedReply, GatedStrategy
from federation.validation import GateResult, validate_release
from privacy.dp_config import DPPrototypeConfig
from privacy.mechanisms import OUTPUT_RELEASE
from privacy.prototype_release import SUMS, PrototypeRelease


class ReleaseGate(GatedStrategy):
    """The gate of every releasing mechanism: the arrays :meth:`release_shapes` names, float32,
    finite, and no longer than the public bound."""

    output = OUTPUT_RELEASE

    @abstractmethod
    def release_shapes(self) -> dict[str, tuple[int, ...]]:
        """The arrays a site's release must hold this round, by name."""

    def release_bound(self) -> float:
        """The longest release the gate accepts: the mechanism's sensitivity per patient for the
        public maximum of patients per site, plus four times the noise's expected norm."""
        plan = self.round_plan(1)
        entries = sum(math.prod(shape) for shape in self.release_shapes().values())
        signal = plan.dp_mechanism.sensitivity * plan.dp.max_grad_norm
        noise = plan.dp.noise_multiplier * plan.dp.max_grad_norm * math.sqrt(entries)
        return signal * self.config.dp.max_site_patients + 4 * noise

    def bound_text(self) -> str:
        """The release's length bound (a release is summed, not aggregated by the rule)."""
        return f"summed releases, each at most {self.release_bound():.4g} long"

    def check_output(self, arrays: State) -> GateResult:
        """The release's names, shapes, dtype, finite values and length."""
        return validate_release(arrays, self.release_shapes(), norm_bound=self.release_bound())


class ReleaseStrategy(ReleaseGate):
    """Gate each release, then sum them; the model does not change."""

    def __init__(self, config: ServerConfig, reference: State) -> None:
        super().__init__(config, reference)
        self._prototypes: dict[int, PrototypeRelease] = {}  # round -> the summed release
        self._feature_width: int | None = None  # d of the global model's embedding

    def prototypes_of(self, server_round: int) -> PrototypeRelease | None:
        """The release the sites' replies summed to in ``server_round``, if one was made."""
        return self._prototypes.get(server_round)

    def restore_release(self, server_round: int, release: PrototypeRelease) -> None:
        """Take back a release an earlier run of this federation kept (a resumed server)."""
        self._prototypes[server_round] = release

    def _prototype_config(self) -> DPPrototypeConfig:
        dp = self.round_plan(1).dp
        if not isinstance(dp, DPPrototypeConfig):
            raise TypeError(f"no release for {type(dp).__name__}")
        return dp

    def release_shapes(self) -> dict[str, tuple[int, ...]]:
        """The arrays a site's release must hold: ``{SUMS: (K, d+1)}``."""
        classes = len(self._prototype_config().classes)
        if self._feature_width is None:
            from federation.publishing import model_from_state  # torch: server side only

            model = model_from_state(self.reference, self.round_plan(1))
            self._feature_width = int(model.out_features)  # type: ignore[arg-type]
        return {SUMS: (classes, self._feature_width + 1)}

    def aggregate(self, state: State, accepted: Iterable[AcceptedReply]) -> State:
        """``state`` itself; the sum of the accepted releases is kept for the current round
        (:meth:`prototypes_of`)."""
        dp = self._prototype_config()
        replies = list(accepted)
        # Sum, not a weighted mean: the sum of the sites' S is the federation's S (the noise
        # variances add); site weights do not apply.
        self._prototypes[self._round] = PrototypeRelease.summed(
            [r.gate.delta[SUMS] for r in replies],
            classes=dp.classes,
            clip=dp.max_grad_norm,
            noise_multiplier=dp.noise_multiplier,
            sites=sorted(r.site_id for r in replies),
        )
        return state
