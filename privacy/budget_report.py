"""A budget report an administrator can file: self-contained HTML, or CSV with every field."""

from __future__ import annotations

import csv
import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from privacy.errors import LedgerTamperedError
from privacy.ledger import ENTRY_FIELDS, KIND_CHARGE, Ledger, LedgerEntry

REPORT_SUFFIXES = (".html", ".csv")

_STYLE = """
body{font-family:sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #bbb;padding:2px 6px;text-align:left}
tr.refusal{background:#fde2e2}
.bad{color:#b00;font-weight:bold}.ok{color:#070;font-weight:bold}
"""


@dataclass(frozen=True)
class Budget:
    """A ledger's spend against its cap: the one place spent and remaining are computed."""

    cap: float  # the site's epsilon cap
    spent: float  # epsilon of every charge composed (the ledger's accountant and delta)
    charges: int  # rows that charged
    refusals: int  # rows that refused a charge (budget exhausted)

    @property
    def remaining(self) -> float:
        """Epsilon left under the cap (0 once the spend has reached it)."""
        return max(self.cap - self.spent, 0.0)


def budget_of(ledger: Ledger, entries: Sequence[LedgerEntry] | None = None) -> Budget:
    """``ledger``'s budget (``entries``: its rows when the caller has read them already)."""
    rows = ledger.entries() if entries is None else entries
    charges = sum(e.kind == KIND_CHARGE for e in rows)
    return Budget(ledger.cap_epsilon, ledger.epsilon_spent(), charges, len(rows) - charges)


def _verification(ledger: Ledger) -> tuple[bool, str]:
    try:
        rows = ledger.verify()
    except LedgerTamperedError as exc:
        return False, str(exc)
    return True, f"ledger intact: {rows} rows"


def _svg(entries: list[LedgerEntry], cap: float) -> str:
    # Cumulative epsilon after each charge (a step line), with the cap as a dashed line.
    width, height, pad = 640, 240, 30
    charges = [e for e in entries if e.kind == KIND_CHARGE]
    top = max([cap, *(e.epsilon_after for e in charges)]) * 1.05 or 1.0
    n = max(len(charges), 1)

    def x(i: int) -> float:
        return pad + (width - 2 * pad) * i / n

    def y(eps: float) -> float:
        return height - pad - (height - 2 * pad) * eps / top

    points = [(x(0), y(0.0))]
    for i, entry in enumerate(charges, start=1):
        points += [(x(i), points[-1][1]), (x(i), y(entry.epsilon_after))]
    path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="cumulative epsilon per charge">'
        f'<line x1="{pad}" y1="{y(cap):.1f}" x2="{width - pad}" y2="{y(cap):.1f}" '
        'stroke="#b00" stroke-dasharray="4 3"/>'
        f'<text x="{width - pad}" y="{y(cap) - 4:.1f}" text-anchor="end" font-size="11">'
        f"cap {cap:.4g}</text>"
        f'<polyline fill="none" stroke="#036" stroke-width="2" points="{path}"/>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#444"/>'
        f'<text x="{pad}" y="{height - 8}" font-size="11">charges: {len(charges)}</text>'
        "</svg>"
    )


def _html(ledger: Ledger) -> str:
    entries = ledger.entries()
    budget = budget_of(ledger, entries)
    intact, status = _verification(ledger)
    esc = html.escape
    summary = [
        ("site", ledger.site),
        ("cap epsilon", f"{budget.cap:.6g}"),
        ("delta", f"{ledger.delta:.3g}"),
        ("accountant", ledger.accountant),
        ("epsilon spent", f"{budget.spent:.6g}"),
        ("epsilon remaining", f"{budget.remaining:.6g}"),
        ("charges", str(budget.charges)),
        ("refusals", str(budget.refusals)),
        ("head hash", ledger.head_hash()),
        ("generated", dt.datetime.now(dt.UTC).isoformat()),
    ]
    rows_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary)
    header = "".join(f"<th>{esc(name)}</th>" for name in ENTRY_FIELDS)
    body = "".join(
        f'<tr class="{esc(e.kind)}">'
        + "".join(f"<td>{esc(str(v))}</td>" for v in e.as_dict().values())
        + "</tr>"
        for e in entries
    )
    css_class = "ok" if intact else "bad"
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>Privacy budget report: {esc(ledger.site)}</title><style>{_STYLE}</style>"
        f"</head><body><h1>Privacy budget report: {esc(ledger.site)}</h1>"
        f'<p class="{css_class}">{esc(status)}</p>'
        f"<table>{rows_html}</table>"
        f"<h2>Cumulative epsilon</h2>{_svg(entries, ledger.cap_epsilon)}"
        f"<h2>Entries</h2><table><tr>{header}</tr>{body}</table>"
        "</body></html>\n"
    )


def write_report(ledger: Ledger, out: Path) -> Path:
    """Write a report of a ledger: ``.html`` (self-contained) or ``.csv`` (one row per entry).

    Args:
        ledger: The ledger to report on.
        out: Output path; its suffix picks the format.

    Returns:
        ``out``.

    Raises:
        ValueError: If the suffix is neither ``.html`` nor ``.csv``.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise ValueError(f"report --out must end in one of {REPORT_SUFFIXES}, got {str(out)!r}")
    if suffix == ".html":
        out.write_text(_html(ledger), encoding="utf-8")
        return out
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ENTRY_FIELDS))
        writer.writeheader()
        for entry in ledger.entries():
            writer.writerow(entry.as_dict())
    return out
