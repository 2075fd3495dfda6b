"""A site's privacy report for one round: the one record that goes from a node's ledger through
the federation (a Flower ConfigRecord) into the server's registry (JSON) and the dashboard.

Every field is public configuration or the accountant's output for the charged ``(sigma, q,
steps)`` history, plus the site's signed ledger head (:mod:`privacy.ledger_head`): nothing in it
depends on the site's data (docs/privacy.md, "Federated rounds").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from models.errors import RegistryError
from models.registry import Registry
from models.run_config import flatten, key_of, read_fields
from privacy.errors import LedgerError, ReportFormatError
from privacy.ledger import LedgerEntry
from privacy.ledger_head import UNSIGNED, LedgerHead, RecordedHead


class HeadCheck(StrEnum):
    """What the server found when it checked a report's ledger head."""

    UNCHECKED = "unchecked"  # as the node sends it, before the server looks
    UNSIGNED = "unsigned"  # the node has no node-key configured: nothing to verify
    REGISTERED_KEY = "registered-key"  # verified with the key the operator registered
    CARRIED_KEY = "carried-key"  # verified with the key it carries (no registered key on file)


# The keys that are not the field's kebab-case name (every other key is; models/run_config.py).
_KEYS = {
    "site": "site-id",
    "public_key": "head-public-key",
    "signature": "head-signature",
}
NOT_REPORTED = -1.0  # a report from a node that predates the field
_OWNER = "privacy report"


@dataclass(frozen=True)
class SitePrivacyReport:
    """One site's accounted privacy numbers for one round, and its ledger head.

    Attributes:
        site: Public name of the site.
        weight: Public aggregation weight p_k (configured, never a count).
        round: The round the report answers.
        replayed: Whether the reply was a stored one sent again (no new charge).
        ledger_entry: Id of the ledger row charged for this round.
        epsilon_round: Epsilon this round's charge added.
        epsilon_spent: The site's epsilon after every charge so far.
        epsilon_cap: The site's cap.
        delta: Delta of every epsilon on the site's ledger.
        accountant: ``"rdp"`` or ``"prv"``.
        mechanism: The DP mechanism that was charged.
        noise_multiplier: Sigma of the charge (before the sensitivity factor).
        sample_rate: Poisson sampling rate q of the charge.
        steps: Noisy steps of the charge.
        head_hash: The ledger's head hash after the charge.
        head_entries: The ledger's number of rows after the charge.
        public_key: The node's public key (OpenSSH line), "" when unsigned.
        signature: Signature over the ledger head, "" when unsigned.
        head_check: What the server found (:class:`HeadCheck`).
        epsilon_round_if_secagg_fails: This round's epsilon if secure aggregation failed (the
            server saw this site's update): larger than ``epsilon_round`` only under distributed
            noise, where the site added a share of the noise (privacy/distributed_noise.py).
        epsilon_spent_if_secagg_fails: The site's total under that weaker assumption.
    """

    site: str
    weight: float
    round: int
    replayed: bool
    ledger_entry: int
    epsilon_round: float
    epsilon_spent: float
    epsilon_cap: float
    delta: float
    accountant: str
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    head_hash: str
    head_entries: int
    public_key: str = UNSIGNED
    signature: str = UNSIGNED
    head_check: str = HeadCheck.UNCHECKED.value
    epsilon_round_if_secagg_fails: float = NOT_REPORTED
    epsilon_spent_if_secagg_fails: float = NOT_REPORTED

    def __post_init__(self) -> None:
        if not self.site.strip():
            raise ReportFormatError("privacy report: site-id must not be empty")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ReportFormatError(f"privacy report: weight must be > 0, got {self.weight!r}")
        for name in ("epsilon_round", "epsilon_spent", "epsilon_cap"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ReportFormatError(f"privacy report: {key_of(name)} is {value!r}")
        if self.head_check not in {c.value for c in HeadCheck}:
            raise ReportFormatError(f"privacy report: unknown head-check {self.head_check!r}")

    @property
    def head(self) -> LedgerHead:
        """The ledger head the report carries (signed when the node has a key)."""
        return LedgerHead(
            site=self.site,
            head_hash=self.head_hash,
            entries=self.head_entries,
            epsilon_spent=self.epsilon_spent,
            cap_epsilon=self.epsilon_cap,
            delta=self.delta,
            accountant=self.accountant,
            public_key=self.public_key,
            signature=self.signature,
        )

    @property
    def signed(self) -> bool:
        """Whether the ledger head is signed."""
        return bool(self.signature)

    def to_dict(self) -> dict[str, Any]:
        """Flat kebab-case mapping: what a Flower ConfigRecord and the registry's JSON hold."""
        return flatten(self, keys=_KEYS)

    @classmethod
    def of_charge(
        cls,
        entry: LedgerEntry,
        head: LedgerHead,
        *,
        site: str,
        weight: float,
        round: int,
        replayed: bool,
    ) -> SitePrivacyReport:
        """The report of one round's ledger charge ``entry`` under the ledger's ``head``."""
        return cls(
            site=site,
            weight=weight,
            round=round,
            replayed=replayed,
            ledger_entry=entry.id,
            epsilon_round=entry.epsilon_after - entry.epsilon_before,
            epsilon_spent=head.epsilon_spent,
            epsilon_cap=head.cap_epsilon,
            delta=head.delta,
            accountant=head.accountant,
            mechanism=entry.mechanism,
            noise_multiplier=entry.noise_multiplier,
            sample_rate=entry.sample_rate,
            steps=entry.steps,
            head_hash=head.head_hash,
            head_entries=head.entries,
            public_key=head.public_key,
            signature=head.signature,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SitePrivacyReport:
        """Inverse of :meth:`to_dict`.

        Raises:
            ReportFormatError: a key is missing or unknown, or a value has the wrong type.
        """
        kwargs = read_fields(cls, values, owner=_OWNER, keys=_KEYS, error=ReportFormatError)
        return cls(**kwargs)


def recorded_heads(source: Path, *, site: str) -> list[RecordedHead]:
    """The ledger heads of ``site`` that a server recorded, by round.

    Args:
        source: The server's registry folder (each global version holds every site's report
            for its round), or a JSON file: a list of :meth:`RecordedHead.to_dict` objects
            (what :func:`write_heads` exports).
        site: The site whose heads to read.

    Raises:
        LedgerError: the source is missing or unreadable, or holds a malformed report or head.
    """
    source = Path(source)
    if source.is_file():
        try:
            items = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LedgerError(f"server record {source} is unreadable: {exc}") from exc
        if not isinstance(items, list):
            raise LedgerError(f"server record {source} must be a JSON list of ledger heads")
        heads = [RecordedHead.from_dict(item) for item in items]
        return [h for h in heads if h.head.site == site]
    try:
        versions = Registry.open(source).entries(kind="global")
    except RegistryError as exc:
        raise LedgerError(f"server record {source}: {exc}") from exc
    found = []
    for version in versions:
        report = version.privacy.get(site)
        if report is None:
            continue
        try:
            parsed = SitePrivacyReport.from_dict(report)
        except ReportFormatError as exc:
            raise LedgerError(f"server record {source}, {version.label}: {exc}") from exc
        found.append(RecordedHead(parsed.round, parsed.head))
    return found


def write_heads(heads: list[RecordedHead], out: Path) -> Path:
    """Export recorded heads as JSON (the form :func:`recorded_heads` reads back)."""
    out = Path(out)
    out.write_text(json.dumps([h.to_dict() for h in heads], indent=2), encoding="utf-8")
    return out
