"""Clinician or IT: prepare a model version for a new modality from this hospital's unlabelled
studies; the result is a local version that the Adapt page offers."""

import streamlit as st

from app.dashboard import adapters, domain_prep, ui
from app.dashboard.auth import ROLE_CLINICIAN, ROLE_IT
from models.domain import DOMAIN_METHODS, DomainConfig
from models.errors import FedfewError, RegistryError

PREPARED_KEY = "prepare_published"  # label of the version published in this session

session = ui.require_role(ROLE_CLINICIAN, ROLE_IT)
config = ui.settings()
st.title("Prepare for a new modality")
ui.intended_use_notice()
st.caption(
    "Point at studies of the new kind (no labels needed) on this hospital's disk. The model "
    f"learns what they look like; the result is a new model version, {domain_prep.LOCAL_ONLY}. "
    "No privacy budget is spent: nothing leaves this machine."
)

try:
    models = adapters.base_models(config.registry, local=False, public=False)
except RegistryError:
    models = []
if not models:
    st.warning(
        f"No model yet: this node's registry (`{config.registry}`) holds no global model to "
        "prepare. Wait for the federation to deliver one, or run `fedfew demo`."
    )
    st.stop()

by_id = {e.id: e for e in models}
source_text = st.text_input(
    "Studies (folder, CSV manifest or .npz)",
    key="prepare_source",
    placeholder="/data/archive/new-modality",
    help="A folder (searched with its subfolders), a CSV with a `path` column, or an .npz "
    "image set. Labels in the files are never read.",
)
if config.data_roots:
    st.caption("Allowed folders: " + ", ".join(f"`{r}`" for r in config.data_roots))
base_id = st.selectbox(
    "Base model",
    list(by_id),
    format_func=lambda v: domain_prep.version_label(by_id[v]),
    key="prepare_base",
    help="The federated model version to prepare, newest first.",
)
methods = list(DOMAIN_METHODS)
method = st.radio(
    "Preparation",
    methods,
    index=methods.index(DomainConfig.method),
    format_func=lambda m: domain_prep.METHOD_HELP.get(m, m),
    key="prepare_method",
)
minutes = st.number_input(
    "Time budget (minutes)",
    min_value=0.5,
    max_value=120.0,
    value=float(DomainConfig.minutes),
    step=0.5,
    key="prepare_minutes",
    help="Training stops after this time (about 5 minutes for 1,000 studies on 2 cores). "
    "The statistics preparation takes seconds whatever the budget.",
)

if st.button("Prepare", type="primary", key="prepare_run"):
    st.session_state.pop(PREPARED_KEY, None)
    try:
        source = domain_prep.resolve_source(source_text, roots=config.data_roots)
        bar = st.progress(0.0, text="starting")

        def show(fraction: float, text: str) -> None:
            bar.progress(fraction, text=text)

        prepared = domain_prep.prepare_model(
            config.registry,
            base_version=base_id,
            source=source,
            config=DomainConfig(method=method, minutes=float(minutes)),
            author=session.username,
            on_progress=show,
        )
    except (FedfewError, FloatingPointError) as exc:  # SourceError, RegistryError, divergence
        ui.show_error(exc)
    else:
        skipped = f"; {prepared.skipped} unreadable files left out" if prepared.skipped else ""
        st.session_state[PREPARED_KEY] = (
            f"Published {domain_prep.version_label(prepared.entry)} ({prepared.images} studies"
            f"{skipped}). Choose it as the base model on the Adapt page."
        )
if st.session_state.get(PREPARED_KEY):
    st.success(st.session_state[PREPARED_KEY])

rows = domain_prep.local_rows(config.registry)
if rows:
    st.subheader("Local versions on this node")
    st.dataframe(rows, hide_index=True, key="prepare_local_versions")
