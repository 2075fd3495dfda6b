"""What the federation page shows: model versions and their metrics from this node's registry,
the sites' privacy reports per version, SuperLink reachability and the federation's status file.

Read-only, and without Flower: the dashboard must run on a machine where the federation is not
installed or not running.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import RegistryError
from models.registry import Registry, RegistryEntry
from privacy.errors import ReportFormatError
from privacy.site_report import HeadCheck, SitePrivacyReport

NO_STATUS = "no federation status yet"


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


def metric_series(entries: list[RegistryEntry]) -> list[dict[str, Any]]:
    """Numeric metrics of global versions as (version, round, metric, value) rows for a chart.

    The round is the version's ``info.round`` when the federation recorded one, else the id.
    """
    rows = []
    for e in entries:
        if e.kind != "global":
            continue
        round_no = e.info.get("round", e.id)
        for name, value in flatten(e.metrics).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                rows.append({"version": e.id, "round": round_no, "metric": name, "value": value})
    return rows


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


def status_rows(path: Path | None) -> tuple[list[dict[str, Any]] | None, str]:
    """The federation status file as table rows, with a one-line summary.

    A list of objects (e.g. nodes) gives one row each; an object gives key/value rows, with
    lists of objects inside it (``"nodes": [...]``) expanded to one row per item.

    Returns:
        ``(None, NO_STATUS)`` when no file is configured or it does not exist yet.

    Raises:
        RegistryError: the file exists but is not JSON (named so the page shows one message).
    """
    if path is None or not path.is_file():
        return None, NO_STATUS
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"federation status {path} is unreadable: {exc}") from exc
    if isinstance(data, list):
        rows = [flatten(d) if isinstance(d, dict) else {"value": d} for d in data]
        return rows, f"{len(rows)} entries"
    if not isinstance(data, dict):
        return [{"value": data}], "1 value"
    rows = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            rows += [{"key": f"{key}[{i}]", **flatten(v)} for i, v in enumerate(value)]
        else:
            rows.append(
                {
                    "key": key,
                    "value": json.dumps(value) if isinstance(value, dict | list) else value,
                }
            )
    return rows, f"{len(data)} fields"
