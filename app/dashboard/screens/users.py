"""Administrator: the dashboard's local accounts: add, disable or enable, unlock, reset a
password. Disabling an account also ends its open sessions."""

from collections.abc import Callable

import streamlit as st

from app.dashboard import ui
from app.dashboard.auth import MIN_PASSWORD_CHARS, ROLE_ADMIN, ROLES, UserStore
from app.dashboard.errors import DashboardError, user_message
from app.dashboard.persistence import ENDED_DISABLED
from app.dashboard.provenance import (
    ACTION_ACCOUNT_ADDED,
    ACTION_DISABLED,
    ACTION_ENABLED,
    ACTION_PASSWORD_RESET,
    ACTION_UNLOCKED,
)

DONE_KEY = "users_done"  # the last action's confirmation, shown once

session = ui.require_role(ROLE_ADMIN)
config = ui.settings()
store = UserStore(config.users_db)
st.title("Users")
st.caption(
    "Local accounts of this dashboard. Wrong passwords slow down only the computer they come "
    "from; Unlock lifts that for every computer at once."
)


def done(message: str) -> None:
    st.session_state[DONE_KEY] = message


def act(action: Callable[[], object], message: str, event: str = "", account: str = "") -> None:
    """Run a store action from a button; show its message, or the error in words; a change
    that was made is recorded in the audit log as ``event`` on ``account``."""
    try:
        action()
    except DashboardError as exc:
        done(f"Not done: {user_message(exc)}")
    else:
        done(message)
        if event:
            ui.audit_event(event, detail=f"account {account}")


def disable_and_log_out(username: str) -> None:
    store.set_disabled(username, True)
    ui.session_store().end_user(username, reason=ENDED_DISABLED)


if st.session_state.get(DONE_KEY):
    st.info(st.session_state.pop(DONE_KEY))

try:
    users = store.users()
except DashboardError as exc:
    ui.stop_with_error(exc)
st.dataframe(
    [
        {
            "user": u.username,
            "role": u.role,
            "created": u.created,
            "status": "disabled" if u.disabled else "active",
            "throttled computers": store.throttled_clients(u.username),
        }
        for u in users
    ],
    hide_index=True,
    key="users_table",
)

st.subheader("Change an account")
names = [u.username for u in users]
if names:
    name = st.selectbox("Account", names, key="users_pick")
    chosen = next(u for u in users if u.username == name)
    disable, unlock = st.columns(2)
    if chosen.disabled:
        disable.button(
            "Enable",
            key="users_enable",
            on_click=act,
            args=(
                lambda: store.set_disabled(name, False),
                f"{name} is enabled.",
                ACTION_ENABLED,
                name,
            ),
        )
    else:
        disable.button(
            "Disable",
            key="users_disable",
            disabled=name == session.username,  # an administrator cannot lock themself out
            on_click=act,
            args=(
                lambda: disable_and_log_out(name),
                f"{name} is disabled and logged out.",
                ACTION_DISABLED,
                name,
            ),
        )
    unlock.button(
        "Unlock",
        key="users_unlock",
        on_click=act,
        args=(
            lambda: store.unlock(name),
            f"{name} may log in again from every computer.",
            ACTION_UNLOCKED,
            name,
        ),
    )
    with st.form("users_reset", clear_on_submit=True):
        new_password = st.text_input("New password", type="password", key="users_new_password")
        if st.form_submit_button("Reset password"):
            act(
                lambda: store.reset_password(name, new_password),
                f"{name} has a new password; tell them through a separate channel.",
                ACTION_PASSWORD_RESET,
                name,
            )
            st.rerun()

st.subheader("Add an account")
with st.form("users_add", clear_on_submit=True):
    username = st.text_input("Username", key="users_add_name")
    role = st.selectbox("Role", ROLES, key="users_add_role")
    password = st.text_input(
        "Password",
        type="password",
        key="users_add_password",
        help=f"At least {MIN_PASSWORD_CHARS} characters.",
    )
    if st.form_submit_button("Add"):
        act(
            lambda: store.add(username, password, role=role),
            f"{username.strip()} added.",
            ACTION_ACCOUNT_ADDED,
            f"{username.strip()} ({role})",
        )
        st.rerun()
