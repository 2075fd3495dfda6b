"""Who is signed in, until when, and how sessions end (the Sign out button is in the sidebar of
every page)."""

import streamlit as st

from app.dashboard import ui

session = st.session_state.get(ui.SESSION_KEY)
if session is None:
    ui.stop_with_error("Sign in to open this page.")
st.title("Account")
st.write(f"Signed in as **{session.username}** ({', '.join(session.roles) or 'no role'}).")
idle = ui.settings().idle_minutes
st.caption(
    f"The session ends in {ui.remaining_time(session)}, or after {idle:g} minutes without "
    "activity. Sign out (in the sidebar) ends this account's sessions on every computer."
)
if not session.roles:
    st.warning("This account has no dashboard role, so no page is open to it.")
