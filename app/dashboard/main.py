"""Entry file of the dashboard (``fedfew dashboard`` serves it through app/dashboard/server.py):
it only routes. The pages a user sees depend on their roles; signed out, only the login page.
Every page shows who is signed in, with a Sign out button (app/dashboard/signin.py)."""

import streamlit as st

from app.dashboard import signin, ui

st.set_page_config(page_title="fedfew", page_icon=":material/health_and_safety:", layout="wide")
st.navigation(ui.navigation_pages(signin.signed_in_frame())).run()
