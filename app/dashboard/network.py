"""What the federation page shows: model versions and their metrics from this node's registry,
the sites' privacy reports per version, SuperLink reachability and the federation's status file.

Read-only, and without Flower: the dashboard must run on a machine where the federation is not
installed or not running.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import RegistryError
from models.registry import Registry, RegistryEntry
from privacy.errors import ReportFormatError
from privacy.site_report import HeadCheck, SitePrivacyReport

NO_STATUS = "no federation status yet"
# The server writes its status after every round (tens of seconds to minutes apart); ten
# minutes without a write means no run is progressing, so its node count is history, not "now".
STALE_AFTER_S = 600.0
# Keys of the status file (federation/rounds.py write_status).
STATUS_FEDERATION = "federation"
STATUS_ROUND = "round"
STATUS_NODES = "nodes-connected"
STATUS_UPDATED = "updated"
STATUS_ROUNDS = "rounds"
ROUND_METRICS = "metrics."  # a round record's evaluation metrics, flattened


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def flatten(value: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts as dotted keys; lists as JSON text (a table cell holds one value)."""
    out: dict[str, Any] = {}
    _flat("", value, out)
    return out


def version_rows(entries: list[RegistryEntry]) -> list[dict[str, Any]]:
    """One row per version: id, name, created, parent, code version, then metrics and info."""
    rows = []
    for e in entries:
        row: dict[str, Any] = {
            "version": e.id,
            "kind": e.kind,
            "name": e.name,
            "created": e.created,
            "parent": e.parent,
            "code_version": e.code_version,
        }
        row.update({f"metrics.{k}": v for k, v in flatten(e.metrics).items()})
        row.update({f"info.{k}": v for k, v in flatten(e.info).items()})
        rows.append(row)
    return rows


