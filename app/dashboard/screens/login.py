"""Sign in: the hospital's identity provider when ``--oidc`` configured it, and local accounts
(``fedfew users add``, for small sites and as the break-glass path). The local form posts to the
dashboard's own route (app/dashboard/web_session.py), whose answer sets the HttpOnly session
cookie: the password never passes through the page's websocket, the token never through a URL."""

import html

import streamlit as st

from app.dashboard import signin, ui
from app.dashboard.auth import UserStore
from app.dashboard.web_session import FORM_PASSWORD, FORM_USERNAME, LOGIN_PATH

config = ui.settings()
st.title(f"fedfew dashboard · {config.site_name}" if config.site_name else "fedfew dashboard")
ui.show_notice()
ui.intended_use_notice()
store = UserStore(config.users_db)

hospital = signin.oidc_settings() is not None
local = bool(store.users())
if hospital:
    st.button(
        "Log in with your hospital account", key="login_oidc", on_click=st.login, type="primary"
    )
    if local:
        st.caption("Or with a local account of this dashboard:")

if not local and not hospital:
    st.warning(
        "No account exists yet. On this machine, create the first one with\n\n"
        "`fedfew users add --role clinician` (or `--role administrator`, `--role it`)\n\n"
        f"It is stored in `{config.users_db}`."
    )
elif local:
    # A plain HTML form: its POST goes to the server's sign-in route, not through Streamlit.
    action = html.escape(LOGIN_PATH.lstrip("/"))  # relative: works under a proxy's path too
    st.html(
        f"""
<form method="post" action="{action}" class="fedfew-login" autocomplete="on">
  <label>Username<br><input name="{FORM_USERNAME}" autocomplete="username" required></label>
  <label>Password<br><input name="{FORM_PASSWORD}" type="password"
    autocomplete="current-password" required></label>
  <button type="submit">Log in</button>
</form>
<style>
  .fedfew-login {{ display: flex; flex-direction: column; gap: .75rem; max-width: 22rem; }}
  .fedfew-login input {{ width: 100%; padding: .5rem; border: 1px solid #ccc;
    border-radius: .5rem; font: inherit; }}
  .fedfew-login button {{ align-self: flex-start; padding: .4rem 1rem; border-radius: .5rem;
    border: none; background: #ff4b4b; color: white; font: inherit; cursor: pointer; }}
</style>
"""
    )
