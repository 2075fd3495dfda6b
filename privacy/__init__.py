"""fedfew's privacy layer: the registered DP mechanisms, their accounting, each site's signed
ledger, and the typed records that leave a node or the server (ARCHITECTURE.md has the map).

The public API is importable from here; each name is imported when first used, so that the
light paths (`fedfew budget`, the dashboard's readers) still start without torch or Opacus.
"""

# The names below are imported for type checkers only and exported through __all__, which
# ruff cannot read: F401 does not apply to this file.
# ruff: noqa: F401

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privacy.accounting import calibrate_noise_multiplier, epsilon_for, worst_epsilon
    from privacy.budget_report import Budget, budget_of, write_report
    from privacy.distributed_noise import fallback_epsilons
    from privacy.dp_config import (
        DEFAULT_SAMPLE_RATE,
        DPConfig,
        DPPretrainConfig,
        DPPrototypeConfig,
        DPSettings,
        MechanismConfig,
    )
    from privacy.errors import (
        BudgetExhaustedError,
        LedgerError,
        LedgerRecordMismatchError,
        LedgerSignatureError,
        LedgerTamperedError,
        PrivacyError,
        ReportFormatError,
        UnknownMechanismError,
    )
    from privacy.ledger import ChargeRequest, Ledger, LedgerEntry
    from privacy.ledger_head import LedgerHead, RecordedHead, check_against_record, read_head
    from privacy.mechanisms import (
        DEFAULT_MECHANISM,
        MECHANISMS,
        Mechanism,
        describe,
        get_mechanism,
        register_mechanism,
    )
    from privacy.prototype_release import PrototypeRelease
    from privacy.round_record import FederationStatus, RoundRecord
    from privacy.site_report import SitePrivacyReport, recorded_heads

_EXPORTS = {
    "calibrate_noise_multiplier": "privacy.accounting",
    "epsilon_for": "privacy.accounting",
    "worst_epsilon": "privacy.accounting",
    "fallback_epsilons": "privacy.distributed_noise",
    "DEFAULT_SAMPLE_RATE": "privacy.dp_config",
    "DPConfig": "privacy.dp_config",
    "DPPretrainConfig": "privacy.dp_config",
    "DPSettings": "privacy.dp_config",
    "DPPrototypeConfig": "privacy.dp_config",
    "MechanismConfig": "privacy.dp_config",
    "BudgetExhaustedError": "privacy.errors",
    "LedgerError": "privacy.errors",
    "LedgerRecordMismatchError": "privacy.errors",
    "LedgerSignatureError": "privacy.errors",
    "LedgerTamperedError": "privacy.errors",
    "PrivacyError": "privacy.errors",
    "ReportFormatError": "privacy.errors",
    "UnknownMechanismError": "privacy.errors",
    "ChargeRequest": "privacy.ledger",
    "Ledger": "privacy.ledger",
    "LedgerEntry": "privacy.ledger",
    "LedgerHead": "privacy.ledger_head",
    "RecordedHead": "privacy.ledger_head",
    "check_against_record": "privacy.ledger_head",
    "read_head": "privacy.ledger_head",
    "DEFAULT_MECHANISM": "privacy.mechanisms",
    "MECHANISMS": "privacy.mechanisms",
    "Mechanism": "privacy.mechanisms",
    "describe": "privacy.mechanisms",
    "get_mechanism": "privacy.mechanisms",
    "register_mechanism": "privacy.mechanisms",
    "PrototypeRelease": "privacy.prototype_release",
    "Budget": "privacy.budget_report",
    "budget_of": "privacy.budget_report",
    "write_report": "privacy.budget_report",
    "FederationStatus": "privacy.round_record",
    "RoundRecord": "privacy.round_record",
    "SitePrivacyReport": "privacy.site_report",
    "recorded_heads": "privacy.site_report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
