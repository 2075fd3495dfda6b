"""Who is signed in, on every run of the entry file: the session found from the browser's cookie
(a local account's ``fedfew_session``, or Streamlit's identity cookie after the hospital's
sign-in), its idle and absolute timeouts, the "signed in as ... / sign out" bar on every page,
and the watch that signs a walk-away workstation out.

Every run checks the server-side session again (app/dashboard/persistence.py), so a sign-out or
a disabled account elsewhere ends this browser's session at its next click or watch tick.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

from app.dashboard import ui
from app.dashboard.auth import Session, UserStore, new_session, role_from_claims
from app.dashboard.errors import DashboardError, user_message
from app.dashboard.oidc import DEFAULT_ROLE_CLAIM, SECRETS_SECTION
from app.dashboard.persistence import (
    ENDED_DISABLED,
    ENDED_EXPIRED,
    ENDED_IDLE,
    ENDED_LOGOUT,
    ENDED_REFUSED,
    Draft,
    Resumed,
)
from app.dashboard.provenance import (
    ACTION_LOGIN,
    ACTION_LOGIN_FAILED,
    ACTION_LOGOUT,
    ACTION_ROLES_CHANGED,
)
from app.dashboard.web_session import IDENTITY_COOKIE, SESSION_COOKIE, read_notice

# An identity the dashboard has not seen counts as a new sign-in only this soon after the
# provider issued its ID token; an older one is a cookie left from a session that ended.
FRESH_SIGNIN_S = 300.0
NOTICE_SEEN_KEY = "fedfew_notice_seen"  # the route's notice shown in this browser session
# What the login page says after a session ended without the user asking.
ENDED_NOTICES = {
    ENDED_IDLE: "You were signed out after {idle} without activity. Sign in again to continue.",
    ENDED_EXPIRED: "Your session expired. Sign in again to continue.",
    ENDED_DISABLED: "Your session was ended by an administrator.",
    ENDED_LOGOUT: "You are signed out.",
}


def request_cookies() -> Mapping[str, str]:
    """The cookies the browser sent with this session's websocket (HttpOnly ones included)."""
    try:
        return dict(st.context.cookies)
    except (AttributeError, RuntimeError):  # no browser (a test harness)
        return {}


def oidc_settings() -> Mapping[str, Any] | None:
    """The ``[fedfew_oidc]`` secrets when ``st.login`` is configured (an ``[auth]`` section)."""
    try:
        if "auth" not in st.secrets:
            return None
        section = st.secrets.get(SECRETS_SECTION, {})
    except StreamlitSecretNotFoundError:  # no secrets at all: local accounts only
        return None
    return dict(section)


def identity_token(cookies: Mapping[str, str]) -> str | None:
    """The session token of a hospital sign-in: Streamlit's signed identity cookie (with its
    chunks), which changes at every sign-in; None without one."""
    parts = [cookies[k] for k in sorted(cookies) if k.startswith(IDENTITY_COOKIE)]
    return "|".join(parts) if parts else None


def _ended_notice(reason: str | None) -> None:
    template = ENDED_NOTICES.get(reason or "")
    if template:  # a fresher notice (a refused sign-in just now) goes first
        idle = f"{ui.settings().idle_minutes:g} minutes"
        st.session_state.setdefault(ui.NOTICE_KEY, template.format(idle=idle))


def _adopt(session: Session, token: str, draft: Draft | None) -> Session:
    st.session_state[ui.SESSION_KEY] = session
    st.session_state[ui.TOKEN_KEY] = token
    if draft is not None:
        st.session_state[ui.DRAFT_KEY] = draft
    return session