def metric_series(
    entries: list[RegistryEntry],
    *,
    rounds: Sequence[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The model's evaluation metrics per round as (round, metric, value) rows for a chart: from
    the federation's status file (``rounds``, flattened records with ``metrics.<name>``), else
    from the global versions in this node's registry (``info.round``). Bookkeeping numbers
    (seconds, bytes, attempts) are not metrics of the model and are left out.
    """
    points: dict[tuple[int, str], float] = {}
    for record in rounds:
        number = record.get("round")
        if not isinstance(number, int) or isinstance(number, bool):
            continue
        for key, value in record.items():
            if key.startswith(ROUND_METRICS) and _number(value):
                points[(number, key.removeprefix(ROUND_METRICS))] = float(value)
    for e in entries:
        number = e.info.get("round")
        if e.kind != "global" or not isinstance(number, int) or isinstance(number, bool):
            continue
        for name, value in flatten(e.metrics).items():
            if _number(value):
                points.setdefault((number, name), float(value))
    return [
        {"round": number, "metric": name, "value": value}
        for (number, name), value in sorted(points.items())
    ]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def chartable(series: list[dict[str, Any]]) -> bool:
    """Whether a line chart says anything: some metric has values from two rounds or more."""
    rounds: dict[str, set[int]] = {}
    for row in series:
        rounds.setdefault(row["metric"], set()).add(row["round"])
    return any(len(r) > 1 for r in rounds.values())


UNSIGNED = (
    "unsigned: the node has no node-key; a rewrite is still detected against the recorded "
    "head, but the record is not signed by the site"
)
HEAD_CHECKS = {
    HeadCheck.REGISTERED_KEY.value: "signed, verified with the site's registered key",
    HeadCheck.CARRIED_KEY.value: "signed, verified with the key it carries (none registered)",
    HeadCheck.UNSIGNED.value: UNSIGNED,
    HeadCheck.UNCHECKED.value: "not checked by a server",
}


def privacy_rows(entries: list[RegistryEntry]) -> list[dict[str, Any]]:
    """One row per (version, site) privacy report, with what the server found of its ledger
    head; a report that is not a :class:`SitePrivacyReport` gives a row that says so."""
    rows: list[dict[str, Any]] = []
    for e in entries:
        for site, raw in sorted(e.privacy.items()):
            try:
                report = SitePrivacyReport.from_dict(raw)
            except ReportFormatError as exc:
                rows.append({"version": e.id, "name": e.name, "site": site, "error": str(exc)})
                continue
            values = report.to_dict()
            for key in ("site-id", "head-public-key", "head-signature"):  # the check says enough
                values.pop(key)
            values["head-check"] = HEAD_CHECKS[report.head_check]
            rows.append({"version": e.id, "name": e.name, "site": report.site, **values})
    return rows


def registry_entries(path: Path) -> list[RegistryEntry]:
    """Every version of the registry, oldest first.

    Raises:
        RegistryError: no registry at ``path``.
    """
    return Registry.open(path).entries()


@dataclass(frozen=True)
class Reachability:
    """Outcome of a TCP connect to the SuperLink."""

    reachable: bool
    detail: str


def check_reachable(host: str, port: int, *, timeout_s: float) -> Reachability:
    """Try a TCP connection (and close it at once); no Flower protocol is spoken."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:  # refused, timed out, unknown host: all mean "unreachable"
        reason = exc.strerror or type(exc).__name__
        return Reachability(False, f"{host}:{port} unreachable ({reason})")
    return Reachability(True, f"{host}:{port} reachable")


def arrow_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with every column of mixed value types turned into text: a table column of
    numbers and strings cannot be shown as is (Streamlit logs a traceback and guesses)."""
    kinds: dict[str, set[type]] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                kinds.setdefault(key, set()).add(bool if isinstance(value, bool) else type(value))
    mixed = {k for k, v in kinds.items() if len(v - {int, float}) > 0 and len(v) > 1}
    mixed |= {k for k, v in kinds.items() if v & {dict, list}}
    return [
        {
            k: (json.dumps(v) if isinstance(v, dict | list) else str(v))
            if k in mixed and v is not None
            else v
            for k, v in row.items()
        }
        for row in rows
    ]


@dataclass(frozen=True)
class FederationStatus:
    """What the federation server last reported, and how long ago."""

    federation: str
    round: int | None
    nodes_reported: int | None  # nodes connected when the server last wrote the file
    updated: dt.datetime | None
    age_s: float | None  # seconds since ``updated``; None when the file has no time
    rounds: list[dict[str, Any]] = field(default_factory=list)  # flattened, for a table
    records: list[dict[str, Any]] = field(default_factory=list)  # as written, for summaries

    @property
    def stale(self) -> bool:
        """Whether the report is too old to describe the federation now."""
        return self.age_s is None or self.age_s > STALE_AFTER_S


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def read_status(path: Path | None, *, now: dt.datetime | None = None) -> FederationStatus | None:
    """The federation's status file, or None when none is configured or written yet.

    Raises:
        RegistryError: the file exists but is not a JSON object (one message for the page).
    """
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"federation status {path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"federation status {path} is not a JSON object")
    now = now or dt.datetime.now(dt.UTC)
    updated = None
    raw = data.get(STATUS_UPDATED)
    if isinstance(raw, str):
        try:
            updated = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            updated = None
    if updated is not None and updated.tzinfo is None:
        updated = updated.replace(tzinfo=dt.UTC)
    rounds = data.get(STATUS_ROUNDS)
    number = data.get(STATUS_ROUND)
    nodes = data.get(STATUS_NODES)
    return FederationStatus(
        federation=str(data.get(STATUS_FEDERATION, "")),
        round=number if isinstance(number, int) else None,
        nodes_reported=nodes if isinstance(nodes, int) else None,
        updated=updated,
        age_s=(now - updated).total_seconds() if updated is not None else None,
        rounds=[flatten(r) for r in rounds if isinstance(r, dict)]
        if isinstance(rounds, list)
        else [],
        records=[r for r in rounds if isinstance(r, dict)] if isinstance(rounds, list) else [],
    )


def status_sentence(status: FederationStatus, *, superlink_up: bool | None) -> str:
    """The status in words: what was reported, when, and whether it still holds."""
    nodes = "?" if status.nodes_reported is None else str(status.nodes_reported)
    what = f"round {status.round if status.round is not None else '?'}, {nodes} node(s) connected"
    if status.age_s is None:
        return f"The server reported {what}, at an unknown time: nodes connected now are unknown."
    ago = _age(status.age_s)
    if status.stale:
        down = " and the SuperLink does not answer" if superlink_up is False else ""
        return (
            f"Last report {ago} ago ({what} then). Nothing reported for over "
            f"{_age(STALE_AFTER_S)}{down}: no run is in progress, or it stopped. Nodes "
            "connected now: unknown."
        )
    return f"Running: {what} (reported {ago} ago)."


def _spans(numbers: Sequence[int]) -> str:
    """``[1, 2, 3, 5]`` as ``"1-3, 5"``."""
    parts: list[str] = []
    ordered = sorted(set(numbers))
    start = prev = ordered[0] if ordered else 0
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def node_summaries(status: FederationStatus) -> list[str]:
    """What each site did, in words, from the server's round records: the rounds it took part
    in and missed, the last one (and how long ago the server reported), whether its update was
    clipped, the epsilon its last report says it has spent; then the problems the server
    recorded (silent or refused nodes), per round."""
    taken: dict[str, list[int]] = {}
    clipped: dict[str, list[int]] = {}
    spent: dict[str, float] = {}
    problems: list[str] = []
    rounds: list[int] = []
    for record in status.records:
        number = record.get("round")
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            continue  # round 0 is the starting model: no site takes part
        rounds.append(number)
        sites = record.get("sites")
        for site, report in sites.items() if isinstance(sites, dict) else ():
            taken.setdefault(str(site), []).append(number)
            value = report.get("epsilon_spent") if isinstance(report, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                spent[str(site)] = float(value)
        for site in record.get("clipped") or ():
            clipped.setdefault(str(site), []).append(number)
        problems += [f"round {number}: {p}" for p in record.get("problems") or ()]
    last = max(rounds, default=None)
    ago = f", reported {_age(status.age_s)} ago" if status.age_s is not None else ""
    lines = []
    for site, numbers in sorted(taken.items()):
        missed = [n for n in rounds if n > min(numbers) and n not in numbers]
        text = f"**{site}**: took part in round(s) {_spans(numbers)}"
        text += f"; missed {_spans(missed)}" if missed else ""
        text += f"; last seen in round {max(numbers)}" + (
            f" (the latest{ago})" if max(numbers) == last else f" (the latest is {last})"
        )
        if site in clipped:
            text += f"; its update was clipped to the bound in round(s) {_spans(clipped[site])}"
        if site in spent:
            text += f"; its last report says ε {spent[site]:.2f} spent"
        lines.append(text + ".")
    lines += [f"Problem in {p}." for p in problems]
    return lines
