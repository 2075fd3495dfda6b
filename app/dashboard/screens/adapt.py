"""Clinician: adapt a base model to a new condition from a few labelled cases, and save it."""

import streamlit as st

from app.dashboard import adapters, clinic, ui, views
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.errors import CaseError
from app.dashboard.settings import MAX_UPLOAD_MB
from app.dashboard.uploads import resize_note
from models.adaptation import ADAPT_MODES
from models.errors import FedfewError, RegistryError

MODE_HELP = {
    "prototype": "prototype: instant; the most robust choice",
    "finetune": "finetune: a few seconds; can help when the cases look unlike the training data",
    "maml": "maml: for base models meta-trained with MAML",
}

session = ui.require_role(ROLE_CLINICIAN)
config = ui.settings()
st.title("Adapt to a new condition")
st.caption(ui.LOCAL_DATA_NOTICE)

try:
    models = adapters.base_models(config.registry)
except RegistryError:
    models = []
if not models:
    st.warning(
        f"No model yet: this node's registry (`{config.registry}`) holds no global model. "
        "Run `fedfew demo` to try the dashboard on synthetic data, or wait for the federation "
        "to deliver a model."
    )
    st.stop()

by_id = {e.id: e for e in models}
base_id = st.selectbox(
    "Base model",
    list(by_id),
    format_func=lambda v: f"{by_id[v].label} · {adapters.epsilon_label(by_id[v])}",
    key="adapt_base",
    help="Versions of the federated model on this machine, newest first, with the privacy "
    "budget (epsilon) the sites spent on it.",
)
try:
    model = views.base_model(str(config.registry), base_id)
except FedfewError as exc:
    ui.stop_with_error(exc)

condition = st.text_input("Condition", key="adapt_condition", placeholder="e.g. pneumothorax")
class_text = st.text_area(
    "Classes, one per line",
    key="adapt_classes",
    placeholder="normal\nsmall pneumothorax\nlarge pneumothorax",
)
classes = [line.strip() for line in class_text.splitlines() if line.strip()]
if len(classes) < clinic.MIN_CLASSES:
    st.info(
        f"Name at least {clinic.MIN_CLASSES} classes to tell apart (for example the normal "
        "appearance and the finding)."
    )

cases = []
for i, name in enumerate(classes):
    files = st.file_uploader(
        f"Cases of **{name}**",
        accept_multiple_files=True,
        key=f"adapt_files_{i}",
        max_upload_size=MAX_UPLOAD_MB,
        help=views.UPLOAD_HELP,
    )
    loaded = views.uploaded_cases(files, model.pipeline)
    views.file_errors(loaded.errors)
    views.gallery([c.image for c in loaded.cases], loaded.names)
    cases.append(loaded)

note = resize_note([c for batch in cases for c in batch.cases], model.pipeline)
if note:
    st.info(note)

mode = st.radio(
    "Adaptation", ADAPT_MODES, format_func=MODE_HELP.__getitem__, key="adapt_mode", horizontal=True
)
if st.button("Adapt", type="primary", key="adapt_run"):
    try:
        support = clinic.build_support(classes, cases)
    except CaseError as exc:
        st.error(str(exc))
    else:
        for warning in clinic.support_warnings(support):
            st.warning(warning)
        bar = st.progress(0.0, text="adapting")
        st.session_state[views.ADAPTATION_KEY] = clinic.adapt_cases(
            model,
            support,
            mode=mode,
            base_version=base_id,
            on_progress=lambda fraction, text: bar.progress(fraction, text=text),
        )
        st.session_state.pop("adapt_saved", None)

adaptation = st.session_state.get(views.ADAPTATION_KEY)
if adaptation is not None:
    st.subheader("Result")
    counts = ", ".join(
        f"{c}: {n}"
        for c, n in zip(adaptation.support.classes, adaptation.support.counts(), strict=True)
    )
    base = by_id.get(adaptation.base_version)
    base_label = base.label if base else f"v{adaptation.base_version}"
    st.write(f"Adapted {base_label} with {adaptation.mode} to {counts}.")
    views.reliability(adaptation)
    with st.form("save_adapter"):
        adapter_name = st.text_input("Save as", key="adapt_name", placeholder="e.g. ptx-2025-03")
        save = st.form_submit_button("Save adapter")
    if save:
        try:
            entry = adapters.save_adapter(
                config.registry,
                adaptation,
                name=adapter_name,
                condition=condition,
                author=session.username,
            )
        except (FedfewError, OSError) as exc:
            st.error(str(exc))
        else:
            st.session_state["adapt_saved"] = entry.label
    if st.session_state.get("adapt_saved"):
        st.success(
            f"Saved as {st.session_state['adapt_saved']} in this node's registry. Classify new "
            "cases with it on the Classify page."
        )
