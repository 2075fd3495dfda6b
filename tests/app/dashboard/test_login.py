"""Login page: first-run guidance, the local sign-in form (posted to the sign-in route, see
test_web_session.py), expiry, sign-out, and pages by role."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app.dashboard import settings
from app.dashboard.auth import MAX_FAILURES, ROLE_ADMIN, ROLE_CLINICIAN, ROLE_IT, Session
from app.dashboard.settings import ENV_SITE_NAME
from app.dashboard.ui import SESSION_KEY
from tests.app.dashboard.conftest import ENTRY, PASSWORD, TIMEOUT, texts
from tests.app.dashboard.pages import login


def test_first_run_explains_how_to_create_an_account(env: dict[str, Path]) -> None:
    at = AppTest.from_file(str(ENTRY), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert "fedfew users add --role clinician" in texts(at, "warning")
    assert not at.text_input  # no login form without any account


def test_the_login_form_posts_to_the_sign_in_route(store, make_app) -> None:
    at = make_app().run()
    (form,) = at.get("html")
    assert 'method="post" action="fedfew/login"' in form.proto.body
    assert 'name="username"' in form.proto.body and 'type="password"' in form.proto.body
    assert not at.text_input  # the password never goes through Streamlit's websocket


def test_login_as_clinician_shows_clinician_pages(store, registry, monkeypatch) -> None:
    at = login(monkeypatch, ROLE_CLINICIAN, PASSWORD)
    assert not at.exception
    session = at.session_state[SESSION_KEY]
    assert session.username == ROLE_CLINICIAN and session.roles == (ROLE_CLINICIAN,)
    assert at.title[0].value == "Adapt to a new condition"


def test_wrong_password_says_so(store, monkeypatch) -> None:
    at = login(monkeypatch, ROLE_CLINICIAN, "not the password")
    assert not at.exception
    assert "wrong username or password" in texts(at, "info")
    assert SESSION_KEY not in at.session_state


def test_repeated_failures_lock_the_account(store, monkeypatch) -> None:
    for _ in range(MAX_FAILURES):
        login(monkeypatch, ROLE_ADMIN, "wrong password!")
    at = login(monkeypatch, ROLE_ADMIN, PASSWORD)  # the right password, but locked now
    assert "too many failed logins" in texts(at, "info")
    assert SESSION_KEY not in at.session_state


def test_expired_session_returns_to_login(store, make_app) -> None:
    at = make_app(ROLE_ADMIN, hours=-0.1).run()
    assert not at.exception
    assert "session expired" in texts(at, "info")
    assert SESSION_KEY not in at.session_state
    assert at.get("html")  # the login form


def test_logout(store, make_app) -> None:
    at = make_app(ROLE_IT).run()
    at.switch_page("screens/account.py").run()
    at.sidebar.button(key="signout").click().run()
    assert not at.exception
    assert SESSION_KEY not in at.session_state
    assert "signed out" in texts(at, "info")


@pytest.mark.parametrize(
    ("role", "allowed", "forbidden"),
    [
        (ROLE_CLINICIAN, "screens/classify.py", "screens/privacy.py"),
        (ROLE_ADMIN, "screens/privacy.py", "screens/federation.py"),
        (ROLE_IT, "screens/federation.py", "screens/adapt.py"),
    ],
)
def test_pages_by_role(store, make_app, role: str, allowed: str, forbidden: str) -> None:
    at = make_app(role).run()
    assert not at.exception
    at.switch_page(allowed).run()
    assert not at.exception
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page(forbidden)


def test_logged_out_user_sees_only_login(store, make_app) -> None:
    at = make_app().run()
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("screens/adapt.py")


@pytest.mark.parametrize("page", ["privacy.py", "federation.py", "adapt.py", "classify.py"])
def test_page_opened_directly_checks_the_role(store, page: str) -> None:
    # Defence in depth: a page script run on its own refuses a session without its role.
    at = AppTest.from_file(str(ENTRY.parent / "screens" / page), default_timeout=TIMEOUT)
    at.session_state[SESSION_KEY] = Session("x", roles=("nobody",), expires_at=time.time() + 60)
    at.run()
    assert not at.exception
    assert "your account does not have it" in texts(at, "error")


def test_login_page_names_the_site_and_the_intended_use(store, make_app, monkeypatch) -> None:
    """Issue 24, item 15."""
    monkeypatch.setenv(ENV_SITE_NAME, "St Elsewhere")
    at = make_app().run()
    assert at.title[0].value == "fedfew dashboard · St Elsewhere"
    assert "Intended use" in texts(at, "warning") and "not a diagnosis" in texts(at, "warning")


def test_plain_http_to_the_network_is_said_on_every_page(store, make_app, monkeypatch) -> None:
    monkeypatch.setenv(settings.ENV_INSECURE_HTTP, "1")
    for at in (make_app().run(), make_app(ROLE_CLINICIAN).run(), make_app(ROLE_ADMIN).run()):
        assert not at.exception
        assert "served over plain HTTP (--insecure-http)" in texts(at, "warning")
    monkeypatch.delenv(settings.ENV_INSECURE_HTTP)
    assert "plain HTTP" not in texts(make_app(ROLE_CLINICIAN).run(), "warning")


def test_every_page_says_who_is_signed_in(store, registry, make_app) -> None:
    for role in (ROLE_CLINICIAN, ROLE_ADMIN, ROLE_IT):
        at = make_app(role).run()
        assert f"Signed in as **{role}** ({role})" in texts(at.sidebar, "markdown")
        assert at.sidebar.button(key="signout").label == "Sign out"
