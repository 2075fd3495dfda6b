"""The dashboard's server (``fedfew dashboard`` runs ``streamlit run`` on this file): Streamlit's
ASGI app around the entry file main.py, with the dashboard's sign-in routes
(app/dashboard/web_session.py) and, when ``--oidc CONFIG`` was given, the hospital sign-in's
``[auth]`` secrets, handed over in memory (never written to a file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st
from starlette.middleware import Middleware

from app.dashboard.oidc import load_oidc_config, streamlit_secrets
from app.dashboard.settings import load_settings
from app.dashboard.web_session import SignInWatch

ENTRY_FILE = Path(__file__).resolve().parent / "main.py"


def _secrets() -> dict[str, Any] | None:
    oidc = load_settings().oidc_config
    return streamlit_secrets(load_oidc_config(oidc)) if oidc is not None else None


app = st.App(ENTRY_FILE, secrets=_secrets(), middleware=[Middleware(SignInWatch)])
