"""Per-site privacy budget ledger: SQLite (WAL), append-only, hash-chained, fail-closed.

Every charge is decided inside one ``BEGIN IMMEDIATE`` transaction: read the history, compose the
requested steps with it, and either append a ``charge`` row or append a ``refusal`` row and raise
``BudgetExhaustedError``. Callers charge *before* any DP computation, so a refused run computes
nothing. SQLite's atomic commit makes concurrent writers serialise and a killed writer leave
either the whole row (and the updated head) or nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from models.version import code_version
from privacy.accounting import ACCOUNTANTS, epsilon_for, load_accountants
from privacy.errors import BudgetExhaustedError, LedgerError, LedgerTamperedError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0  # writers queue behind short transactions; slack for a loaded machine
KIND_CHARGE = "charge"
KIND_REFUSAL = "refusal"

# Every entry field, with the type it is coerced to before hashing, in table order.
ENTRY_FIELDS: dict[str, type] = {
    "id": int,
    "time": str,
    "kind": str,
    "run_id": str,
    "round": int,
    "mechanism": str,
    "noise_multiplier": float,
    "sensitivity_factor": float,
    "accounted_noise_multiplier": float,
    "sample_rate": float,
    "steps": int,
    "delta": float,
    "epsilon_before": float,
    "epsilon_after": float,
    "accountant": str,
    "code_version": str,
    "requester": str,
    "prev_hash": str,
    "hash": str,
}
META_FIELDS: dict[str, type] = {
    "schema_version": int,
    "site": str,
    "cap_epsilon": float,
    "delta": float,
    "accountant": str,
    "created": str,
}
_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT"}

_SCHEMA = f"""
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    {", ".join(f"{k} {_SQL_TYPES[t]} NOT NULL" for k, t in META_FIELDS.items())},
    head_hash TEXT NOT NULL,
    row_count INTEGER NOT NULL
);
CREATE TABLE entries (
    id INTEGER PRIMARY KEY,
    {", ".join(f"{k} {_SQL_TYPES[t]} NOT NULL" for k, t in ENTRY_FIELDS.items() if k != "id")},
    CHECK (kind IN ('{KIND_CHARGE}', '{KIND_REFUSAL}'))
);
"""


def _canonical_hash(fields: dict[str, Any], prev_hash: str) -> str:
    # sort_keys + fixed separators + repr floats (exact for IEEE doubles) make the JSON canonical.
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256((text + prev_hash).encode("utf-8")).hexdigest()


def _genesis_hash(meta: dict[str, Any]) -> str:
    fields = {k: META_FIELDS[k](meta[k]) for k in META_FIELDS}
    return _canonical_hash(fields, "fedfew-ledger-genesis")


def _entry_hash(row: dict[str, Any]) -> str:
    fields = {k: t(row[k]) for k, t in ENTRY_FIELDS.items() if k not in ("prev_hash", "hash")}
    return _canonical_hash(fields, str(row["prev_hash"]))


@dataclass(frozen=True)
class ChargeRequest:
    """What a DP run asks the ledger for, before it computes anything.

    Attributes:
        run_id: Identifier of the run (free text, stored as is).
        round: Federated round number, >= 0.
        mechanism: Name of the DP mechanism (e.g. ``"dp-episodic"``).
        noise_multiplier: Noise std as applied to the clipping norm C (sigma), > 0.
        sensitivity_factor: L2 sensitivity in units of C (1 per-patient, 2 per-episode), > 0.
        sample_rate: Poisson sampling rate q, in (0, 1].
        steps: Number of noisy steps, >= 1.
        requester: Who or what asked (user, node id, server run).
    """

    run_id: str
    round: int
    mechanism: str
    noise_multiplier: float
    sensitivity_factor: float
    sample_rate: float
    steps: int
    requester: str

    def __post_init__(self) -> None:
        for name in ("run_id", "mechanism", "requester"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        for name, low in (("round", 0), ("steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("noise_multiplier", "sensitivity_factor"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        q = self.sample_rate
        if not isinstance(q, int | float) or not 0.0 < q <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")

    @property
    def accounted_noise_multiplier(self) -> float:
        """Noise multiplier the accountant is stepped with: sigma over the sensitivity factor."""
        return float(self.noise_multiplier) / float(self.sensitivity_factor)


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger row, exactly as stored (see ``ENTRY_FIELDS``)."""

    id: int
    time: str
    kind: str
    run_id: str
    round: int
    mechanism: str
    noise_multiplier: float
    sensitivity_factor: float
    accounted_noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon_before: float
    epsilon_after: float
    accountant: str
    code_version: str
    requester: str
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-serialisable)."""
        return asdict(self)


class Ledger:
    """A site's append-only privacy budget ledger in one SQLite file.

    Each method opens its own connection, so a ``Ledger`` can be shared by threads and the same
    file can be used by many processes at once.
    """

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        """Use ``Ledger.create`` or ``Ledger.open``; this only binds an already-read meta row."""
        self._path = Path(path)
        self._meta = meta

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        site: str,
        cap_epsilon: float,
        delta: float,
        accountant: str = "rdp",
    ) -> Ledger:
        """Create a new, empty ledger file; refuses to overwrite an existing file.

        Raises:
            LedgerError: If ``path`` already exists.
            ValueError: On an empty site, a cap that is not a finite number > 0, a delta outside
                (0, 1) or an unknown accountant.
        """
        path = Path(path)
        if not isinstance(site, str) or not site.strip():
            raise ValueError(f"site must be a non-empty string, got {site!r}")
        if not isinstance(cap_epsilon, int | float) or not (
            math.isfinite(cap_epsilon) and cap_epsilon > 0
        ):
            raise ValueError(f"cap_epsilon must be a finite number > 0, got {cap_epsilon!r}")
        if not isinstance(delta, int | float) or not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if path.exists():
            raise LedgerError(f"{path} already exists; refusing to overwrite a ledger")
        meta: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "site": site,
            "cap_epsilon": float(cap_epsilon),
            "delta": float(delta),
            "accountant": accountant,
            "created": dt.datetime.now(dt.UTC).isoformat(),
        }
        genesis = _genesis_hash(meta)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN EXCLUSIVE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            columns = [*META_FIELDS, "head_hash", "row_count"]
            conn.execute(
                f"INSERT INTO meta (id, {', '.join(columns)}) "
                f"VALUES (1, {', '.join('?' for _ in columns)})",
                [*(meta[k] for k in META_FIELDS), genesis, 0],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()
        return cls(path, meta)

    @classmethod
    def open(cls, path: str | Path) -> Ledger:
        """Open an existing ledger.

        Raises:
            LedgerError: If the file is missing, is not SQLite, or is not a fedfew ledger.
        """
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"no ledger at {path}; create one with `fedfew budget init`")
        ledger = cls(path, {})
        with ledger._connect() as conn:
            ledger._meta = ledger._read_meta(conn)
        return ledger

    # -- properties ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The ledger file."""
        return self._path

    @property
    def site(self) -> str:
        """The site this ledger belongs to."""
        return str(self._meta["site"])

    @property
    def cap_epsilon(self) -> float:
        """The site's epsilon cap."""
        return float(self._meta["cap_epsilon"])

    @property
    def delta(self) -> float:
        """The delta every charge is accounted at."""
        return float(self._meta["delta"])

    @property
    def accountant(self) -> str:
        """``"rdp"`` or ``"prv"``: the accountant charges are decided with."""
        return str(self._meta["accountant"])

    # -- connections --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self._path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger {self._path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise LedgerError(f"ledger {self._path} stayed locked: {exc}; retry") from exc
            raise LedgerError(f"{self._path} is not a readable fedfew ledger: {exc}") from exc
        finally:
            conn.close()

    def _read_meta(self, conn: sqlite3.Connection) -> dict[str, Any]:
        try:
            row = conn.execute("SELECT * FROM meta WHERE id = 1").fetchone()
            conn.execute("SELECT id FROM entries LIMIT 0")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self._path} is not a fedfew ledger: {exc}") from exc
        if row is None:
            raise LedgerError(f"{self._path} has no meta row; it is not a fedfew ledger")
        meta = dict(row)
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise LedgerError(
                f"{self._path} has ledger schema {meta.get('schema_version')!r}, this fedfew "
                f"reads schema {SCHEMA_VERSION}; use a matching fedfew version"
            )
        return meta

    @staticmethod
    def _charge_history(conn: sqlite3.Connection) -> list[tuple[float, float, int]]:
        rows = conn.execute(
            "SELECT accounted_noise_multiplier, sample_rate, steps FROM entries "
            "WHERE kind = ? ORDER BY id",
            (KIND_CHARGE,),
        ).fetchall()
        return [(float(r[0]), float(r[1]), int(r[2])) for r in rows]

    @staticmethod
    def _check_ends(conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
        # Cheap fail-closed checks before every charge: a raised cap (meta edit) or removed last
        # rows (which would lower the spend) stop the charge. ``verify`` checks every row.
        first = conn.execute("SELECT prev_hash FROM entries ORDER BY id LIMIT 1").fetchone()
        genesis = first[0] if first is not None else meta["head_hash"]
        if genesis != _genesis_hash(meta):
            raise LedgerTamperedError(0, "meta row (site, cap, delta, accountant) was changed")
        last = conn.execute("SELECT id, hash FROM entries ORDER BY id DESC LIMIT 1").fetchone()
        last_id, last_hash = (last[0], last[1]) if last is not None else (0, genesis)
        if last_id != meta["row_count"] or last_hash != meta["head_hash"]:
            raise LedgerTamperedError(
                min(last_id, int(meta["row_count"])) + 1,
                "the ledger's recorded head does not match",
            )

    # -- writing ------------------------------------------------------------------------------

    def charge(self, request: ChargeRequest) -> LedgerEntry:
        """Charge a planned DP computation against the cap, before it runs.

        In one ``BEGIN IMMEDIATE`` transaction: compose the requested
        ``(accounted_noise_multiplier, sample_rate, steps)`` with every earlier charge (refusals
        do not compose) using the ledger's accountant at the ledger's delta; append a ``charge``
        row if the result is <= the cap, else append a ``refusal`` row, commit, and raise.

        Args:
            request: The planned computation.

        Returns:
            The appended charge row.

        Raises:
            BudgetExhaustedError: If the charge would take epsilon strictly past the cap; the
                refusal row is committed first.
            LedgerError: If the file is unreadable or stayed locked for ``BUSY_TIMEOUT_S``.
        """
        step = (request.accounted_noise_multiplier, float(request.sample_rate), request.steps)
        load_accountants()  # a first Opacus import takes seconds: not while holding the lock
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                meta = self._read_meta(conn)
                self._check_ends(conn, meta)
                history = self._charge_history(conn)
                accountant, delta = str(meta["accountant"]), float(meta["delta"])
                before = epsilon_for(history, delta=delta, accountant=accountant)
                after = epsilon_for([*history, step], delta=delta, accountant=accountant)
                refused = after > float(meta["cap_epsilon"])
                row: dict[str, Any] = {
                    "id": int(meta["row_count"]) + 1,
                    "time": dt.datetime.now(dt.UTC).isoformat(),
                    "kind": KIND_REFUSAL if refused else KIND_CHARGE,
                    "run_id": request.run_id,
                    "round": request.round,
                    "mechanism": request.mechanism,
                    "noise_multiplier": float(request.noise_multiplier),
                    "sensitivity_factor": float(request.sensitivity_factor),
                    "accounted_noise_multiplier": step[0],
                    "sample_rate": step[1],
                    "steps": step[2],
                    "delta": delta,
                    "epsilon_before": before,
                    "epsilon_after": after,
                    "accountant": accountant,
                    "code_version": code_version(),
                    "requester": request.requester,
                    "prev_hash": str(meta["head_hash"]),
                }
                row["hash"] = _entry_hash(row)
                columns = list(ENTRY_FIELDS)
                conn.execute(
                    f"INSERT INTO entries ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})",
                    [row[k] for k in columns],
                )
                conn.execute(
                    "UPDATE meta SET head_hash = ?, row_count = ? WHERE id = 1",
                    (row["hash"], row["id"]),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if refused:
            raise BudgetExhaustedError(
                site=str(meta["site"]),
                cap_epsilon=float(meta["cap_epsilon"]),
                epsilon_spent=before,
                epsilon_requested_after=after,
            )
        return LedgerEntry(**row)

    # -- reading ------------------------------------------------------------------------------

    def entries(self) -> list[LedgerEntry]:
        """Every row (charges and refusals), in id order."""
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM entries ORDER BY id").fetchall()
        return [LedgerEntry(**{k: t(r[k]) for k, t in ENTRY_FIELDS.items()}) for r in rows]

    def history(self) -> list[tuple[float, float, int]]:
        """``(accounted_noise_multiplier, sample_rate, steps)`` of every charge, in order."""
        with self._connect() as conn:
            return self._charge_history(conn)

    def epsilon_spent(self) -> float:
        """Epsilon of all charges composed, with the ledger's accountant and delta."""
        return epsilon_for(self.history(), delta=self.delta, accountant=self.accountant)

    def genesis_hash(self) -> str:
        """Hash the first row chains to: a digest of the meta row (site, cap, delta, ...)."""
        return _genesis_hash(self._meta)

    def head_hash(self) -> str:
        """Hash of the last row (the genesis hash when empty): record it off the node."""
        with self._connect() as conn:
            return str(self._read_meta(conn)["head_hash"])

    def verify(self) -> int:
        """Check the whole hash chain, the meta row and the recorded head and row count.

        Row 0 stands for the meta row (site, cap, delta, accountant).

        Returns:
            The number of entry rows verified.

        Raises:
            LedgerTamperedError: With ``row`` = the first bad row id, for any edited, deleted,
                inserted or reordered row, a deleted last row, or an edited meta row.
        """
        with self._connect() as conn:
            conn.execute("BEGIN")  # one consistent snapshot
            meta = self._read_meta(conn)
            rows = [dict(r) for r in conn.execute("SELECT * FROM entries ORDER BY id")]
            conn.execute("COMMIT")
        genesis = _genesis_hash(meta)
        if not rows and meta["head_hash"] != genesis:
            raise LedgerTamperedError(0, "meta row (site, cap, delta, accountant) was changed")
        prev = genesis
        for expected_id, row in enumerate(rows, start=1):
            if row["id"] != expected_id:
                raise LedgerTamperedError(expected_id, f"row missing (next row has id {row['id']})")
            try:
                digest = _entry_hash(row)
            except (TypeError, ValueError) as exc:
                raise LedgerTamperedError(expected_id, f"unreadable field: {exc}") from exc
            if digest != row["hash"]:
                raise LedgerTamperedError(expected_id, "content does not match its hash")
            if row["prev_hash"] != prev:
                if expected_id == 1:  # row 1 is self-consistent, so the genesis (meta) changed
                    raise LedgerTamperedError(
                        0, "meta row (site, cap, delta, accountant) was changed"
                    )
                raise LedgerTamperedError(expected_id, "does not chain to the previous row")
            prev = row["hash"]
        if meta["row_count"] != len(rows) or meta["head_hash"] != prev:
            raise LedgerTamperedError(
                len(rows) + 1,
                f"the ledger recorded {meta['row_count']} rows and a different head; "
                "rows at the end were removed",
            )
        return len(rows)
