"""Sessions found from the browser's cookie (app/dashboard/signin.py): a reload resumes the
sign-in and the draft, a sign-out ends it everywhere and forgets the draft, an idle or disabled
session ends with a notice, and a hospital identity is mapped to roles, refused without one,
audited, and never resumed from an old identity cookie."""

from __future__ import annotations

import time

from app.dashboard import provenance
from app.dashboard.auth import ROLE_ADMIN, ROLE_CLINICIAN, Session
from app.dashboard.persistence import ENDED_IDLE, Draft, SessionStore
from app.dashboard.provenance import AuditLog
from app.dashboard.settings import ENV_IDLE_MINUTES, load_settings
from app.dashboard.signin import IDENTITY_COOKIE
from app.dashboard.ui import SESSION_KEY
from app.dashboard.uploads import Upload
from app.dashboard.web_session import NOTICE_COOKIE, SESSION_COOKIE, sign_in
from tests.app.dashboard.conftest import PASSWORD, texts
from tests.app.dashboard.pages import captions, upload
from tests.app.dashboard.signin_helpers import browser_with

OIDC_SECRETS = {
    "auth": {"client_id": "dashboard", "server_metadata_url": "https://idp.invalid/.well-known"},
    "fedfew_oidc": {
        "role_claim": "groups",
        "roles": {"radiology": ROLE_CLINICIAN, "dashboard-admins": ROLE_ADMIN},
    },
}


def _token(username: str = ROLE_CLINICIAN) -> str:
    token, refusal = sign_in(load_settings(), username, PASSWORD, client="unknown")
    assert token, refusal
    return token


def test_a_reload_resumes_the_sign_in_and_the_draft_until_sign_out(
    store, registry, monkeypatch, case_images, env
) -> None:
    cookie = {SESSION_COOKIE: _token()}
    at = browser_with(monkeypatch, cookie).run()
    assert at.title[0].value == "Adapt to a new condition"
    assert f"Signed in as **{ROLE_CLINICIAN}**" in texts(at.sidebar, "markdown")
    at.text_input(key="adapt_condition").input("lesions")
    at.text_area(key="adapt_classes").input("a\nb").run()
    upload(at, "adapt_files_0", [("a0.png", case_images[sorted(case_images)[0]][0])])

    again = browser_with(monkeypatch, cookie).run()  # a reload: a new session, the same cookie
    assert not again.exception
    assert again.text_input(key="adapt_condition").value == "lesions"
    assert again.text_area(key="adapt_classes").value == "a\nb"
    assert captions(again) == ["a0.png"]
    other = browser_with(monkeypatch, {SESSION_COOKIE: _token()}).run()  # another computer
    assert other.session_state[SESSION_KEY].username == ROLE_CLINICIAN

    again.sidebar.button(key="signout").click().run()
    assert "You are signed out" in texts(again, "info")
    after = browser_with(monkeypatch, cookie).run()
    assert not after.exception and SESSION_KEY not in after.session_state
    assert SessionStore(env["users"]).load_draft(cookie[SESSION_COOKIE]) == Draft()
    other.run()  # the account's other session ended with the sign-out
    assert SESSION_KEY not in other.session_state
    actions = [e.action for e in AuditLog(env["users"]).entries()]
    assert actions.count(provenance.ACTION_LOGOUT) == 1


def test_an_idle_session_ends_with_a_notice(store, monkeypatch, env) -> None:
    cookie = {SESSION_COOKIE: _token()}
    at = browser_with(monkeypatch, cookie).run()
    assert at.session_state[SESSION_KEY].username == ROLE_CLINICIAN
    monkeypatch.setenv(ENV_IDLE_MINUTES, "0.005")  # 0.3 s, from now on
    time.sleep(0.5)
    at.run()  # the next click, after the idle time
    assert SESSION_KEY not in at.session_state
    assert "signed out after 0.005 minutes without activity" in texts(at, "info")
    resumed = SessionStore(env["users"]).resume(cookie[SESSION_COOKIE], client="unknown")
    assert resumed.session is None and resumed.ended == ENDED_IDLE


def test_the_idle_clock_restarts_at_each_click(store, monkeypatch) -> None:
    at = browser_with(monkeypatch, {SESSION_COOKIE: _token()}).run()  # imports done before
    monkeypatch.setenv(ENV_IDLE_MINUTES, "0.1")  # 6 s
    at.run()
    for _ in range(4):  # 8 s in all: more than the idle time, never that long without a click
        time.sleep(2)
        at.run()
        assert at.session_state[SESSION_KEY].username == ROLE_CLINICIAN


def test_disabling_an_account_ends_its_sessions(store, monkeypatch) -> None:
    cookie = {SESSION_COOKIE: _token()}
    at = browser_with(monkeypatch, cookie).run()
    assert SESSION_KEY in at.session_state
    store.set_disabled(ROLE_CLINICIAN, True)
    at.run()
    assert SESSION_KEY not in at.session_state
    assert "ended by an administrator" in texts(at, "info")
    assert SESSION_KEY not in browser_with(monkeypatch, cookie).run().session_state


