"""The sign-in route (app/dashboard/web_session.py) over real HTTP handling: the session lives in
an HttpOnly, Secure, SameSite=Strict cookie and never in a URL; refusals leave a notice and an
audit row; a cross-site post is refused; the provider's refusal at the callback is recorded."""

from __future__ import annotations

from app.dashboard import provenance
from app.dashboard.auth import MAX_FAILURES, ROLE_CLINICIAN
from app.dashboard.persistence import SessionStore
from app.dashboard.provenance import AuditLog
from app.dashboard.settings import ENV_INSECURE_HTTP
from app.dashboard.web_session import (
    NOTICE_COOKIE,
    SESSION_COOKIE,
    harden_identity_cookie,
    read_notice,
)
from tests.app.dashboard.conftest import PASSWORD
from tests.app.dashboard.signin_helpers import CLIENT, post_login, route_client, session_cookie


def _set_cookies(response) -> dict[str, str]:
    """Set-Cookie headers by cookie name."""
    return {h.split("=", 1)[0]: h for h in response.headers.get_list("set-cookie")}


def _actions(env) -> list[tuple[str, str]]:
    return [(e.user, e.action) for e in reversed(AuditLog(env["users"]).entries())]


def test_sign_in_sets_a_strict_httponly_secure_session_cookie(store, env) -> None:
    response = post_login(route_client(), ROLE_CLINICIAN, PASSWORD)
    assert response.status_code == 303
    assert response.headers["location"] == "/"  # nothing that grants access in the URL
    header = _set_cookies(response)[SESSION_COOKIE]
    for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"):
        assert flag in header
    assert "Max-Age" not in header and "Expires" not in header  # gone with the browser
    token = session_cookie(response)
    assert token and token not in response.headers["location"]
    resumed = SessionStore(env["users"]).resume(token, client=CLIENT)
    assert resumed.session is not None and resumed.session.username == ROLE_CLINICIAN
    assert SessionStore(env["users"]).resume(token, client="10.1.2.3").session is None
    assert _actions(env) == [(ROLE_CLINICIAN, provenance.ACTION_LOGIN)]


def test_a_wrong_password_leaves_a_notice_and_no_session(store, env) -> None:
    client = route_client()
    response = post_login(client, ROLE_CLINICIAN, "not the password")
    assert response.status_code == 303 and session_cookie(response) is None
    notice = response.cookies.get(NOTICE_COOKIE)
    assert read_notice({NOTICE_COOKIE: notice}) == "wrong username or password"
    assert "Max-Age=60" in _set_cookies(response)[NOTICE_COOKIE]
    for _ in range(MAX_FAILURES):
        response = post_login(client, ROLE_CLINICIAN, "not the password")
    throttled = post_login(client, ROLE_CLINICIAN, PASSWORD)
    assert session_cookie(throttled) is None
    assert "too many failed logins" in read_notice(dict(throttled.cookies))
    actions = [a for _, a in _actions(env)]
    assert actions.count(provenance.ACTION_LOGIN_FAILED) == MAX_FAILURES + 2
    assert provenance.ACTION_LOCKED in actions and provenance.ACTION_LOGIN not in actions


def test_a_disabled_account_is_refused(store, env) -> None:
    store.set_disabled(ROLE_CLINICIAN, True)
    response = post_login(route_client(), ROLE_CLINICIAN, PASSWORD)
    assert session_cookie(response) is None
    assert "disabled" in read_notice(dict(response.cookies))


def test_a_cross_site_post_and_a_get_are_refused(store, env) -> None:
    client = route_client()
    forged = post_login(client, ROLE_CLINICIAN, PASSWORD, origin="https://evil.example")
    assert forged.status_code == 403 and session_cookie(forged) is None
    assert client.get("/fedfew/login").status_code == 403
    blank = client.post(
        "/fedfew/login",
        data={"username": ROLE_CLINICIAN, "password": PASSWORD},
        headers={"origin": "null", "sec-fetch-site": "cross-site"},
    )
    assert blank.status_code == 403
    assert _actions(env) == []


def test_insecure_http_drops_only_the_secure_flag(store, env, monkeypatch) -> None:
    monkeypatch.setenv(ENV_INSECURE_HTTP, "1")
    header = _set_cookies(post_login(route_client(), ROLE_CLINICIAN, PASSWORD))[SESSION_COOKIE]
    assert "Secure" not in header and "HttpOnly" in header and "SameSite=Strict" in header


def test_the_providers_refusal_is_recorded_and_said(env) -> None:
    response = route_client().get(
        "/oauth2callback",
        params={"error": "access_denied", "error_description": "account disabled", "state": "x"},
    )
    assert response.status_code == 302  # Streamlit's own answer, passed through
    assert "account disabled" in read_notice(dict(response.cookies))
    (entry,) = AuditLog(env["users"]).entries()
    assert entry.action == provenance.ACTION_LOGIN_FAILED
    assert entry.detail.startswith("hospital sign-in: access_denied: account disabled")


def test_streamlits_identity_cookie_is_hardened_and_other_cookies_left_alone() -> None:
    # What Streamlit 1.67 sends (starlette_auth_routes._set_single_cookie / delete_cookie).
    set_ = "_streamlit_user=abc; HttpOnly; Max-Age=2592000; Path=/; SameSite=lax"
    chunk = "_streamlit_user_1=def; HttpOnly; Max-Age=2592000; Path=/; SameSite=lax"
    delete = (
        '_streamlit_user=""; expires=Sat, 05 Dec 2026 17:50:08 GMT; Max-Age=0; Path=/; SameSite=lax'
    )
    assert harden_identity_cookie(set_, secure=True) == (
        "_streamlit_user=abc; HttpOnly; Path=/; SameSite=Strict; Secure"
    )  # a session cookie now: no Max-Age, gone with the browser
    assert harden_identity_cookie(chunk, secure=False).endswith("Path=/; SameSite=Strict")
    assert harden_identity_cookie(delete, secure=True) == (
        '_streamlit_user=""; expires=Sat, 05 Dec 2026 17:50:08 GMT; Max-Age=0; Path=/; '
        "SameSite=Strict; Secure"
    )  # still deleted
    state = "_streamlit_oauth_state=x; HttpOnly; Path=/; SameSite=lax"  # must survive the IdP
    assert harden_identity_cookie(state, secure=True) == state


def test_a_callback_that_signs_nobody_in_is_recorded_and_one_that_does_is_hardened(env) -> None:
    client = route_client()
    good = client.get("/oauth2callback", params={"code": "good", "state": "s"})
    identity = _set_cookies(good)["_streamlit_user"]
    assert "SameSite=Strict" in identity and "Secure" in identity and "Max-Age" not in identity
    assert "Max-Age=0" in _set_cookies(good)[NOTICE_COOKIE]  # an older refusal's notice goes
    assert AuditLog(env["users"]).entries() == []

    failed = client.get("/oauth2callback", params={"code": "wrong-secret", "state": "s"})
    assert "did not complete" in read_notice(dict(failed.cookies))
    (entry,) = AuditLog(env["users"]).entries()
    assert entry.action == provenance.ACTION_LOGIN_FAILED
    assert entry.detail.startswith("hospital sign-in did not complete")
    back = client.get("/oauth2callback", params={"state": "s"})  # from the provider's sign-out
    assert NOTICE_COOKIE not in _set_cookies(back) and len(AuditLog(env["users"]).entries()) == 1
