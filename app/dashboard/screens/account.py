"""Who is logged in, until when, and the logout button."""

import streamlit as st

from app.dashboard import ui
from app.dashboard.provenance import ACTION_LOGOUT

session = ui.current_session()
if session is None:
    ui.stop_with_error("Log in to open this page.")
st.title("Account")
st.write(f"Logged in as **{session.username}** ({', '.join(session.roles) or 'no role'}).")
st.caption(f"The session ends in {ui.remaining_time(session)}.")
if not session.roles:
    st.warning("This account has no dashboard role, so no page is open to it.")
if st.button("Log out", key="logout"):
    ui.audit_event(ACTION_LOGOUT)
    ui.end_session(notice="You are logged out.")
    st.rerun()
