"""Clinician: adapt a base model to a new condition from a few labelled cases, and save it."""

from typing import Literal

import streamlit as st

from app.dashboard import (
    adapters,
    archive_view,
    clinic,
    domain_prep,
    known_classes,
    model_card,
    modes,
    preferences,
    ui,
    views,
)
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.errors import CaseError, DashboardError, user_message
from app.dashboard.jobs import Job
from app.dashboard.timings import TimingLog
from app.dashboard.uploads import resize_note
from models.adaptation import ADAPT_MODES
from models.errors import FedfewError

# Widgets whose values the clinician would not want to type again after visiting another page.
PERSIST: Literal["session"] = "session"
CLASSES_KEY = views.CLASSES_KEY
CONDITION_KEY = views.CONDITION_KEY
MODE_KEY = "adapt_mode"
BASE_KEY = "adapt_base"
SAVED_KEY = "adapt_saved"  # label of the adapter saved from the current result
KNOWN_KEY = "adapt_known"  # whether the federation's released prototypes join the support
JOB_KEY = views.ADAPT_JOB_KEY
JOB_NOTICE_KEY = views.ADAPT_NOTICE_KEY
# A run of a mode that trains (finetune, MAML) that ends within this long is shown at once; a
# longer one gets a progress bar and Cancel.
IN_PAGE_WAIT_S = 1.5
CANCELLED = "Adaptation cancelled: nothing was changed. Press Adapt to start again."


session = ui.require_role(ROLE_CLINICIAN)
config = ui.settings()
views.take_back_draft(ui.DRAFT_KEY)
st.title("Adapt to a new condition")
ui.intended_use_notice()
st.caption(ui.LOCAL_DATA_NOTICE)

try:
    with st.spinner("Setting up the public base model (first use of this node)..."):
        models = adapters.ensure_base(config.registry)
except FedfewError as exc:
    ui.stop_with_error(
        f"No base model: this node's registry (`{config.registry}`) holds none, and the public "
        f"one could not be set up ({user_message(exc)}). Ask IT, or run `fedfew demo` to try "
        "the dashboard on synthetic data."
    )

by_id = {e.id: e for e in models}
held = ui.recall_choice(
    BASE_KEY, preferences.BASE_MODEL, list(by_id), fallback=adapters.default_base(models)
)
base_id = st.selectbox(
    "Base model",
    list(by_id),
    index=0 if held else None,
    placeholder="Choose the base model",
    format_func=lambda v: domain_prep.version_label(by_id[v]),
    key=BASE_KEY,
    persist_state=PERSIST,
    on_change=ui.remember_choice,
    args=(BASE_KEY, preferences.BASE_MODEL),
    help="Your choice stays until you change it. Offered: versions of the federated model on "
    "this machine, newest first, with the privacy budget (epsilon) the sites spent on it; the "
    "public ImageNet encoder (trained on no patient's data); and this hospital's local "
    "versions prepared for a modality (page 'Prepare for a new modality').",
)
if base_id is None:
    st.info("Choose the base model to adapt.")
    st.stop()
chosen_base: int = base_id
base_entry = by_id[base_id]
with st.expander("About this base model: what it is, what it learnt from, how well it did"):
    st.markdown(
        model_card.model_card(
            base_entry,
            privacy=adapters.epsilon_label(base_entry),
            base=by_id.get(base_entry.parent) if base_entry.parent is not None else None,
        ).markdown()
    )
try:
    model = views.base_model(str(config.registry), base_id)
except FedfewError as exc:
    ui.stop_with_error(exc)
timings = TimingLog(config.users_db)
offered = modes.offered_modes(model)
if st.session_state.get(MODE_KEY) not in offered:  # a mode the previous base model offered
    st.session_state.pop(MODE_KEY, None)
try:
    measured = [f"time {timings.sentence(m)}" for m in offered]
except DashboardError as exc:
    measured = [f"time not known: {user_message(exc)}" for _ in offered]
