"""Local accounts: salted scrypt hashes in SQLite, failed-login rate limit, expiring sessions,
and the mapping of an identity provider's role claim (OIDC through ``st.login``) to roles.

No account exists until someone creates one with ``fedfew users add``: there are no default or
built-in credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.dashboard.database import connect
from app.dashboard.errors import AccountError, AuthError, RateLimitedError

ROLE_CLINICIAN = "clinician"
ROLE_ADMIN = "administrator"
ROLE_IT = "it"
ROLES = (ROLE_CLINICIAN, ROLE_ADMIN, ROLE_IT)

# scrypt (RFC 7914) at OWASP's recommended cost: 2^14 x 8 blocks (16 MiB) takes ~50 ms here,
# a negligible login delay and a large one for an offline guesser.
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16  # NIST SP 800-132: at least 128 bits of salt
HASH_BYTES = 32
MIN_PASSWORD_CHARS = 10  # NIST SP 800-63B asks for >= 8; clinical systems commonly use 10+
# Throttling is per (account, client computer), so a stranger's wrong passwords slow only the
# stranger: a named clinician at another workstation can still log in. Five free failures per
# pair within the hour, then each further attempt waits twice as long as the last (30 s, 1 min,
# 2 min, ...), never more than 15 minutes; an administrator can lift it on the Users page.
MAX_FAILURES = 5
FAILURE_WINDOW_S = 60 * 60.0  # failures are remembered this long
BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 15 * 60.0
USERNAME_MAX_CHARS = 64

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS users (
        username TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        salt BLOB NOT NULL,
        hash BLOB NOT NULL,
        kdf TEXT NOT NULL,
        created TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS failed_logins (
        username TEXT NOT NULL,
        time REAL NOT NULL
    )""",
)
# Columns added after the first release: (table, column, declaration) for older databases.
_MIGRATIONS = (
    ("users", "disabled", "INTEGER NOT NULL DEFAULT 0"),
    ("failed_logins", "client", "TEXT NOT NULL DEFAULT ''"),
)


def hash_password(password: str, salt: bytes, *, n: int = SCRYPT_N) -> bytes:
    """scrypt of ``password`` with ``salt`` (RFC 7914) at this module's cost parameters."""
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=SCRYPT_R,
        p=SCRYPT_P,
        dklen=HASH_BYTES,
        maxmem=256 * SCRYPT_R * n,
    )


def _kdf_label(n: int) -> str:
    return f"scrypt:n={n},r={SCRYPT_R},p={SCRYPT_P}"


def _kdf_n(label: str) -> int:
    fields = dict(part.split("=", 1) for part in label.removeprefix("scrypt:").split(","))
    return int(fields["n"])


@dataclass(frozen=True)
class User:
    """An account as listed (never with its hash)."""

    username: str
    role: str
    created: str
    disabled: bool = False


def backoff(failures: int) -> float:
    """Seconds a client must wait after ``failures`` recent failures for one account (0 while
    within :data:`MAX_FAILURES`, then doubling from :data:`BACKOFF_BASE_S` up to
    :data:`BACKOFF_MAX_S`)."""
    if failures < MAX_FAILURES:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (failures - MAX_FAILURES))


@dataclass(frozen=True)
class Session:
    """A logged-in user: who, with which roles, and until when (epoch seconds)."""

    username: str
    roles: tuple[str, ...]
    expires_at: float
    source: str = "local"  # "local" account or "oidc"

    def expired(self, *, now: float | None = None) -> bool:
        """Whether the session has run out."""
        return (time.time() if now is None else now) >= self.expires_at


def new_session(
    username: str, roles: Iterable[str], *, hours: float, source: str = "local"
) -> Session:
    """A session for ``username`` valid for ``hours`` from now."""
    return Session(
        username=username,
        roles=tuple(roles),
        expires_at=time.time() + hours * 3600.0,
        source=source,
    )


