"""Clinician: adapt a base model to a new condition from a few labelled cases, and save it."""

import streamlit as st

from app.dashboard import adapters, archive_view, clinic, domain_prep, ui, views
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.errors import CaseError
from app.dashboard.uploads import resize_note
from models.adaptation import ADAPT_MODES
from models.errors import FedfewError, RegistryError

MODE_HELP = {
    "prototype": "prototype: instant; the most robust choice",
    "linear": "linear: under a second; can separate classes that prototypes mix up",
    "finetune": "finetune: a few seconds; can help when the cases look unlike the training data",
    "maml": "maml: for base models meta-trained with MAML",
}
# Widgets whose values the clinician would not want to type again after visiting another page.
PERSIST = "session"
CLASSES_KEY = views.CLASSES_KEY
CONDITION_KEY = views.CONDITION_KEY
SAVED_KEY = "adapt_saved"  # label of the adapter saved from the current result


def mode_help(mode: str) -> str:
    """Plain words for a mode (the registry's description for a mode new to this page)."""
    return MODE_HELP.get(mode, f"{mode}: {ADAPT_MODES[mode].description}")


session = ui.require_role(ROLE_CLINICIAN)
config = ui.settings()
views.take_back_draft(ui.DRAFT_KEY)
st.title("Adapt to a new condition")
ui.intended_use_notice()
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
    format_func=lambda v: domain_prep.version_label(by_id[v]),
    key="adapt_base",
    persist_state=PERSIST,
    help="Versions of the federated model on this machine, newest first, with the privacy "
    "budget (epsilon) the sites spent on it, and this hospital's local versions prepared for a "
    "modality (page 'Prepare for a new modality').",
)
try:
    model = views.base_model(str(config.registry), base_id)
except FedfewError as exc:
    ui.stop_with_error(exc)
mode = st.radio(
    "Adaptation",
    ADAPT_MODES,
    format_func=mode_help,
    key="adapt_mode",
    horizontal=True,
    persist_state=PERSIST,
)
st.info(domain_prep.base_model_note(by_id[base_id], domain_mean=model.domain_mean, mode=mode))

condition = st.text_input(
    "Condition", key=CONDITION_KEY, placeholder="e.g. pneumothorax", persist_state=PERSIST
)
class_text = st.text_area(
    "Classes, one per line",
    key=CLASSES_KEY,
    placeholder="normal\nsmall pneumothorax\nlarge pneumothorax",
    persist_state=PERSIST,
)
classes = [line.strip() for line in class_text.splitlines() if line.strip()]
if len(classes) < clinic.MIN_CLASSES:
    st.info(
        f"Name at least {clinic.MIN_CLASSES} classes to tell apart (for example the normal "
        "appearance and the finding)."
    )

archive_view.archive_panel(
    config.dicomweb,
    key="adapt_archive",
    targets={f"the cases of {name}": f"adapt_files_{i}" for i, name in enumerate(classes)},
)
cases = [
    views.case_uploader(f"Cases of **{name}**", key=f"adapt_files_{i}", pipeline=model.pipeline)
    for i, name in enumerate(classes)
]
if classes:
    st.button(
        "Start over",
        key="adapt_clear",
        on_click=views.clear_cases,
        args=(CLASSES_KEY, CONDITION_KEY),
        help="Forget the classes, the condition and every uploaded case of this session.",
    )

views.keep_draft(ui.session_store(), st.session_state.get(ui.TOKEN_KEY))

note = resize_note([c for batch in cases for c in batch.cases], model.pipeline)
if note:
    st.info(note)

if st.button("Adapt", type="primary", key="adapt_run"):
    try:
        support = clinic.build_support(classes, cases)
        if not condition.strip():
            raise CaseError("name the condition first (for example pneumothorax)")
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
            condition=condition,
            on_progress=lambda fraction, text: bar.progress(fraction, text=text),
        )
        st.session_state.pop(SAVED_KEY, None)

adaptation = st.session_state.get(views.ADAPTATION_KEY)
if adaptation is not None:
    st.subheader("Result")
    counts = ", ".join(
        f"{c}: {n}"
        for c, n in zip(adaptation.support.classes, adaptation.support.counts(), strict=True)
    )
    base = by_id.get(adaptation.base_version)
    base_label = domain_prep.version_label(base) if base else f"v{adaptation.base_version}"
    st.write(
        f"Adapted {base_label} with {adaptation.mode} to **{adaptation.condition}**: {counts}."
    )
    views.reliability(adaptation)
    changed = clinic.changed_inputs(
        adaptation,
        base_version=base_id,
        mode=mode,
        condition=condition,
        classes=classes,
        cases=cases,
    )
    if changed and not st.session_state.get(SAVED_KEY):
        st.warning(
            f"This result was computed before {changed} changed, so it cannot be saved. "
            "Press Adapt again to get a result for what the page shows now."
        )
    elif not st.session_state.get(SAVED_KEY):
        with st.form("save_adapter"):
            adapter_name = st.text_input(
                "Save as", key="adapt_name", placeholder="e.g. ptx-2025-03"
            )
            save = st.form_submit_button("Save adapter")
        if save:
            try:
                entry = adapters.save_adapter(
                    config.registry,
                    adaptation,
                    name=adapter_name,
                    condition=adaptation.condition,
                    author=session.username,
                )
            except (FedfewError, OSError) as exc:
                st.error(str(exc))
            else:
                st.session_state[SAVED_KEY] = entry.label
    if st.session_state.get(SAVED_KEY):
        st.success(
            f"Saved as {st.session_state[SAVED_KEY]} in this node's registry. Classify new "
            "cases with it on the Classify page."
        )