def test_a_refused_sign_in_is_said_on_the_login_page(store, monkeypatch) -> None:
    at = browser_with(monkeypatch, {NOTICE_COOKIE: "wrong%20username%20or%20password"}).run()
    assert "wrong username or password" in texts(at, "info")
    assert "Log in" in texts(at, "html") or at.get("html")


def _hospital_tab(monkeypatch, groups: list[str], *, identity: str, issued: float | None = None):
    at = browser_with(monkeypatch, {IDENTITY_COOKIE: identity})
    at.secrets = OIDC_SECRETS
    at.user = {
        "is_logged_in": True,
        "email": "dr@hospital.example",
        "groups": groups,
        "iat": int(time.time() if issued is None else issued),
    }
    return at


def test_a_hospital_identity_gets_the_roles_its_groups_map_to(env, registry, monkeypatch) -> None:
    at = _hospital_tab(monkeypatch, ["radiology", "cafeteria"], identity="signed-1").run()
    assert not at.exception
    session = at.session_state[SESSION_KEY]
    assert session.source == "oidc" and session.roles == (ROLE_CLINICIAN,)
    assert at.title[0].value == "Adapt to a new condition"
    reload = _hospital_tab(monkeypatch, ["radiology"], identity="signed-1").run()
    assert reload.session_state[SESSION_KEY].username == "dr@hospital.example"
    # Next day, an administrator too: a new sign-in, with the role change in the audit log.
    later = _hospital_tab(monkeypatch, ["radiology", "dashboard-admins"], identity="signed-2")
    assert later.run().session_state[SESSION_KEY].roles == (ROLE_CLINICIAN, ROLE_ADMIN)
    events = [(e.action, e.detail) for e in reversed(AuditLog(env["users"]).entries())]
    assert [a for a, _ in events] == [
        provenance.ACTION_LOGIN,
        provenance.ACTION_LOGIN,
        provenance.ACTION_ROLES_CHANGED,
    ]
    assert events[-1][1] == f"{ROLE_CLINICIAN} -> {ROLE_CLINICIAN}, {ROLE_ADMIN}"


def test_a_hospital_identity_without_a_dashboard_role_is_refused(env, monkeypatch) -> None:
    at = _hospital_tab(monkeypatch, ["cafeteria"], identity="signed-3").run()
    assert not at.exception and SESSION_KEY not in at.session_state
    assert "no dashboard role" in texts(at, "info")
    at.run()  # recorded once, not at every run
    (entry,) = AuditLog(env["users"]).entries()
    assert entry.action == provenance.ACTION_LOGIN_FAILED and entry.user == "dr@hospital.example"


def test_an_old_identity_cookie_is_not_a_new_sign_in(env, monkeypatch) -> None:
    at = _hospital_tab(monkeypatch, ["radiology"], identity="old", issued=time.time() - 3600)
    at.run()
    assert SESSION_KEY not in at.session_state
    assert at.button[0].label == "Log in with your hospital account"
    assert AuditLog(env["users"]).entries() == []


def test_an_idle_hospital_session_is_not_resumed_from_its_cookie(env, monkeypatch) -> None:
    at = _hospital_tab(monkeypatch, ["radiology"], identity="signed-4").run()
    assert SESSION_KEY in at.session_state
    SessionStore(env["users"]).end("signed-4", reason=ENDED_IDLE)
    again = _hospital_tab(monkeypatch, ["radiology"], identity="signed-4").run()
    assert SESSION_KEY not in again.session_state
    assert "without activity" in texts(again, "info")


def test_a_session_kept_for_another_client_or_past_expiry_does_not_resume(store) -> None:
    sessions = SessionStore(store.path)
    session = Session(ROLE_CLINICIAN, (ROLE_CLINICIAN,), time.time() + 60)
    token = sessions.create(session, client="10.0.0.12")
    sessions.save_draft(token, Draft({"adapt_condition": "x"}, {"s": [Upload("a.png", b"1")]}))
    assert sessions.resume(token, client="10.0.0.12").session == session
    assert sessions.resume(token, client="10.0.0.66").session is None  # a stolen cookie
    assert sessions.resume(token, client="10.0.0.12", now=time.time() + 120).ended == "expired"
    assert sessions.load_draft(token) == Draft()
    assert sessions.resume("not-a-token").session is None


def test_activity_in_part_of_a_page_restarts_the_idle_clock(store) -> None:
    sessions = SessionStore(store.path)
    token = sessions.create(Session(ROLE_CLINICIAN, (ROLE_CLINICIAN,), time.time() + 600))
    start = time.time()
    sessions.touch(token, now=start + 100)
    assert sessions.idle_for(token, now=start + 150) == 50
    assert sessions.resume(token, idle_s=60, now=start + 150).session is not None
    assert sessions.end(token, reason=ENDED_IDLE) and not sessions.end(token)  # once
    assert sessions.idle_for(token) is None
