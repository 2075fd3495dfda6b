"""Log in: local accounts (``fedfew users add``), or the hospital's identity provider when
``st.login`` is configured."""

import streamlit as st

from app.dashboard import ui
from app.dashboard.auth import UserStore, new_session
from app.dashboard.errors import AuthError, RateLimitedError
from app.dashboard.provenance import ACTION_LOCKED, ACTION_LOGIN, ACTION_LOGIN_FAILED

config = ui.settings()
st.title(f"fedfew dashboard · {config.site_name}" if config.site_name else "fedfew dashboard")
ui.show_notice()
ui.intended_use_notice()
store = UserStore(config.users_db)
oidc = ui.oidc_settings()

if oidc is not None:
    st.button("Log in with your hospital account", on_click=st.login, type="primary")
    st.caption("Or with a local account:")

if not store.users():
    st.warning(
        "No account exists yet. On this machine, create the first one with\n\n"
        "`fedfew users add --role clinician` (or `--role administrator`, `--role it`)\n\n"
        f"It is stored in `{config.users_db}`."
    )
else:
    with st.form("login"):
        username = st.text_input("Username", key="login_username")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button("Log in", type="primary")
    if submitted:
        client = ui.client_address()
        try:
            user = store.authenticate(username, password, client=client)
        except RateLimitedError as exc:
            ui.audit_event(
                ACTION_LOGIN_FAILED, user=username.strip(), detail=f"refused, throttled: {client}"
            )
            ui.show_error(exc)
        except AuthError as exc:
            ui.audit_event(ACTION_LOGIN_FAILED, user=username.strip(), detail=f"{exc}: {client}")
            wait = store.retry_after(username.strip(), client=client)
            if wait > 0:  # this failure made the client wait: the account is locked for it
                ui.audit_event(
                    ACTION_LOCKED, user=username.strip(), detail=f"{client} waits {wait:.0f} s"
                )
            ui.show_error(exc)
        else:
            ui.audit_event(ACTION_LOGIN, user=user.username, detail=f"from {client}")
            ui.start_session(new_session(user.username, (user.role,), hours=config.session_hours))
            st.rerun()
