"""Accounts, password hashing, rate limit, sessions and the OIDC role mapping (unit tests)."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest

from app.dashboard.auth import (
    FAILURE_WINDOW_S,
    MAX_FAILURES,
    MIN_PASSWORD_CHARS,
    ROLE_ADMIN,
    ROLE_CLINICIAN,
    ROLE_IT,
    UserStore,
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


def test_rate_limit_locks_then_releases(users: UserStore) -> None:
    users.add("ana", PASSWORD, role=ROLE_IT)
    start = time.time()
    for i in range(MAX_FAILURES):
        with pytest.raises(AuthError):
            users.authenticate("ana", "wrong password", now=start + i)
    with pytest.raises(RateLimitedError) as locked:
        users.authenticate("ana", PASSWORD, now=start + MAX_FAILURES)
    assert 0 < locked.value.retry_after_s <= FAILURE_WINDOW_S
    # Once the window has passed, the right password works again and clears the failures.
    later = start + FAILURE_WINDOW_S + MAX_FAILURES
    assert users.authenticate("ana", PASSWORD, now=later).username == "ana"
    assert users.retry_after("ana", now=later) == 0


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
