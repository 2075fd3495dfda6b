"""Which strategy serves a federation: the one for what its mechanism outputs."""

from __future__ import annotations

from types import MappingProxyType

from federation.delta_strategy import DeltaStrategy
from federation.records import State
from federation.release_strategy import ReleaseStrategy
from federation.server_config import ServerConfig
from federation.strategy import GatedStrategy
from privacy.mechanisms import OUTPUT_DELTA, OUTPUT_RELEASE, get_mechanism

# A mechanism's output kind (privacy.mechanisms.Mechanism.output) -> its strategy.
STRATEGIES = MappingProxyType({OUTPUT_DELTA: DeltaStrategy, OUTPUT_RELEASE: ReleaseStrategy})


def strategy_for(config: ServerConfig, reference: State) -> GatedStrategy:
    """The strategy of ``config``'s mechanism, gating against ``reference`` (round 0's model)."""
    return STRATEGIES[get_mechanism(config.mechanism).output](config, reference)