def validate_role(role: str) -> str:
    """Return ``role`` if it is one of :data:`ROLES`.

    Raises:
        AccountError: any other value.
    """
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def role_from_claims(
    claims: Mapping[str, Any], *, claim: str = "roles", mapping: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """The dashboard roles an identity provider grants, from one claim of the ID token.

    Args:
        claims: the user's claims (``st.user``).
        claim: the claim holding the provider's roles or groups: a string (one value, or several
            separated by commas or spaces) or a list of strings.
        mapping: provider value -> dashboard role; values that are already role names map to
            themselves. Values that map to nothing grant nothing.

    Returns:
        The granted roles, in :data:`ROLES` order, without duplicates; empty when none.

    Raises:
        AccountError: ``mapping`` maps a value to something that is not a role.
    """
    table = dict(mapping or {})
    for value, role in table.items():
        if role not in ROLES:
            raise AccountError(
                f"OIDC role mapping {value!r} -> {role!r}: the role must be one of "
                f"{', '.join(ROLES)}"
            )
    raw = claims.get(claim)
    if isinstance(raw, str):
        values = raw.replace(",", " ").split()
    elif isinstance(raw, list | tuple):
        values = [str(v) for v in raw]
    else:
        values = []
    granted = {table.get(v, v) for v in values}
    return tuple(r for r in ROLES if r in granted)


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns that later versions introduced to an older account database."""
    for table, column, declaration in _MIGRATIONS:
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


class UserStore:
    """The dashboard's account database (one SQLite file)."""

    def __init__(self, path: Path, *, kdf_n: int = SCRYPT_N) -> None:
        self.path = Path(path)
        self._kdf_n = kdf_n  # tests lower it; stored per user, so verification always matches

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(
            self.path,
            what="account database",
            schema=_SCHEMA,
            migrate=_migrate,
            unreadable_hint="; restore it or remove it and create the accounts again with "
            "`fedfew users add`",
        )

    def add(self, username: str, password: str, *, role: str, replace: bool = False) -> User:
        """Create an account (``replace=True`` resets an existing one's password and role).

        Raises:
            AccountError: bad username, unknown role, short password, or the user exists.
        """
        username = username.strip()
        if not username or len(username) > USERNAME_MAX_CHARS or not username.isprintable():
            raise AccountError(
                f"username must be 1 to {USERNAME_MAX_CHARS} printable characters, got {username!r}"
            )
        validate_role(role)
        if len(password) < MIN_PASSWORD_CHARS:
            raise AccountError(
                f"password must have at least {MIN_PASSWORD_CHARS} characters, got {len(password)}"
            )
        salt = secrets.token_bytes(SALT_BYTES)
        digest = hash_password(password, salt, n=self._kdf_n)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        with self._connect() as conn:
            try:
                conn.execute(
                    f"{verb} INTO users (username, role, salt, hash, kdf, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (username, role, salt, digest, _kdf_label(self._kdf_n), created),
                )
            except sqlite3.IntegrityError:
                raise AccountError(
                    f"user {username!r} exists; remove it first or use --replace"
                ) from None
            conn.execute("DELETE FROM failed_logins WHERE username = ?", (username,))
        return User(username=username, role=role, created=created)

    def remove(self, username: str) -> None:
        """Delete an account.

        Raises:
            AccountError: no such user.
        """
        with self._connect() as conn:
            deleted = conn.execute("DELETE FROM users WHERE username = ?", (username,)).rowcount
            conn.execute("DELETE FROM failed_logins WHERE username = ?", (username,))
        if not deleted:
            raise AccountError(f"no user {username!r}; `fedfew users list` shows the accounts")

    def users(self) -> list[User]:
        """Every account, by name."""
        if not self.path.is_file():
            return []
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT username, role, created, disabled FROM users ORDER BY username"
            )
            return [User(u, r, c, bool(d)) for u, r, c, d in rows.fetchall()]

    def _require(self, conn: sqlite3.Connection, username: str) -> None:
        if conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone() is None:
            raise AccountError(f"no user {username!r}; `fedfew users list` shows the accounts")

    def set_disabled(self, username: str, disabled: bool) -> None:
        """Disable an account (it can no longer log in) or enable it again.

        Raises:
            AccountError: no such user.
        """
        with self._connect() as conn:
            self._require(conn, username)
            conn.execute(
                "UPDATE users SET disabled = ? WHERE username = ?", (int(disabled), username)
            )

    def unlock(self, username: str) -> None:
        """Forget the failed logins of ``username`` from every client (lifts the throttling)."""
        with self._connect() as conn:
            conn.execute("DELETE FROM failed_logins WHERE username = ?", (username,))

    def reset_password(self, username: str, password: str) -> None:
        """Give an existing account a new password (role kept; failures forgotten).

        Raises:
            AccountError: no such user, or a short password.
        """
        with self._connect() as conn:
            row = conn.execute("SELECT role FROM users WHERE username = ?", (username,)).fetchone()
        if row is None:
            raise AccountError(f"no user {username!r}; `fedfew users list` shows the accounts")
        self.add(username, password, role=row[0], replace=True)

    def active(self, username: str) -> bool:
        """Whether ``username`` exists and is not disabled (a resumed session still counts)."""
        if not self.path.is_file():
            return False
        with self._connect() as conn:
            row = conn.execute(
                "SELECT disabled FROM users WHERE username = ?", (username,)
            ).fetchone()
        return row is not None and not row[0]

    def throttled_clients(self, username: str, *, now: float | None = None) -> int:
        """How many clients must currently wait before trying ``username`` again."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            clients = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT client FROM failed_logins WHERE username = ?", (username,)
                )
            ]
        return sum(self.retry_after(username, client=c, now=now) > 0 for c in clients)

    def retry_after(self, username: str, *, client: str = "", now: float | None = None) -> float:
        """Seconds until ``client`` may try ``username`` again; 0 when it may now."""
        now = time.time() if now is None else now
        with self._connect() as conn:
            times = [
                row[0]
                for row in conn.execute(
                    "SELECT time FROM failed_logins WHERE username = ? AND client = ? "
                    "AND time > ? ORDER BY time",
                    (username, client, now - FAILURE_WINDOW_S),
                )
            ]
        if not times:
            return 0.0
        return max(0.0, times[-1] + backoff(len(times)) - now)

    def authenticate(
        self, username: str, password: str, *, client: str = "", now: float | None = None
    ) -> User:
        """Check a password.

        Args:
            username: the account.
            password: its password.
            client: who is trying (the browser's IP address): failures are counted per
                (account, client), so one client's failures never block another.
            now: the time (tests).

        Raises:
            RateLimitedError: this client failed too often for this account recently (checked
                first, so a throttled client cannot keep probing).
            AuthError: unknown user or wrong password (the same message for both), or a
                disabled account (said only after the right password).
        """
        username = username.strip()
        now = time.time() if now is None else now
        wait = self.retry_after(username, client=client, now=now)
        if wait > 0:
            raise RateLimitedError(username, wait)
        with self._connect() as conn:
            row = conn.execute(
                "SELECT role, salt, hash, kdf, created, disabled FROM users WHERE username = ?",
                (username,),
            ).fetchone()
        if row is None:
            # Hash anyway so an unknown name takes as long as a wrong password.
            hash_password(password, b"\0" * SALT_BYTES, n=self._kdf_n)
            ok = False
        else:
            role, salt, stored, kdf, created, disabled = row
            ok = hmac.compare_digest(hash_password(password, salt, n=_kdf_n(kdf)), stored)
        with self._connect() as conn:
            if not ok:
                conn.execute(
                    "INSERT INTO failed_logins (username, client, time) VALUES (?, ?, ?)",
                    (username, client, now),
                )
            else:
                conn.execute(
                    "DELETE FROM failed_logins WHERE username = ? AND client = ?",
                    (username, client),
                )
            conn.execute("DELETE FROM failed_logins WHERE time < ?", (now - FAILURE_WINDOW_S,))
        if not ok:
            raise AuthError("wrong username or password")
        if disabled:
            raise AuthError("this account is disabled: ask an administrator to enable it")
        return User(username=username, role=role, created=created)
