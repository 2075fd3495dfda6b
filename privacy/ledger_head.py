"""Signed ledger heads: a copy of a site's ledger state kept off the node, so a rewritten ledger
is detectable.

A ledger's hash chain shows that no row was edited *in place*; whoever can write the file can still
recompute the whole chain with other numbers, cut rows off the end, or put back an older backup.
So with every reply a node sends its ledger's **head**: the last row's hash, the number of rows,
the epsilon spent, the cap, delta and accountant, signed with the node's private key (the
SuperNode's ECDSA P-384 key). The server keeps every head it receives. A ledger is then checked
against that record (:func:`check_against_record`): each recorded head must still be a row of the
ledger's chain with the same hash, and the ledger must not hold fewer rows than the server has seen.

Every field of a head is data-independent (docs/privacy.md, "Signed ledger heads"): the rows it
hashes hold only public configuration and the accountant's output for the charged
``(sigma, q, steps)``.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.accounting import epsilon_for
from privacy.errors import LedgerError, LedgerRecordMismatchError, LedgerSignatureError
from privacy.ledger import KIND_CHARGE, Ledger

SIGNATURE_HASH = hashes.SHA384()  # the hash that goes with a P-384 key
UNSIGNED = ""  # signature and public key of a head from a node without a configured key


@dataclass(frozen=True)
class LedgerHead:
    """A site's ledger state at one moment, optionally signed by the node's key.

    Attributes:
        site: The ledger's site.
        head_hash: Hash of the last row (the genesis hash of an empty ledger).
        entries: Number of rows (charges and refusals).
        epsilon_spent: Epsilon of every charge composed (ledger's accountant and delta).
        cap_epsilon: The site's cap.
        delta: The ledger's delta.
        accountant: The ledger's accountant.
        public_key: The signer's public key, one OpenSSH line ("" when unsigned).
        signature: Base64 DER ECDSA signature over :meth:`payload` ("" when unsigned).
    """

    site: str
    head_hash: str
    entries: int
    epsilon_spent: float
    cap_epsilon: float
    delta: float
    accountant: str
    public_key: str = UNSIGNED
    signature: str = UNSIGNED

    @property
    def signed(self) -> bool:
        """Whether the head carries a signature."""
        return bool(self.signature)

    def payload(self) -> bytes:
        """The canonical bytes that are signed: every field but the key and the signature."""
        values = {k: v for k, v in asdict(self).items() if k not in ("public_key", "signature")}
        return json.dumps(values, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        """All fields (JSON-serialisable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LedgerHead:
        """Inverse of :meth:`to_dict`.

        Raises:
            LedgerError: a field is missing or has the wrong type.
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                if f.name in ("public_key", "signature"):
                    continue
                raise LedgerError(f"ledger head lacks {f.name!r}; it is not a fedfew ledger head")
            kwargs[f.name] = values[f.name]
        try:
            head = cls(
                **{
                    **kwargs,
                    "entries": int(kwargs["entries"]),
                    "epsilon_spent": float(kwargs["epsilon_spent"]),
                    "cap_epsilon": float(kwargs["cap_epsilon"]),
                    "delta": float(kwargs["delta"]),
                }
            )
        except (TypeError, ValueError) as exc:
            raise LedgerError(f"ledger head has a malformed field: {exc}") from exc
        if not math.isfinite(head.epsilon_spent) or head.entries < 0:
            raise LedgerError(f"ledger head holds impossible values: {head.to_dict()}")
        return head


def read_head(ledger: Ledger) -> LedgerHead:
    """The ledger's current head, unsigned, read from one snapshot of its rows."""
    rows = ledger.entries()
    charges = [e for e in rows if e.kind == KIND_CHARGE]
    history = [(e.accounted_noise_multiplier, e.sample_rate, e.steps) for e in charges]
    return LedgerHead(
        site=ledger.site,
        head_hash=rows[-1].hash if rows else ledger.genesis_hash(),
        entries=len(rows),
        epsilon_spent=epsilon_for(history, delta=ledger.delta, accountant=ledger.accountant),
        cap_epsilon=ledger.cap_epsilon,
        delta=ledger.delta,
        accountant=ledger.accountant,
    )


def load_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The node's private key (OpenSSH format, as `fedfew node init` writes it).

    Raises:
        LedgerSignatureError: missing, unreadable, encrypted or not an elliptic-curve key.
    """
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise LedgerSignatureError(
            f"node key {path} is unusable for signing ledger heads ({type(exc).__name__}); "
            "set node-key to the SuperNode's private key from `fedfew node init`"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise LedgerSignatureError(f"node key {path} is not an ECDSA key; use the SuperNode's key")
    return key


def public_key_line(key: ec.EllipticCurvePublicKey) -> str:
    """A public key as one OpenSSH line (the form `flwr supernode register` takes)."""
    raw = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return raw.decode("ascii")


def sign_head(head: LedgerHead, key: ec.EllipticCurvePrivateKey) -> LedgerHead:
    """``head`` with the signer's public key and an ECDSA signature over its payload."""
    signature = key.sign(head.payload(), ec.ECDSA(SIGNATURE_HASH))
    return LedgerHead(
        **{
            **head.to_dict(),
            "public_key": public_key_line(key.public_key()),
            "signature": base64.b64encode(signature).decode("ascii"),
        }
    )


def verify_signature(head: LedgerHead, public_key: str | None = None) -> None:
    """Check a signed head against ``public_key`` (an OpenSSH line), else its own key.

    Raises:
        LedgerSignatureError: unsigned, a key that does not parse, or a signature that does not
            verify (the head was altered or signed by another key).
    """
    if not head.signed:
        raise LedgerSignatureError(f"ledger head of site {head.site!r} is unsigned")
    line = public_key if public_key is not None else head.public_key
    try:
        key = serialization.load_ssh_public_key(line.strip().encode("ascii"))
        signature = base64.b64decode(head.signature, validate=True)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise LedgerSignatureError(
            f"ledger head of site {head.site!r}: unreadable key or signature ({exc})"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise LedgerSignatureError(f"ledger head of site {head.site!r}: not an ECDSA public key")
    try:
        key.verify(signature, head.payload(), ec.ECDSA(SIGNATURE_HASH))
    except InvalidSignature:
        raise LedgerSignatureError(
            f"ledger head of site {head.site!r} at {head.entries} rows: the signature does not "
            "verify with the site's key"
        ) from None


@dataclass(frozen=True)
class RecordedHead:
    """A head as the server recorded it, with the round it came with."""

    round: int
    head: LedgerHead

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"round": r, **head}``."""
        return {"round": self.round, **self.head.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RecordedHead:
        """Inverse of :meth:`to_dict`.

        Raises:
            LedgerError: malformed.
        """
        try:
            server_round = int(values["round"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"recorded ledger head lacks a round: {exc}") from exc
        return cls(server_round, LedgerHead.from_dict(values))


def check_against_record(ledger: Ledger, record: Iterable[RecordedHead]) -> int:
    """Check a ledger against the heads a server recorded for its site.

    The ledger's own chain is verified first. Then every recorded head must be the ledger's
    chain hash at that row count (else the chain was rebuilt with other rows), and the ledger must
    hold at least as many rows as the latest recorded head (else it was truncated or rolled back).
    Signed heads are checked against their key, and every signed head must carry the same key.

    Returns:
        The number of recorded heads checked.

    Raises:
        LedgerTamperedError: the ledger's own chain does not verify.
        LedgerRecordMismatchError: the ledger disagrees with the record (the message says how).
        LedgerSignatureError: a recorded head's signature does not verify.
    """
    ledger.verify()
    heads = sorted(
        (r for r in record if r.head.site == ledger.site), key=lambda r: (r.head.entries, r.round)
    )
    if not heads:
        raise LedgerRecordMismatchError(
            f"the server record holds no head of site {ledger.site!r}; nothing to compare"
        )
    keys = {r.head.public_key for r in heads if r.head.signed}
    if len(keys) > 1:
        raise LedgerSignatureError(
            f"the server record holds heads of site {ledger.site!r} signed by {len(keys)} keys"
        )
    for recorded in heads:
        if recorded.head.signed:
            verify_signature(recorded.head)
    chain = [ledger.genesis_hash(), *(e.hash for e in ledger.entries())]
    latest = heads[-1]
    if latest.head.entries >= len(chain):
        rolled = [r for r in heads if r.head.entries == len(chain) - 1]
        how = (
            f"rolled back to its state of round {rolled[-1].round}"
            if rolled and rolled[-1].head.head_hash == chain[-1]
            else "truncated or rolled back"
        )
        raise LedgerRecordMismatchError(
            f"ledger of site {ledger.site!r} has {len(chain) - 1} rows but the server recorded "
            f"{latest.head.entries} at round {latest.round}: {how}"
        )
    for recorded in heads:
        if chain[recorded.head.entries] != recorded.head.head_hash:
            raise LedgerRecordMismatchError(
                f"ledger of site {ledger.site!r} was rebuilt: row {recorded.head.entries} does "
                f"not match the head the server recorded at round {recorded.round}"
            )
    return len(heads)
