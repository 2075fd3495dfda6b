"""Entry file of the dashboard (``fedfew dashboard`` or ``streamlit run app/dashboard/main.py``):
it only routes. The pages a user sees depend on their roles; logged out, only the login page."""

import streamlit as st

from app.dashboard import ui

st.set_page_config(page_title="fedfew", page_icon=":material/health_and_safety:", layout="wide")
st.navigation(ui.navigation_pages(ui.current_session())).run()
