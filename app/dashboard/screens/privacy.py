"""Administrator: each site's privacy budget, its charges and refusals, and a tamper check."""

import streamlit as st

from app.dashboard import budgets, ui
from app.dashboard.auth import ROLE_ADMIN
from app.dashboard.errors import user_message
from app.dashboard.settings import ENV_LEDGERS
from models.errors import FedfewError

VERIFY_KEY = "privacy_verified"  # path -> Verification of the last check
ALERT_PERCENT = 80  # default alert: a site near its cap has few rounds left to plan

ui.require_role(ROLE_ADMIN)
config = ui.settings()
st.title("Privacy budgets")
if not config.ledgers:
    st.warning(
        "No ledger configured. Start the dashboard with `fedfew dashboard --ledger PATH` "
        f"(one or more) or set {ENV_LEDGERS}."
    )
    st.stop()

found = budgets.read_budgets(config.ledgers)
for problem in (b for b in found if isinstance(b, budgets.LedgerProblem)):
    st.error(f"{problem.path}: {user_message(problem.message)}")
for tampered in (b for b in found if isinstance(b, budgets.TamperedLedger)):
    # No number from this file: not the spend, not the cap, not even the site name it claims.
    st.error(f"**Ledger `{tampered.path}`.** {user_message(tampered.message)}", icon="🚨")
sites = [b for b in found if isinstance(b, budgets.SiteBudget)]
if not sites:
    st.stop()

st.subheader("Epsilon over rounds")
rows = budgets.epsilon_rows(sites)
if rows:
    st.line_chart(rows + budgets.cap_rows(sites), x="round", y="epsilon", color="site", height=260)
    st.caption(
        "Cumulative epsilon after each charge, by federated round (several charges in one "
        "round draw a vertical step); the flat lines are the sites' caps."
    )
else:
    st.info("No charge recorded yet: no site has spent any of its budget.")
alert = st.number_input(
    "Alert when a site has spent this share of its cap (%)",
    min_value=10,
    max_value=100,
    value=ALERT_PERCENT,
    step=5,
    key="privacy_alert",
)
for site in sites:
    if 100 * site.fraction_spent >= alert:
        more = budgets.rounds_left(site)
        outlook = "" if more is None else f"; about {more} more round(s) at its latest spend"
        st.warning(
            f"Site {site.site} has spent {100 * site.fraction_spent:.0f}% of its cap "
            f"(alert at {alert:.0f}%){outlook}.",
            icon="⚠️",
        )

verified = st.session_state.setdefault(VERIFY_KEY, {})
for i, site in enumerate(sites):
    st.subheader(f"Site {site.site}")
    cap, spent, left, forecast = st.columns(4)
    cap.metric("Cap (epsilon)", f"{site.cap:.3g}")
    spent.metric("Spent", f"{site.spent:.3f}")
    left.metric("Remaining", f"{site.remaining:.3f}")
    rounds = budgets.rounds_left(site)
    forecast.metric(
        "Rounds left (forecast)",
        "-" if rounds is None else str(rounds),
        help="The remaining epsilon over what the site's latest round cost.",
    )
    st.progress(site.fraction_spent, text=f"{100 * site.fraction_spent:.0f}% of the cap spent")
    st.caption(f"delta {site.delta:.3g}, {site.accountant} accountant, ledger `{site.path}`")
    if site.charges:
        st.write(f"Charges ({len(site.charges)})")
        st.dataframe(budgets.entry_rows(site.charges), hide_index=True, key=f"privacy_charges_{i}")
    else:
        st.info("Empty ledger: no charge yet.")
    if site.refusals:
        st.write(f"Refusals ({len(site.refusals)}): runs the cap stopped before they computed")
        st.dataframe(
            budgets.entry_rows(site.refusals), hide_index=True, key=f"privacy_refusals_{i}"
        )
    else:
        st.caption("No refusals.")
    verify, html, csv = st.columns(3)
    if verify.button("Verify the record", key=f"privacy_verify_{i}"):
        try:
            verified[str(site.path)] = budgets.verify_ledger(site.path)
        except FedfewError as exc:
            ui.show_error(exc)
    outcome = verified.get(str(site.path))
    if outcome is not None:
        (st.success if outcome.intact else st.error)(user_message(outcome.message))
    for column, suffix in ((html, ".html"), (csv, ".csv")):
        try:
            data = budgets.report_bytes(site.path, suffix=suffix)
        except FedfewError as exc:
            ui.show_error(exc)
            continue
        column.download_button(
            f"Budget report ({suffix[1:].upper()})",
            data,
            file_name=f"budget-{site.site}{suffix}",
            mime=budgets.REPORT_MIME[suffix],
            key=f"privacy_report_{i}{suffix}",
        )
