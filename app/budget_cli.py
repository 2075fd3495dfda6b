"""``fedfew budget``: create, show, verify and report a site's privacy budget ledger."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer

from models.errors import FedfewError
from privacy.accounting import worst_epsilon
from privacy.budget_report import budget_of, write_report
from privacy.errors import LedgerRecordMismatchError, LedgerTamperedError
from privacy.ledger import Ledger
from privacy.ledger_head import check_against_record
from privacy.site_report import recorded_heads

budget_app = typer.Typer(
    help="A site's privacy budget ledger: its cap, what was spent, and a tamper check.",
    no_args_is_help=True,
)

LedgerOption = typer.Option(..., "--ledger", help="The site's ledger file (SQLite).")
F = TypeVar("F", bound=Callable[..., Any])


def tampered_message(exc: LedgerTamperedError) -> str:
    """One line for a ledger whose hash chain does not verify (the first bad row and why)."""
    return f"ledger tampered: first bad row {exc.row}: {exc.reason}"


def _one_line_errors(func: F) -> F:
    # Intentional errors become one line on stderr and exit code 1, never a traceback.
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LedgerTamperedError as exc:
            typer.echo(
                f"{tampered_message(exc)}; its numbers cannot be trusted and are not shown. "
                "Restore the ledger from a verified copy (`fedfew budget verify` checks one).",
                err=True,
            )
            raise typer.Exit(1) from None
        except (FedfewError, ValueError) as exc:
            typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def open_verified(path: Path) -> Ledger:
    """Open a ledger and check its whole hash chain before anything reads its numbers.

    Raises:
        LedgerError: The file is missing or is not a fedfew ledger.
        LedgerTamperedError: The chain, the meta row or the recorded head does not verify.
    """
    ledger = Ledger.open(path)
    ledger.verify()
    return ledger


@budget_app.command("init")
@_one_line_errors
def init(
    ledger: Path = LedgerOption,
    site: str = typer.Option(..., "--site", help="This site's name."),
    cap_epsilon: float = typer.Option(..., "--cap-epsilon", help="Total epsilon this site allows."),
    delta: float = typer.Option(..., "--delta", help="Delta every charge is accounted at."),
    accountant: str = typer.Option("rdp", "--accountant", help="rdp or prv."),
) -> None:
    """Create a site's ledger with its cap (refuses to overwrite an existing file)."""
    created = Ledger.create(
        ledger, site=site, cap_epsilon=cap_epsilon, delta=delta, accountant=accountant
    )
    typer.echo(
        f"created ledger {created.path} for site {created.site!r}: cap epsilon "
        f"{created.cap_epsilon:g} at delta {created.delta:g} ({created.accountant})"
    )


def budget_summary(ledger: Ledger) -> dict[str, Any]:
    """The ``budget show --json`` object (the keys are a contract other parts rely on)."""
    entries = ledger.entries()
    budget = budget_of(ledger, entries)
    worst, worst_name = worst_epsilon(ledger.history(), delta=ledger.delta)
    return {
        "site": ledger.site,
        "cap_epsilon": budget.cap,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "epsilon_spent": budget.spent,
        "epsilon_remaining": budget.remaining,
        "worst_epsilon": worst,
        "worst_accountant": worst_name,
        "charges": budget.charges,
        "refusals": budget.refusals,
        "history": [e.as_dict() for e in entries],
    }


@budget_app.command("show")
@_one_line_errors
def show(
    ledger: Path = LedgerOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show the cap, the spend and every charge and refusal (refused if the ledger was edited)."""
    summary = budget_summary(open_verified(ledger))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(
        f"site {summary['site']}: epsilon spent {summary['epsilon_spent']:.4f} of cap "
        f"{summary['cap_epsilon']:.4g} (remaining {summary['epsilon_remaining']:.4f}) at delta "
        f"{summary['delta']:.3g}, {summary['accountant']}; worst of rdp/prv "
        f"{summary['worst_epsilon']:.4f} ({summary['worst_accountant']}); "
        f"{summary['charges']} charges, {summary['refusals']} refusals"
    )
    columns: tuple[str, ...] = ("id", "kind", "round", "mechanism", "accounted_noise_multiplier")
    columns += ("sample_rate", "steps", "epsilon_before", "epsilon_after", "requester")
    typer.echo("  ".join(f"{c:>12}" if c != "mechanism" else f"{c:<14}" for c in columns))
    for entry in summary["history"]:
        cells = []
        for c in columns:
            value = entry[c]
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            cells.append(f"{text:<14}" if c == "mechanism" else f"{text:>12}")
        typer.echo("  ".join(cells))


@budget_app.command("verify")
@_one_line_errors
def verify(
    ledger: Path = LedgerOption,
    against: Path | None = typer.Option(
        None,
        "--against",
        help="The server's record of this site's signed ledger heads: the server's registry "
        "folder or an exported JSON file. Detects a rebuilt, truncated or rolled-back ledger.",
    ),
) -> None:
    """Check the hash chain (and the server's record): exit 0 if intact, 1 with one line if not."""
    opened = Ledger.open(ledger)
    try:
        rows = opened.verify()
    except LedgerTamperedError as exc:
        typer.echo(tampered_message(exc), err=True)
        raise typer.Exit(1) from None
    if against is None:
        typer.echo(f"ledger intact: {rows} rows")
        return
    heads = recorded_heads(against, site=opened.site)
    try:
        checked = check_against_record(opened, heads)
    except LedgerRecordMismatchError as exc:
        typer.echo(f"ledger does not match the server's record: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"ledger intact: {rows} rows; matches the server's record of site {opened.site!r} "
        f"({checked} heads, up to round {max(h.round for h in heads)})"
    )


@budget_app.command("report")
@_one_line_errors
def report(
    ledger: Path = LedgerOption,
    out: Path = typer.Option(..., "--out", help="report.html or report.csv"),
) -> None:
    """Write a report an administrator can file (.html or .csv); refused for an edited ledger."""
    written = write_report(open_verified(ledger), out)
    typer.echo(f"wrote {written}")
