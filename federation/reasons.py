"""Public reason codes of a node's error reply, defined once, and the typed errors they come from.

Egress rule (docs/privacy.md, "What leaves a node"): an error reply carries one of these fixed codes
and nothing else. Exception text names patient files, counts and shapes, so it stays in the node's
own log. Only known, typed errors map to specific codes; anything else (a bug, an out-of-memory, a
``RuntimeError`` from a library) is ``internal-error``, never a refusal.
"""

from __future__ import annotations

from enum import StrEnum

from flwr.app import Error

from federation.errors import (
    BudgetRefusedError,
    InvalidUpdateError,
    ModelMismatchError,
    NodeConfigError,
    PlanInvalidError,
    PlanRefusedError,
    SiteDataError,
)
from models.errors import DataError
from privacy.errors import LedgerError, LedgerSignatureError, LedgerTamperedError


class ReasonCode(StrEnum):
    """Why a node did not return an update; the value is the reply's whole reason text."""

    BUDGET_EXHAUSTED = "budget-exhausted"  # the site's ledger refuses: past its cap
    POLICY_REFUSED = "policy-refused"  # the plan breaks the node's own policy (noise, steps, q)
    PLAN_INVALID = "plan-invalid"  # no model or plan in the message, or a malformed plan
    MODEL_MISMATCH = "model-mismatch"  # the global model does not fit the plan's network
    DATA_UNREADABLE = "data-unreadable"  # the site's data cannot be read or used
    NODE_MISCONFIGURED = "node-misconfigured"  # the node's config (or ledger cap) is invalid
    LEDGER_UNUSABLE = "ledger-unusable"  # the ledger is unreadable, tampered or unsignable
    INTERNAL_ERROR = "internal-error"  # anything else: a bug, out of memory, a library error
    UNRECOGNISED = "unrecognised"  # server side only: a reply whose reason is none of these
    # Secure rounds: the node's own delta (a DP output) was not finite, so it was not masked.
    # Added after UNRECOGNISED so the codes above keep their numbers.
    UPDATE_INVALID = "update-invalid"

    @property
    def code(self) -> int:
        """The Flower ``Error.code`` of this reason."""
        return ERROR_CODES[self]


ERROR_CODES: dict[ReasonCode, int] = {
    reason: 1001 + i for i, reason in enumerate(r for r in ReasonCode)
}

# Typed error -> reason, most specific first (the first ``isinstance`` match wins). A new typed
# error that deserves its own code is one entry here.
REASONS: tuple[tuple[type[BaseException], ReasonCode], ...] = (
    (BudgetRefusedError, ReasonCode.BUDGET_EXHAUSTED),
    (PlanInvalidError, ReasonCode.PLAN_INVALID),
    (PlanRefusedError, ReasonCode.POLICY_REFUSED),
    (ModelMismatchError, ReasonCode.MODEL_MISMATCH),
    (SiteDataError, ReasonCode.DATA_UNREADABLE),
    (DataError, ReasonCode.DATA_UNREADABLE),
    (NodeConfigError, ReasonCode.NODE_MISCONFIGURED),
    (LedgerTamperedError, ReasonCode.LEDGER_UNUSABLE),
    (LedgerSignatureError, ReasonCode.LEDGER_UNUSABLE),
    (LedgerError, ReasonCode.LEDGER_UNUSABLE),
    (InvalidUpdateError, ReasonCode.UPDATE_INVALID),
)


def reason_for(exc: BaseException) -> ReasonCode:
    """The public reason for ``exc``: its typed error's code, else ``internal-error``."""
    for kind, reason in REASONS:
        if isinstance(exc, kind):
            return reason
    return ReasonCode.INTERNAL_ERROR


def error_for(reason: ReasonCode) -> Error:
    """The Flower ``Error`` of a reply: the code and the reason's fixed text, nothing else."""
    return Error(reason.code, reason.value)


def reason_of(error: Error) -> ReasonCode:
    """What the server may record about an error reply: a known code, or ``unrecognised``.

    Whatever text the reply carries (an older node, Flower's own exception reply) is never
    returned, so no server log, registry entry or status file can hold it.
    """
    for reason in ReasonCode:
        if reason is not ReasonCode.UNRECOGNISED and error.reason == reason.value:
            return reason
    return ReasonCode.UNRECOGNISED
