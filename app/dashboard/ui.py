"""Streamlit glue shared by the entry file and the pages: the session, role gating, navigation,
settings and messages. Session-state keys are defined here, once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import streamlit as st

from app.dashboard.auth import ROLE_ADMIN, ROLE_CLINICIAN, ROLE_IT, Session
from app.dashboard.errors import DashboardError, user_message
from app.dashboard.persistence import SessionStore
from app.dashboard.settings import DashboardSettings, load_settings

PAGES_DIR = Path(__file__).resolve().parent / "screens"
SESSION_KEY = "fedfew_session"
TOKEN_KEY = "fedfew_session_token"  # the server-side session's token (persistence.SessionStore)
DRAFT_KEY = "fedfew_restored_draft"  # the draft found at a reload, for the pages to take back
NOTICE_KEY = "fedfew_notice"  # a message to show once on the next page (e.g. "session expired")

# Preparing for a modality: a clinician who brings a new kind of study, or IT who points the
# node at a hospital archive folder.
PREPARE_PAGE = ("prepare.py", "Prepare for a new modality", ":material/model_training:")
PREPARE_ROLES = (ROLE_CLINICIAN, ROLE_IT)
# (file in screens/, title, icon) per role; a user sees the union of the pages of their roles.
ROLE_PAGES: dict[str, tuple[tuple[str, str, str], ...]] = {
    ROLE_CLINICIAN: (
        ("adapt.py", "Adapt to a new condition", ":material/biotech:"),
        ("classify.py", "Classify cases", ":material/radiology:"),
        PREPARE_PAGE,
    ),
    ROLE_ADMIN: (
        ("privacy.py", "Privacy budgets", ":material/shield_lock:"),
        ("audit.py", "Audit log", ":material/fact_check:"),
        ("users.py", "Users", ":material/manage_accounts:"),
    ),
    ROLE_IT: (("federation.py", "Federation", ":material/hub:"), PREPARE_PAGE),
}
ACCOUNT_PAGE = ("account.py", "Account", ":material/person:")
LOGIN_PAGE = ("login.py", "Log in", ":material/login:")
LOCAL_DATA_NOTICE = (
    "Uploaded images and adapters stay on this hospital's machine: they are kept in this "
    "node's local registry and are never sent to the federation."
)

INTENDED_USE = (
    "**Intended use:** decision support for trained clinicians only. fedfew suggests a class "
    "from a few example cases; it is not a diagnosis, it has not been cleared as a medical "
    "device, and every result must be checked by a clinician before it influences care."
)


def intended_use_notice() -> None:
    """The intended-use notice every clinician page shows under its title."""
    st.warning(INTENDED_USE, icon=":material/info:")


def settings() -> DashboardSettings:
    """The dashboard settings; a malformed setting stops the page with its message."""
    try:
        return load_settings()
    except DashboardError as exc:
        stop_with_error(exc)


def show_error(exc: Exception | str) -> None:
    """Show one clear message (never an exception class name or traceback)."""
    st.error(user_message(exc))


def stop_with_error(exc: Exception | str) -> NoReturn:
    """Show one clear message and end this run of the page (no traceback)."""
    show_error(exc)
    st.stop()


def client_address() -> str:
    """The browser's address as the server sees it (login throttling is per client); "unknown"
    when there is none (a test harness, or a server that does not say)."""
    from app.dashboard.web_session import client_label

    address = st.context.ip_address
    return client_label(address if isinstance(address, str) else None)


def session_store() -> SessionStore:
    """The server-side sessions and drafts (in the dashboard's SQLite file)."""
    return SessionStore(settings().users_db)


def show_notice() -> None:
    """Show (once) a notice left by the previous run."""
    notice = st.session_state.pop(NOTICE_KEY, None)
    if notice:
        st.info(notice)


def role_pages(roles: Sequence[str]) -> list[tuple[str, str, str]]:
    """The pages of ``roles`` in role order; a page shared by several roles appears once."""
    return list(dict.fromkeys(spec for role in roles for spec in ROLE_PAGES.get(role, ())))


def navigation_pages(session: Session | None) -> list[Any]:
    """The pages this session may open (only the login page when logged out)."""

    def page(spec: tuple[str, str, str], *, default: bool = False) -> Any:
        file, title, icon = spec
        return st.Page(PAGES_DIR / file, title=title, icon=icon, default=default)

    if session is None:
        return [page(LOGIN_PAGE, default=True)]
    specs = role_pages(session.roles)
    pages = [page(spec, default=i == 0) for i, spec in enumerate(specs)]
    return [*pages, page(ACCOUNT_PAGE, default=not pages)]


def require_role(role: str, *others: str) -> Session:
    """The session, if it holds ``role`` (or one of ``others``); otherwise the page stops with a
    message.

    Navigation already hides pages a role may not open; this also guards a page opened directly.
    """
    session: Session | None = st.session_state.get(SESSION_KEY)
    if session is None or session.expired():
        stop_with_error("Log in to open this page.")
    allowed = (role, *others)
    if not set(allowed) & set(session.roles):
        stop_with_error(
            f"This page is for the {' or '.join(allowed)} role; your account does not have it."
        )
    return session


def remaining_time(session: Session) -> str:
    """How long until the session expires, e.g. ``7 h 59 min``."""
    minutes = max(0, int((session.expires_at - time.time()) // 60))
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _preferences() -> Any:
    from app.dashboard.preferences import Preferences

    return Preferences(settings().users_db)


def _username() -> str | None:
    session: Session | None = st.session_state.get(SESSION_KEY)
    return session.username if session is not None else None


def recall_choice(key: str, name: str, options: Sequence[Any], *, fallback: Any = None) -> bool:
    """Before the selectbox ``key`` is drawn: when it holds no valid option (first visit, a
    page switch, a reload), put back the user's remembered choice ``name`` (else ``fallback``,
    which may be None: nothing chosen). Returns whether the widget now holds an option (pass
    ``index=0`` then, else ``index=None``).

    A remembered choice that is no longer offered (a version deleted) is not replaced by
    another: the fallback applies, which is the page's documented default, never "the newest".
    """
    from app.dashboard.preferences import chosen

    if key in st.session_state and st.session_state[key] in options:
        return True
    user = _username()
    try:
        stored = _preferences().get(user, name) if user else None
    except DashboardError:
        stored = None  # unreadable: the page still works, with its default
    value = chosen(options, stored, fallback=lambda: fallback)
    if value is None:
        st.session_state.pop(key, None)
        return False
    st.session_state[key] = value
    return True


def remember_choice(key: str, name: str) -> None:
    """A selectbox's ``on_change``: remember the user's new choice (a failure to store it is
    shown, and the choice still holds for this session)."""
    user = _username()
    value = st.session_state.get(key)
    if not user or value is None:
        return
    try:
        _preferences().set(user, name, str(value))
    except DashboardError as exc:
        st.session_state[NOTICE_KEY] = f"Your choice could not be remembered: {user_message(exc)}"


def audit_event(action: str, *, detail: str = "", user: str | None = None) -> None:
    """Record an account event (``provenance.ACTION_LOGIN``...) in the audit log, as ``user``
    (default: who is logged in); a log that cannot be written is said on the page."""
    from app.dashboard.provenance import AuditLog

    who = user if user is not None else (_username() or "")
    try:
        AuditLog(settings().users_db).record_event(user=who, action=action, detail=detail)
    except DashboardError as exc:
        st.error(f"The audit log could not be written: {user_message(exc)}")
