"""Administrator: the audit log of who classified what (and who exported it), newest first."""

import streamlit as st

from app.dashboard import ui
from app.dashboard.auth import ROLE_ADMIN
from app.dashboard.provenance import AUDIT_LIMIT, AuditLog
from models.errors import FedfewError

ui.require_role(ROLE_ADMIN)
config = ui.settings()
st.title("Audit log")
st.caption(
    "Every classification and every export of results on this node: who, when, with which "
    "adapter and base model, and how many cases. Cases are named by a digest of their content, "
    "never by file name (file names can identify patients)."
)
log = AuditLog(config.users_db)
user = st.text_input("Only this user", key="audit_user", placeholder="all users")
try:
    entries = log.entries(user=user.strip() or None)
except FedfewError as exc:
    ui.stop_with_error(exc)
if not entries:
    st.info("No classification recorded yet" + (f" for {user.strip()}." if user.strip() else "."))
    st.stop()
st.dataframe([e.row() for e in entries], hide_index=True, key="audit_table")
if len(entries) == AUDIT_LIMIT:
    st.caption(f"The newest {AUDIT_LIMIT} entries; name a user to see theirs.")
