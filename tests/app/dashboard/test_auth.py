"""Accounts, password hashing, rate limit, sessions and the OIDC role mapping (unit tests)."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from app.dashboard.auth import (
    BACKOFF_BASE_S,
    BACKOFF_MAX_S,
    FAILURE_WINDOW_S,
    MAX_FAILURES,
    MIN_PASSWORD_CHARS,
    ROLE_ADMIN,
    ROLE_CLINICIAN,
    ROLE_IT,
    UserStore,
    backoff,
    hash_password,
    new_session,
    role_from_claims,
)
from app.dashboard.errors import AccountError, AuthError, RateLimitedError
from tests.app.dashboard.conftest import PASSWORD, TEST_KDF_N


@pytest.fixture
def users(tmp_path: Path) -> UserStore:
    return UserStore(tmp_path / "users.sqlite", kdf_n=TEST_KDF_N)


def test_hash_is_rfc7914_scrypt_and_salted() -> None:
    salt = b"0123456789abcdef"
    expected = hashlib.scrypt(b"pw", salt=salt, n=1024, r=8, p=1, dklen=32)
    assert hash_password("pw", salt, n=1024) == expected
    assert hash_password("pw", b"fedcba9876543210", n=1024) != expected


def test_stored_row_holds_salt_and_hash_never_the_password(users: UserStore) -> None:
    users.add("ana", PASSWORD, role=ROLE_CLINICIAN)
    users.add("ben", PASSWORD, role=ROLE_CLINICIAN)
    with sqlite3.connect(users.path) as conn:
        rows = conn.execute("SELECT salt, hash, kdf FROM users ORDER BY username").fetchall()
    assert rows[0][0] != rows[1][0] and rows[0][1] != rows[1][1]  # same password, other salt
    assert rows[0][2] == f"scrypt:n={TEST_KDF_N},r=8,p=1"
    assert PASSWORD.encode() not in users.path.read_bytes()


def test_authenticate(users: UserStore) -> None:
    users.add("ana", PASSWORD, role=ROLE_ADMIN)
    assert users.authenticate("ana", PASSWORD).role == ROLE_ADMIN
    with pytest.raises(AuthError, match="wrong username or password"):
        users.authenticate("ana", PASSWORD + "x")
    with pytest.raises(AuthError, match="wrong username or password"):
        users.authenticate("nobody", PASSWORD)


def test_rate_limit_backs_off_then_releases(users: UserStore) -> None:
    users.add("ana", PASSWORD, role=ROLE_IT)
    start = time.time()
    for i in range(MAX_FAILURES):
        with pytest.raises(AuthError):
            users.authenticate("ana", "wrong password", now=start + i)
    last = start + MAX_FAILURES - 1
    with pytest.raises(RateLimitedError) as locked:
        users.authenticate("ana", PASSWORD, now=last + 1)
    assert locked.value.retry_after_s == pytest.approx(BACKOFF_BASE_S - 1)
    # After the wait one more failure doubles it; the right password then works and clears.
    with pytest.raises(AuthError):
        users.authenticate("ana", "wrong password", now=last + BACKOFF_BASE_S)
    assert users.retry_after("ana", now=last + BACKOFF_BASE_S) == pytest.approx(2 * BACKOFF_BASE_S)
    later = last + 3 * BACKOFF_BASE_S
    assert users.authenticate("ana", PASSWORD, now=later).username == "ana"
    assert users.retry_after("ana", now=later) == 0
    assert backoff(MAX_FAILURES + 20) == BACKOFF_MAX_S <= FAILURE_WINDOW_S


def test_a_stranger_cannot_lock_out_a_named_clinician(users: UserStore) -> None:
    users.add("ana", PASSWORD, role=ROLE_CLINICIAN)
    for _ in range(3 * MAX_FAILURES):
        with pytest.raises(AuthError):
            users.authenticate("ana", "guess", client="10.0.0.66")
    assert users.throttled_clients("ana") == 1
    assert users.authenticate("ana", PASSWORD, client="10.0.0.12").username == "ana"
    with pytest.raises(RateLimitedError, match="from this computer"):
        users.authenticate("ana", PASSWORD, client="10.0.0.66")
    users.unlock("ana")
    assert users.authenticate("ana", PASSWORD, client="10.0.0.66").username == "ana"


def test_disabled_account_and_password_reset(users: UserStore) -> None:
    users.add("ana", PASSWORD, role=ROLE_CLINICIAN)
    users.set_disabled("ana", True)
    assert not users.active("ana") and users.users()[0].disabled
    with pytest.raises(AuthError, match="wrong username or password"):
        users.authenticate("ana", "wrong password")  # says nothing about the account
    with pytest.raises(AuthError, match="disabled"):
        users.authenticate("ana", PASSWORD)
    users.set_disabled("ana", False)
    users.reset_password("ana", "brand new password")
    assert users.authenticate("ana", "brand new password").role == ROLE_CLINICIAN
    with pytest.raises(AccountError, match="no user"):
        users.reset_password("bob", "brand new password")


def test_an_older_database_gains_the_new_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE users (username TEXT PRIMARY KEY, role TEXT NOT NULL, salt BLOB NOT "
            "NULL, hash BLOB NOT NULL, kdf TEXT NOT NULL, created TEXT NOT NULL)"
        )
        conn.execute("CREATE TABLE failed_logins (username TEXT NOT NULL, time REAL NOT NULL)")
    conn.close()
    store = UserStore(db, kdf_n=TEST_KDF_N)
    store.add("ana", PASSWORD, role=ROLE_IT)
    assert store.authenticate("ana", PASSWORD).username == "ana" and store.active("ana")


def test_failures_below_the_limit_do_not_lock(users: UserStore) -> None:
    users.add("ana", PASSWORD, role=ROLE_IT)
    for _ in range(MAX_FAILURES - 1):
        with pytest.raises(AuthError):
            users.authenticate("ana", "wrong password")
    assert users.authenticate("ana", PASSWORD).username == "ana"


def test_account_rules(users: UserStore) -> None:
    with pytest.raises(AccountError, match="role must be one of"):
        users.add("ana", PASSWORD, role="root")
    with pytest.raises(AccountError, match=f"at least {MIN_PASSWORD_CHARS}"):
        users.add("ana", "short", role=ROLE_IT)
    with pytest.raises(AccountError, match="username"):
        users.add("  ", PASSWORD, role=ROLE_IT)
    users.add("ana", PASSWORD, role=ROLE_IT)
    with pytest.raises(AccountError, match="exists"):
        users.add("ana", PASSWORD, role=ROLE_ADMIN)
    users.add("ana", "another password", role=ROLE_ADMIN, replace=True)
    assert users.authenticate("ana", "another password").role == ROLE_ADMIN
    users.remove("ana")
    assert users.users() == []
    with pytest.raises(AccountError, match="no user"):
        users.remove("ana")


def test_no_database_means_no_accounts(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "absent.sqlite")
    assert store.users() == []
    assert not store.path.exists()  # listing does not create it


def test_session_expiry() -> None:
    session = new_session("ana", [ROLE_IT], hours=8)
    assert not session.expired()
    assert session.expired(now=session.expires_at)
    assert session.expires_at == pytest.approx(time.time() + 8 * 3600, abs=5)


@pytest.mark.parametrize(
    ("claims", "mapping", "expected"),
    [
        ({"roles": ["clinician"]}, None, (ROLE_CLINICIAN,)),
        ({"roles": "administrator it"}, None, (ROLE_ADMIN, ROLE_IT)),
        ({"roles": "it,clinician"}, None, (ROLE_CLINICIAN, ROLE_IT)),
        ({"groups": ["radiology", "other"]}, {"radiology": "clinician"}, ()),  # wrong claim
        (
            {"roles": ["radiology", "dpo"]},
            {"radiology": "clinician", "dpo": "administrator"},
            (ROLE_CLINICIAN, ROLE_ADMIN),
        ),
        ({"roles": ["superuser"]}, None, ()),
        ({}, None, ()),
        ({"roles": 42}, None, ()),
    ],
)
def test_role_from_claims(claims, mapping, expected) -> None:
    assert role_from_claims(claims, claim="roles", mapping=mapping) == expected


def test_role_mapping_to_an_unknown_role_is_refused() -> None:
    with pytest.raises(AccountError, match="must be one of"):
        role_from_claims({"roles": ["x"]}, mapping={"x": "root"})