def _live(token: str, *, restore: bool) -> Session | None:
    """The live session of ``token`` (touched: this run is activity), checked against the
    account database; ends it when the account is disabled or removed."""
    config = ui.settings()
    store = ui.session_store()
    try:
        resumed = store.resume(token, client=ui.client_address(), idle_s=config.idle_s)
        session = resumed.session
        if (
            session is not None
            and session.source == "local"
            and not UserStore(config.users_db).active(session.username)
        ):
            store.end(token, reason=ENDED_DISABLED)
            session, resumed = None, Resumed(None, ENDED_DISABLED)
        draft = store.load_draft(token) if session is not None and restore else None
    except DashboardError as exc:
        ui.stop_with_error(exc)
    if session is None:
        _ended_notice(resumed.ended)
        return None
    return _adopt(session, token, draft)


def _fresh(claims: Mapping[str, Any]) -> bool:
    issued = claims.get("iat") or claims.get("auth_time")
    return isinstance(issued, int | float) and time.time() - float(issued) < FRESH_SIGNIN_S


def _say_refused() -> None:
    st.session_state[ui.NOTICE_KEY] = (
        f"You signed in as {st.user.get('email') or st.user.get('sub')}, but your hospital "
        "account has no dashboard role. Ask IT to add you to a dashboard group."
    )


def _hospital_sign_in(oidc: Mapping[str, Any], token: str) -> Session | None:
    """A new hospital sign-in: its roles from the ID token's claim, recorded in the audit log;
    refused (and remembered as refused) without a dashboard role."""
    claims = dict(st.user)
    if not _fresh(claims):
        return None  # a cookie from before: the user signs in again
    config = ui.settings()
    name = str(claims.get("email") or claims.get("preferred_username") or claims.get("sub"))
    roles = role_from_claims(
        claims,
        claim=str(oidc.get("role_claim", DEFAULT_ROLE_CLAIM)),
        mapping=dict(oidc.get("roles", {})),
    )
    session = new_session(name, roles, hours=config.session_hours, source="oidc")
    client = ui.client_address()
    store = ui.session_store()
    if not roles:
        store.create(session, client=client, token=token, ended=ENDED_REFUSED)
        ui.audit_event(
            ACTION_LOGIN_FAILED, user=name, detail=f"hospital sign-in without a role: {client}"
        )
        _say_refused()
        return None
    store.create(session, client=client, token=token)
    ui.audit_event(
        ACTION_LOGIN, user=name, detail=f"hospital sign-in, {', '.join(roles)}: {client}"
    )
    before = store.remember_roles(name, roles)
    if before is not None and before != roles:
        ui.audit_event(
            ACTION_ROLES_CHANGED,
            user=name,
            detail=f"{', '.join(before) or 'none'} -> {', '.join(roles)}",
        )
    return _adopt(session, token, None)


def _from_cookies() -> Session | None:
    """After a reload or a sign-in: the session the browser's cookies name, with its draft."""
    cookies = request_cookies()
    notice = read_notice(cookies)
    if notice and st.session_state.get(NOTICE_SEEN_KEY) != notice:
        st.session_state[NOTICE_SEEN_KEY] = notice
        st.session_state[ui.NOTICE_KEY] = notice
    local = cookies.get(SESSION_COOKIE)
    if local:
        session = _live(local, restore=True)
        if session is not None:
            return session
    oidc = oidc_settings()
    token = identity_token(cookies)
    if oidc is None or token is None or not st.user.is_logged_in:
        return None
    try:
        resumed = ui.session_store().resume(token, client=ui.client_address(), touch=False)
        if resumed.session is None and resumed.ended is None:
            return _hospital_sign_in(oidc, token)
    except DashboardError as exc:
        ui.stop_with_error(exc)
    if resumed.ended == ENDED_REFUSED:
        _say_refused()
        return None
    return _live(token, restore=True)


def current_session() -> Session | None:
    """The signed-in session, or None. A session kept server-side is checked again on every run
    (idle and absolute timeouts, sign-out elsewhere, account disabled)."""
    session: Session | None = st.session_state.get(ui.SESSION_KEY)
    token = st.session_state.get(ui.TOKEN_KEY)
    if session is not None and token:
        session = _live(token, restore=False)
        if session is None:
            _clear_state()
    elif session is None:
        session = _from_cookies()
    if session is not None and session.expired():
        end_session(reason=ENDED_EXPIRED)
        return None
    return session


