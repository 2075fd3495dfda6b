"""Which strategy serves a federation: the one for what its mechanism outputs."""

from __future__ import annotations

from types import MappingProxyType

from federation.delta_strategy import DeltaStrategy
from federation.records import State
from federation.release_strategy import ReleaseStrategy
from federation.server_config import ServerConfig
from federation.strategy import GatedStrategy
from federation.within_class_strategy import WithinClassStrategy
from privacy.mechanisms import OUTPUT_DELTA, OUTPUT_RELEASE, WITHIN_CLASS, get_mechanism

# A mechanism's output kind (privacy.mechanisms.Mechanism.output) -> its strategy.
STRATEGIES = MappingProxyType({OUTPUT_DELTA: DeltaStrategy, OUTPUT_RELEASE: ReleaseStrategy})
# A mechanism whose release sets the global model its own way -> its strategy.
MECHANISM_STRATEGIES = MappingProxyType({WITHIN_CLASS: WithinClassStrategy})


def strategy_for(config: ServerConfig, reference: State) -> GatedStrategy:
    """The strategy of ``config``'s mechanism, gating against ``reference`` (round 0's model)."""
    mechanism = get_mechanism(config.mechanism)
    chosen = MECHANISM_STRATEGIES.get(mechanism.name) or STRATEGIES[mechanism.output]
    return chosen(config, reference)
