"""What the privacy page shows: each site's cap, spend and charges, a hash-chain check, reports.

Reads ledgers only; the dashboard never charges or edits one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import FedfewError
from privacy.budget_report import REPORT_SUFFIXES, write_report
from privacy.errors import LedgerTamperedError
from privacy.ledger import KIND_CHARGE, KIND_REFUSAL, Ledger, LedgerEntry

# Columns of the charges and refusals tables, in the order an auditor reads them.
ENTRY_COLUMNS = (
    "id",
    "time",
    "round",
    "mechanism",
    "noise_multiplier",
    "sensitivity_factor",
    "sample_rate",
    "steps",
    "delta",
    "epsilon_before",
    "epsilon_after",
    "accountant",
    "requester",
    "run_id",
)
REPORT_MIME = {".html": "text/html", ".csv": "text/csv"}


@dataclass(frozen=True)
class SiteBudget:
    """One site's budget as its ledger records it."""

    path: Path
    site: str
    cap: float
    spent: float
    delta: float
    accountant: str
    charges: tuple[LedgerEntry, ...]
    refusals: tuple[LedgerEntry, ...]

    @property
    def remaining(self) -> float:
        """Epsilon left before the cap (0 when reached)."""
        return max(self.cap - self.spent, 0.0)

    @property
    def fraction_spent(self) -> float:
        """Spent over cap, in [0, 1]."""
        return min(self.spent / self.cap, 1.0) if self.cap > 0 else 1.0


@dataclass(frozen=True)
class LedgerProblem:
    """A configured ledger that cannot be read, and why."""

    path: Path
    message: str


@dataclass(frozen=True)
class TamperedLedger:
    """A configured ledger whose records fail the integrity check: none of its numbers is shown.

    Attributes:
        path: The ledger file.
        row: First record that does not verify (0 = the cap, site or delta settings).
        reason: What the check found, in the ledger's words.
    """

    path: Path
    row: int
    reason: str

    @property
    def message(self) -> str:
        """What an administrator reads instead of the numbers, and what to do."""
        where = "its settings (cap, site or delta)" if self.row == 0 else f"record {self.row}"
        return (
            f"This ledger failed its integrity check: {where} changed after it was written "
            f"({self.reason}). Its budget numbers cannot be trusted and are not shown. Do not "
            "run private training at this site until it is resolved: restore the ledger from "
            "a verified backup, check it with `fedfew budget verify`, and report the incident "
            "to your data protection officer and the federation operator."
        )


def read_budget(path: Path) -> SiteBudget | TamperedLedger:
    """Read one ledger, after checking its whole hash chain.

    Returns:
        The site's budget, or a :class:`TamperedLedger` (and no number) when the check fails.

    Raises:
        LedgerError: missing file, not a ledger, or a wrong schema.
    """
    ledger = Ledger.open(path)
    try:
        ledger.verify()
    except LedgerTamperedError as exc:
        return TamperedLedger(path=Path(path), row=exc.row, reason=exc.reason)
    entries = ledger.entries()
    return SiteBudget(
        path=Path(path),
        site=ledger.site,
        cap=ledger.cap_epsilon,
        spent=ledger.epsilon_spent(),
        delta=ledger.delta,
        accountant=ledger.accountant,
        charges=tuple(e for e in entries if e.kind == KIND_CHARGE),
        refusals=tuple(e for e in entries if e.kind == KIND_REFUSAL),
    )


def read_budgets(paths: Sequence[Path]) -> list[SiteBudget | TamperedLedger | LedgerProblem]:
    """Every configured ledger, in order; an unreadable one becomes a :class:`LedgerProblem`."""
    out: list[SiteBudget | TamperedLedger | LedgerProblem] = []
    for path in paths:
        try:
            out.append(read_budget(path))
        except FedfewError as exc:  # shown on the page beside the ledgers that did load
            out.append(LedgerProblem(path=Path(path), message=str(exc)))
    return out


def entry_rows(entries: Sequence[LedgerEntry]) -> list[dict[str, Any]]:
    """Table rows of charges or refusals (mechanism and parameters of each)."""
    return [{k: e.as_dict()[k] for k in ENTRY_COLUMNS} for e in entries]


def epsilon_rows(budgets: Sequence[SiteBudget]) -> list[dict[str, Any]]:
    """Cumulative epsilon after each charge, per site, for a line chart (round, site, epsilon).

    Starts each site at 0 before its first charge so a single charge still draws a line.
    """
    rows: list[dict[str, Any]] = []
    for b in budgets:
        if b.charges:
            rows.append({"charge": 0, "round": b.charges[0].round, "site": b.site, "epsilon": 0.0})
        rows += [
            {"charge": i, "round": e.round, "site": b.site, "epsilon": e.epsilon_after}
            for i, e in enumerate(b.charges, start=1)
        ]
    return rows


def cap_rows(budgets: Sequence[SiteBudget]) -> list[dict[str, Any]]:
    """Each charged site's cap as a flat line over the rounds of :func:`epsilon_rows`."""
    rounds = [e.round for b in budgets for e in b.charges]
    if not rounds:
        return []
    return [
        {"charge": 0, "round": r, "site": f"{b.site} cap", "epsilon": b.cap}
        for b in budgets
        if b.charges
        for r in (min(rounds), max(rounds))
    ]


def rounds_left(budget: SiteBudget) -> int | None:
    """How many more rounds the site can pay for if each costs what its latest round cost: a
    forecast (under RDP composition later rounds cost a little less than earlier ones, so it
    errs low). None before the first charge."""
    if not budget.charges:
        return None
    latest = budget.charges[-1].round
    spend = sum(e.epsilon_after - e.epsilon_before for e in budget.charges if e.round == latest)
    return int(budget.remaining // spend) if spend > 0 else None


@dataclass(frozen=True)
class Verification:
    """Outcome of checking a ledger's hash chain."""

    intact: bool
    message: str


def verify_ledger(path: Path) -> Verification:
    """Check the whole hash chain of one ledger (see :meth:`privacy.ledger.Ledger.verify`).

    Raises:
        LedgerError: the file cannot be opened as a ledger.
    """
    try:
        rows = Ledger.open(path).verify()
    except LedgerTamperedError as exc:
        return Verification(
            intact=False, message=f"Do not trust this record: first bad row {exc.row}: {exc}"
        )
    return Verification(
        intact=True, message=f"Record intact: all {rows} entries and the cap verify."
    )


def report_bytes(path: Path, *, suffix: str) -> bytes:
    """The budget report of a ledger as a file's bytes (``.html`` or ``.csv``).

    Raises:
        ValueError: another suffix.
        LedgerError: the file cannot be opened as a ledger.
        LedgerTamperedError: the hash chain does not verify.
    """
    if suffix not in REPORT_SUFFIXES:
        raise ValueError(f"report suffix must be one of {REPORT_SUFFIXES}, got {suffix!r}")
    ledger = Ledger.open(path)
    ledger.verify()  # no report of numbers the chain cannot vouch for
    with tempfile.TemporaryDirectory(prefix="fedfew-report-") as folder:
        out = write_report(ledger, Path(folder) / f"report{suffix}")
        return out.read_bytes()