mode = st.radio(
    "Adaptation",
    offered,
    format_func=modes.mode_help,
    captions=measured,
    key=MODE_KEY,
    horizontal=True,
    persist_state=PERSIST,
)
skipped = modes.unsupported_modes(model)
if skipped:
    st.caption(
        "Not offered for this base model: "
        + "; ".join(f"**{name}**, because {why}" for name, why in skipped.items())
        + "."
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

# Classes the federation already knows: its DP prototype release, kept with this base model.
known: known_classes.KnownPrototypes | None = None
try:
    released = known_classes.released_prototypes(base_entry)
except FedfewError as exc:
    released = None
    st.warning(
        "This base model's class prototypes from the federation cannot be read, so they are not "
        f"offered: {user_message(exc)}"
    )
if released is not None:
    st.info(
        f"The federation already knows {len(released.classes)} classes: "
        + ", ".join(f"**{c}**" for c in released.classes)
        + f". It released their prototypes (each class's average case) once, with differential "
        f"privacy: {released.cost()}. A class you name like one of them can take its prototype "
        f"beside your cases, as {known_classes.COPIES} more labelled cases; the reliability "
        "check still holds out only your own cases."
    )
    use_known = st.checkbox(
        "Add the federation's prototypes to the classes it knows",
        value=True,
        key=KNOWN_KEY,
        persist_state=PERSIST,
    )
    offered_known = released.for_classes(classes) if use_known else None
    if use_known and not known_classes.uses_prototypes(mode):
        st.caption(
            f"Not used with **{mode}**: the prototypes join a head on the features, and "
            f"{mode} changes the network itself. Choose ridge, prototype or linear to use them."
        )
    elif offered_known is not None:
        known = offered_known
        st.caption(
            "Taken: "
            + ", ".join(
                f"the prototype of **{released.classes[row]}** for your class **{classes[i]}**"
                for i, row in known.rows
            )
            + "."
        )
    elif use_known and classes:
        st.caption(
            "None of your classes is named like a class the federation knows, so no prototype "
            "is taken."
        )

archive_view.archive_panel(
    config.dicomweb,
    key="adapt_archive",
    targets={f"the cases of {name}": f"adapt_files_{i}" for i, name in enumerate(classes)},
)
# Each case is embedded when it arrives (upload or pull), so Adapt only fits the head.
cases = [
    views.case_uploader(
        f"Cases of **{name}**",
        key=f"adapt_files_{i}",
        pipeline=model.pipeline,
        on_arrival=lambda batch: clinic.embed_on_arrival(model, batch, mode=mode),
    )
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


def start(support: clinic.SupportSet) -> Job[clinic.Adaptation]:
    """Adapt in the background (the page shows progress and Cancel while it runs)."""

    def work(progress: views.ProgressFn) -> clinic.Adaptation:
        return clinic.adapt_cases(
            model,
            support,
            mode=mode,
            base_version=chosen_base,
            condition=condition,
            on_progress=progress,
            known=known,
        )

    return Job(work, what=f"adaptation ({mode})")


def finish(job: Job[clinic.Adaptation]) -> None:
    """Take a finished run's result (and record its time), or say why there is none."""
    st.session_state.pop(JOB_KEY, None)
    if job.result is None:
        st.session_state[JOB_NOTICE_KEY] = (
            job.cancelled,
            CANCELLED if job.cancelled else job.error,
        )
        return
    st.session_state[views.ADAPTATION_KEY] = job.result
    st.session_state.pop(SAVED_KEY, None)
    try:
        timings.record(
            job.result.mode, cases=len(job.result.support.labels), seconds=job.seconds or 0.0
        )
    except DashboardError as exc:  # the result stands; only its time is not kept
        st.warning(f"The time of this run could not be recorded: {user_message(exc)}")


job = st.session_state.get(JOB_KEY)
if job is not None and not job.running:  # ended since the last run (its progress bar reran)
    finish(job)
    job = None
with_cases = sum(len(batch.cases) for batch in cases)
if classes and with_cases:
    try:
        st.caption(
            f"**{mode}** with {with_cases} cases: {timings.sentence(mode, cases=with_cases)}."
        )
    except DashboardError as exc:
        st.caption(f"Time of {mode} not known: {user_message(exc)}")
if st.button("Adapt", type="primary", key="adapt_run", disabled=job is not None):
    st.session_state.pop(JOB_NOTICE_KEY, None)
    try:
        support = clinic.build_support(classes, cases)
        if not condition.strip():
            raise CaseError("name the condition first (for example pneumothorax)")
        problem = modes.cases_problem(mode, support.counts(), support.classes)
        if problem:
            raise CaseError(problem)
    except CaseError as exc:
        ui.show_error(exc)
    else:
        for warning in clinic.support_warnings(support):
            st.warning(warning)
        job = st.session_state[JOB_KEY] = start(support)
        # Frozen-backbone modes are one embedding pass: the page waits for them.
        if job.wait(None if ADAPT_MODES[mode].frozen_backbone else IN_PAGE_WAIT_S):
            finish(job)
            job = None
if job is not None:
    views.job_progress(job, cancel_key="adapt_cancel")
if JOB_NOTICE_KEY in st.session_state:
    cancelled, text = st.session_state[JOB_NOTICE_KEY]
    (st.info if cancelled else ui.show_error)(text)

adaptation = st.session_state.get(views.ADAPTATION_KEY)
if adaptation is not None and job is None:
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
    if adaptation.known is not None:
        st.caption(
            "With the federation's prototypes of "
            + ", ".join(f"**{name}**" for name in adaptation.known.names())
            + f" ({known_classes.COPIES} copies each; {adaptation.known.release.cost()})."
        )
    views.reliability(adaptation)
    if adaptation.suspect:
        st.warning(
            f"{len(adaptation.suspect)} labelled case(s) look unlike all the other labelled "
            "cases (as a photograph, a drawing or a study of another modality would): "
            + ", ".join(f"**{name}**" for name in adaptation.suspect)
            + ". Check that each is a study of the kind this condition is about and in the "
            "right class. Remove any that is not and press Adapt again; the adapter can be "
            "saved with them only once you confirm they are right."
        )
    changed = clinic.changed_inputs(
        adaptation,
        base_version=base_id,
        mode=mode,
        condition=condition,
        classes=classes,
        cases=cases,
        known=known,
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
            confirmed = not adaptation.suspect or st.checkbox(
                "I checked the labelled cases named above: they are right",
                key="adapt_confirm_suspect",
            )
            save = st.form_submit_button("Save adapter")
        if save and not confirmed:
            st.error(
                "Not saved: check the labelled cases named above first (remove any that does "
                "not belong and adapt again, or confirm that they are right)."
            )
        elif save:
            try:
                entry = adapters.save_adapter(
                    config.registry,
                    adaptation,
                    name=adapter_name,
                    condition=adaptation.condition,
                    author=session.username,
                )
            except (FedfewError, OSError) as exc:
                ui.show_error(exc)
            else:
                st.session_state[SAVED_KEY] = entry.label
    if st.session_state.get(SAVED_KEY):
        st.success(
            f"Saved as {st.session_state[SAVED_KEY]} in this node's registry. Classify new "
            "cases with it on the Classify page."
        )
