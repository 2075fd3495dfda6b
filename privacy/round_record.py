"""What the federation server records of each round, and the status file it writes after every
round: typed, in one place, read and written in the JSON form the checkpoint's history, the
registry's version info and ``status.json`` have always held (kebab-case keys).

A lower layer than federation/ (as :mod:`privacy.site_report` is) and without Flower, so that
the demo and the dashboard read these files with the same types the server writes them with.
Every field is public: configuration, the gate's findings, the sites' accounted privacy reports
and metrics on the server's public evaluation set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.errors import ReportFormatError
from privacy.site_report import SitePrivacyReport

# Keys of a round record (the checkpoint's history, the status file's rounds).
ROUND = "round"
SECONDS = "seconds"
BYTES_SENT = "bytes-sent-per-node"
ATTEMPTS = "attempts"
SITES = "sites"
BYTES_RECEIVED = "bytes-received"
CLIPPED = "clipped"
PROBLEMS = "problems"
PROTOTYPES = "prototypes"
SECURE_AGGREGATION = "secure-aggregation"
METRICS = "metrics"
# Keys of the status file.
STATUS_FEDERATION = "federation"
STATUS_ROUND = "round"
STATUS_NODES = "nodes-connected"
STATUS_UPDATED = "updated"
STATUS_ROUNDS = "rounds"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC


@dataclass(frozen=True)
class SecureSum:
    """What the gate found in a SecAgg+ round's unmasked sum (public: the sum is the release)."""

    contributors: int  # sites in the sum
    sum_norm: float  # its L2 norm
    sum_bound: float  # the longest sum the contributors could honestly make
    bytes_received: int  # every stage's replies, all nodes together

    def to_dict(self) -> dict[str, Any]:
        """The record's ``secure-aggregation`` object."""
        return {
            "contributors": self.contributors,
            "sum-norm": self.sum_norm,
            "sum-bound": self.sum_bound,
            "bytes-received": self.bytes_received,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SecureSum:
        """Inverse of :meth:`to_dict`."""
        return cls(
            contributors=int(values["contributors"]),
            sum_norm=float(values["sum-norm"]),
            sum_bound=float(values["sum-bound"]),
            bytes_received=int(values["bytes-received"]),
        )


@dataclass(frozen=True)
class PrototypeSummary:
    """A dp-prototypes round's summed release, as public metadata: vocabulary and sites."""

    classes: tuple[str, ...]
    sites: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The record's ``prototypes`` object."""
        return {"classes": list(self.classes), "sites": list(self.sites)}


@dataclass(frozen=True)
class RoundRecord:
    """One round as the server records it (round 0: the start model, evaluated, no replies).

    Attributes:
        round: The round (0 for the initial model).
        seconds: Time to collect the round's replies.
        bytes_sent_per_node: Size of the global model sent to each node.
        attempts: Attempts the round took (0 for round 0).
        sites: Each accepted site's privacy report.
        bytes_received: Bytes of each accepted site's reply (none under SecAgg+).
        clipped: Sites whose delta the gate clipped (none under SecAgg+: data-dependent).
        problems: Every problem seen (public reason codes, silences, the gate's findings).
        metrics: Few-shot metrics of the round's model on the server's public set.
        secure_aggregation: What the gate found in the unmasked sum (SecAgg+ rounds only).
        prototypes: The summed release's metadata (dp-prototypes rounds only).
    """

    round: int
    seconds: float
    bytes_sent_per_node: int
    attempts: int
    sites: dict[str, SitePrivacyReport] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    clipped: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    secure_aggregation: SecureSum | None = None
    prototypes: PrototypeSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (key order as the server has always written it)."""
        out: dict[str, Any] = {
            ROUND: self.round,
            SECONDS: self.seconds,
            BYTES_SENT: self.bytes_sent_per_node,
            ATTEMPTS: self.attempts,
            SITES: {site: report.to_dict() for site, report in self.sites.items()},
            BYTES_RECEIVED: dict(self.bytes_received),
            CLIPPED: list(self.clipped),
            PROBLEMS: list(self.problems),
        }
        if self.secure_aggregation is not None:
            out[SECURE_AGGREGATION] = self.secure_aggregation.to_dict()
        if self.prototypes is not None:
            out[PROTOTYPES] = self.prototypes.to_dict()
        out[METRICS] = dict(self.metrics)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RoundRecord:
        """Inverse of :meth:`to_dict`.

        Raises:
            ReportFormatError: a key is missing or a value has the wrong form (naming it).
        """
        try:
            secure = values.get(SECURE_AGGREGATION)
            prototypes = values.get(PROTOTYPES)
            return cls(
                round=int(values[ROUND]),
                seconds=float(values[SECONDS]),
                bytes_sent_per_node=int(values[BYTES_SENT]),
                attempts=int(values[ATTEMPTS]),
                sites={
                    str(site): SitePrivacyReport.from_dict(report)
                    for site, report in dict(values[SITES]).items()
                },
                bytes_received={str(k): int(v) for k, v in dict(values[BYTES_RECEIVED]).items()},
                clipped=tuple(str(s) for s in values[CLIPPED]),
                problems=tuple(str(p) for p in values[PROBLEMS]),
                metrics={str(k): float(v) for k, v in dict(values[METRICS]).items()},
                secure_aggregation=None if secure is None else SecureSum.from_dict(secure),
                prototypes=None
                if prototypes is None
                else PrototypeSummary(
                    tuple(str(c) for c in prototypes["classes"]),
                    tuple(str(s) for s in prototypes["sites"]),
                ),
            )
        except KeyError as exc:
            raise ReportFormatError(f"round record lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise ReportFormatError(f"round record is malformed: {exc}") from exc


@dataclass(frozen=True)
class FederationStatus:
    """The server's ``status.json``: where the federation is, for the IT page and the demo."""

    federation: str
    round: int  # last completed round
    nodes_connected: int  # when the file was written
    updated: str  # UTC, TIME_FORMAT
    rounds: tuple[RoundRecord, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            STATUS_FEDERATION: self.federation,
            STATUS_ROUND: self.round,
            STATUS_NODES: self.nodes_connected,
            STATUS_UPDATED: self.updated,
            STATUS_ROUNDS: [r.to_dict() for r in self.rounds],
        }

    def write(self, path: Path) -> Path:
        """Write the status file (atomic replace: a reader sees the old one or the new one)."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> FederationStatus:
        """The status file at ``path``.

        Raises:
            OSError: it cannot be read (not written yet).
            ReportFormatError: it is not a status file (naming what is wrong).
        """
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                federation=str(values[STATUS_FEDERATION]),
                round=int(values[STATUS_ROUND]),
                nodes_connected=int(values[STATUS_NODES]),
                updated=str(values[STATUS_UPDATED]),
                rounds=tuple(RoundRecord.from_dict(r) for r in values[STATUS_ROUNDS]),
            )
        except KeyError as exc:
            raise ReportFormatError(f"status file {path} lacks {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise ReportFormatError(f"status file {path} is malformed: {exc}") from exc
