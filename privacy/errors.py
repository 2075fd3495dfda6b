"""Typed errors of the privacy package. Every message names the value and says what to do."""

from __future__ import annotations

from models.errors import FedfewError


class PrivacyError(FedfewError):
    """Base class of every privacy error raised on purpose."""


class BudgetExhaustedError(PrivacyError):
    """A charge would take a site's epsilon past its cap; the refusal is already recorded.

    Attributes:
        site: The site whose ledger refused the charge.
        cap_epsilon: The site's cap.
        epsilon_spent: Epsilon spent before the refused charge (unchanged by it).
        epsilon_requested_after: Epsilon the site would have reached had the charge been accepted.
    """

    def __init__(
        self,
        *,
        site: str,
        cap_epsilon: float,
        epsilon_spent: float,
        epsilon_requested_after: float,
    ) -> None:
        super().__init__(
            f"privacy budget of site {site!r} exhausted: this run would bring epsilon from "
            f"{epsilon_spent:.6g} to {epsilon_requested_after:.6g}, past the cap of "
            f"{cap_epsilon:.6g}; nothing was computed. Ask for fewer steps, a lower sample rate "
            "or more noise, or have the site's administrator decide on its cap."
        )
        self.site = site
        self.cap_epsilon = cap_epsilon
        self.epsilon_spent = epsilon_spent
        self.epsilon_requested_after = epsilon_requested_after


class LedgerTamperedError(PrivacyError):
    """The ledger's hash chain does not verify; ``row`` is the first bad row id."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(
            f"ledger tampered: row {row}: {reason}. Do not trust the spent epsilon; restore the "
            "ledger from a verified copy and compare its head hash with an off-node record."
        )
        self.row = row
        self.reason = reason


class LedgerError(PrivacyError):
    """A ledger file is missing, is not a fedfew ledger, or has the wrong schema."""


class LedgerRecordMismatchError(PrivacyError):
    """A ledger disagrees with the heads the server recorded: it was rebuilt, truncated or
    rolled back since the server saw it."""


class LedgerSignatureError(PrivacyError):
    """A ledger head's signature is missing where required, unreadable or does not verify, or
    the node's signing key is unusable."""


class ReportFormatError(PrivacyError, ValueError):
    """A site's privacy report lacks a field or holds a value of the wrong type."""


class UnknownMechanismError(PrivacyError, ValueError):
    """A DP mechanism name that is not in the registry (``privacy.mechanisms``)."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"unknown DP mechanism {name!r}; registered: {', '.join(known)}. Check the spelling "
            "in the run config, the node's allowed-mechanisms or --mechanism."
        )
        self.name = name
        self.known = known