def _clear_state() -> None:
    notice = st.session_state.get(ui.NOTICE_KEY)
    seen = st.session_state.get(NOTICE_SEEN_KEY)
    for key in list(st.session_state.keys()):
        del st.session_state[key]
    if notice:
        st.session_state[ui.NOTICE_KEY] = notice
    if seen:
        st.session_state[NOTICE_SEEN_KEY] = seen


def end_session(*, reason: str = ENDED_LOGOUT) -> None:
    """Sign out (or time out): end every server-side session of this account (a sign-out
    signs the account out on every computer), forget what was entered, and for a hospital
    sign-in also clear Streamlit's identity cookie."""
    session: Session | None = st.session_state.get(ui.SESSION_KEY)
    token = st.session_state.get(ui.TOKEN_KEY)
    problem = ""
    try:
        store = ui.session_store()
        if token:
            store.end(token, reason=reason)
        if session is not None and reason == ENDED_LOGOUT:
            store.end_user(session.username, reason=reason)
    except DashboardError as exc:  # signed out here all the same; the rows expire on time
        problem = f" The server could not forget the session: {user_message(exc)}"
    _clear_state()
    _ended_notice(reason)
    if problem:
        st.session_state[ui.NOTICE_KEY] = st.session_state.get(ui.NOTICE_KEY, "") + problem
    hospital = session is not None and session.source == "oidc"
    if hospital and reason == ENDED_LOGOUT and st.user.is_logged_in:
        st.logout()


def sign_out() -> None:
    """The Sign out button's action: recorded, then every session of the account ends."""
    ui.audit_event(ACTION_LOGOUT)
    end_session(reason=ENDED_LOGOUT)


def note_activity() -> None:
    """A click that reran only a fragment of the page: the idle clock starts again."""
    token = st.session_state.get(ui.TOKEN_KEY)
    if token:
        try:
            ui.session_store().touch(token)
        except DashboardError as exc:
            ui.show_error(exc)


def _watch(token: str, idle_s: float) -> None:
    """Ends the session once it has been idle ``idle_s`` seconds (or ended elsewhere)."""
    try:
        store = ui.session_store()
        idle = store.idle_for(token)
        # Recorded once, by the tab that ends it (another tab of the session finds it ended).
        if idle is not None and idle >= idle_s and store.end(token, reason=ENDED_IDLE):
            ui.audit_event(ACTION_LOGOUT, detail=f"idle {idle / 60:.0f} min")
    except DashboardError:
        return  # the next click says why
    if idle is None or idle >= idle_s:
        end_session(reason=ENDED_IDLE if idle is not None else ENDED_LOGOUT)
        st.rerun(scope="app")


def account_bar(session: Session | None) -> None:
    """On every page: the plain-HTTP warning when chosen, and "signed in as ... / sign out" with
    the idle watch in the sidebar."""
    config = ui.settings()
    if config.insecure_http:
        st.warning(
            "This dashboard is served over plain HTTP (--insecure-http): passwords and patient "
            "data cross the network unencrypted. Ask IT to serve it over HTTPS.",
            icon=":material/lock_open:",
        )
    if session is None:
        return
    with st.sidebar:
        roles = ", ".join(session.roles) or "no role"
        st.markdown(f"Signed in as **{session.username}** ({roles})")
        st.button("Sign out", key="signout", on_click=sign_out)
        token = st.session_state.get(ui.TOKEN_KEY)
        if token:
            every = max(2.0, min(30.0, config.idle_s / 4))
            st.fragment(_watch, run_every=every)(token, config.idle_s)


def signed_in_frame() -> Session | None:
    """What the entry file needs on every run: the signed-in session (or None), after drawing
    the plain-HTTP banner and the "signed in as ... / sign out" bar."""
    session = current_session()
    account_bar(session)
    return session
