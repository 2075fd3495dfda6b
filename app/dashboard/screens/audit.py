"""Administrator: the audit log, newest first: who classified what (and exported or wrote it
back), and the account events (logins, failed logins, throttling, logouts, administrators'
changes)."""

import streamlit as st

from app.dashboard import ui
from app.dashboard.auth import ROLE_ADMIN
from app.dashboard.provenance import AUDIT_LIMIT, AuditLog
from models.errors import FedfewError

ui.require_role(ROLE_ADMIN)
config = ui.settings()
st.title("Audit log")
st.caption(
    "One row per action on this node: each classification (the cases it added), export and "
    "write-back, with who, when, which adapter and base model and how many cases; and each "
    "login, failed login, throttling, logout and administrator's change to an account. Cases "
    "are named by a digest of their content, never by file name (file names can identify "
    "patients)."
)
log = AuditLog(config.users_db)
user = st.text_input("Only this user", key="audit_user", placeholder="all users")
try:
    entries = log.entries(user=user.strip() or None)
except FedfewError as exc:
    ui.stop_with_error(exc)
if not entries:
    st.info("Nothing recorded yet" + (f" for {user.strip()}." if user.strip() else "."))
    st.stop()
st.dataframe([e.row() for e in entries], hide_index=True, key="audit_table")
if len(entries) == AUDIT_LIMIT:
    st.caption(f"The newest {AUDIT_LIMIT} entries; name a user to see theirs.")
