"""IT: model versions and their metrics, the sites' privacy reports, SuperLink reachability and
the federation's status file."""

import streamlit as st

from app.dashboard import network, ui
from app.dashboard.auth import ROLE_IT
from app.dashboard.errors import user_message
from app.dashboard.settings import ENV_SUPERLINK, SUPERLINK_TIMEOUT_S
from models.errors import RegistryError

ui.require_role(ROLE_IT)
config = ui.settings()
st.title("Federation")

st.subheader("SuperLink")
reach = None
if config.superlink is None:
    st.info(
        f"No SuperLink configured (`fedfew dashboard --superlink HOST:PORT` or {ENV_SUPERLINK})."
    )
else:
    host, port = config.superlink
    reach = network.check_reachable(host, port, timeout_s=SUPERLINK_TIMEOUT_S)
    (st.success if reach.reachable else st.error)(user_message(reach.detail))
st.button("Check again", key="federation_recheck")

st.subheader("Federation status")
try:
    status = network.read_status(config.federation_status)
except RegistryError as exc:
    status = None
    ui.show_error(exc)
else:
    if status is None:
        st.info(network.NO_STATUS.capitalize() + ".")
    else:
        sentence = network.status_sentence(
            status, superlink_up=None if reach is None else reach.reachable
        )
        (st.warning if status.stale else st.success)(sentence)
        when = status.updated.strftime("%Y-%m-%d %H:%M:%S UTC") if status.updated else "unknown"
        st.caption(f"Federation {status.federation or '?'}; last report {when}.")
        summaries = network.node_summaries(status)
        if summaries:
            st.markdown("**What each site did**\n\n" + "\n".join(f"- {x}" for x in summaries))
        if status.rounds:
            with st.expander("Round records, as the server wrote them"):
                st.dataframe(
                    network.arrow_safe(status.rounds), hide_index=True, key="federation_rounds"
                )

st.subheader("Model versions")
try:
    entries = network.registry_entries(config.registry)
except RegistryError:
    st.warning(
        f"No model yet: no registry at `{config.registry}`. It appears when the federation "
        "delivers its first global model (or run `fedfew demo` to try the dashboard)."
    )
    st.stop()
if not entries:
    st.info("The registry is empty: no model version yet.")
    st.stop()
st.dataframe(
    network.arrow_safe(network.version_rows(entries)), hide_index=True, key="federation_versions"
)
series = network.metric_series(entries, rounds=status.rounds if status is not None else [])
if network.chartable(series):
    st.subheader("Model quality per round")
    import altair as alt

    chart = (
        alt.Chart(alt.Data(values=series))
        .mark_line(point=True)
        .encode(
            x=alt.X("round:O", title="round"),  # whole rounds, not a continuous axis
            y=alt.Y("value:Q", title=None),
            color=alt.Color("metric:N", title="metric"),
        )
        .properties(height=260)
    )
    st.altair_chart(chart, key="federation_quality")
elif series:
    st.caption(
        "Model quality, one round so far: "
        + ", ".join(f"{r['metric']} {r['value']:.3g} (round {r['round']})" for r in series)
        + ". A chart appears once there are two rounds."
    )
privacy = network.privacy_rows(entries)
st.subheader("Privacy reports per version")
if privacy:
    st.dataframe(network.arrow_safe(privacy), hide_index=True, key="federation_privacy")
    st.caption(
        "Each reply carries the site's ledger head (head hash, rows, epsilon), signed with the "
        "node's key; the server keeps them, so `fedfew budget verify --ledger L --against "
        "<server registry>` detects a ledger that was rebuilt, truncated or rolled back."
    )
    unsigned = sorted({r["site"] for r in privacy if r.get("head-check") == network.UNSIGNED})
    if unsigned:
        st.warning(
            f"Unsigned ledger heads from {', '.join(unsigned)}: set `node-key` in the node "
            "config (the SuperNode's key from `fedfew node init`) so the record is signed."
        )
    if any("error" in r for r in privacy):
        st.error("Some privacy reports are unreadable (see the error column).")
else:
    st.info("No version carries a privacy report yet.")
