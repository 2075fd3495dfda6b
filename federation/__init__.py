"""fedfew's federation: a Flower ServerApp and ClientApp over this project's round loop, gate,
aggregation, plans and SecAgg+ (ARCHITECTURE.md has the map).

The public API is importable from here; each name is imported when first used, so that a
ClientApp process (``federation.client_app``) still starts without torch. The process layer
(``federation.deploy``) is not part of it: the Flower app never depends on how it is run.
"""

# The names below are imported for type checkers only and exported through __all__, which
# ruff cannot read: F401 does not apply to this file.
# ruff: noqa: F401

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from federation.aggregation import AGGREGATIONS, DEFENCES, aggregate, apply_update
    from federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from federation.delta_strategy import DeltaStrategy
    from federation.errors import (
        BudgetRefusedError,
        CheckpointError,
        FederationError,
        InvalidUpdateError,
        ModelMismatchError,
        NodeConfigError,
        PlanInvalidError,
        PlanRefusedError,
        QuorumError,
        SiteDataError,
    )
    from federation.node import NodeReply, keep_final_model, run_round
    from federation.node_config import NodeConfig
    from federation.plan import RoundPlan, check_policy
    from federation.reasons import ReasonCode
    from federation.release_strategy import ReleaseStrategy
    from federation.rounds import STATUS_FILE, run_rounds
    from federation.secure_aggregation import (
        SecureAggregationConfig,
        SecurePolicy,
        clip_before_masking,
        gate_sum,
    )
    from federation.server_app import initial_state, run_federation, serve
    from federation.server_config import (
        AggregationConfig,
        EvalConfig,
        SecureRoundsConfig,
        ServerConfig,
    )
    from federation.strategies import STRATEGIES, strategy_for
    from federation.strategy import GatedStrategy
    from federation.validation import GateResult, update_norm, validate_release, validate_update

_EXPORTS = {
    "AGGREGATIONS": "federation.aggregation",
    "aggregate": "federation.aggregation",
    "apply_update": "federation.aggregation",
    "Checkpoint": "federation.checkpoint",
    "load_checkpoint": "federation.checkpoint",
    "save_checkpoint": "federation.checkpoint",
    "BudgetRefusedError": "federation.errors",
    "CheckpointError": "federation.errors",
    "FederationError": "federation.errors",
    "InvalidUpdateError": "federation.errors",
    "ModelMismatchError": "federation.errors",
    "NodeConfigError": "federation.errors",
    "PlanInvalidError": "federation.errors",
    "PlanRefusedError": "federation.errors",
    "QuorumError": "federation.errors",
    "SiteDataError": "federation.errors",
    "NodeReply": "federation.node",
    "keep_final_model": "federation.node",
    "run_round": "federation.node",
    "NodeConfig": "federation.node_config",
    "RoundPlan": "federation.plan",
    "check_policy": "federation.plan",
    "ReasonCode": "federation.reasons",
    "STATUS_FILE": "federation.rounds",
    "run_rounds": "federation.rounds",
    "SecureAggregationConfig": "federation.secure_aggregation",
    "SecurePolicy": "federation.secure_aggregation",
    "clip_before_masking": "federation.secure_aggregation",
    "gate_sum": "federation.secure_aggregation",
    "initial_state": "federation.server_app",
    "run_federation": "federation.server_app",
    "serve": "federation.server_app",
    "DEFENCES": "federation.aggregation",
    "AggregationConfig": "federation.server_config",
    "EvalConfig": "federation.server_config",
    "SecureRoundsConfig": "federation.server_config",
    "ServerConfig": "federation.server_config",
    "DeltaStrategy": "federation.delta_strategy",
    "GatedStrategy": "federation.strategy",
    "ReleaseStrategy": "federation.release_strategy",
    "STRATEGIES": "federation.strategies",
    "strategy_for": "federation.strategies",
    "GateResult": "federation.validation",
    "update_norm": "federation.validation",
    "validate_release": "federation.validation",
    "validate_update": "federation.validation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'federation' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
