"""Clinician: classify new cases with an adapter, see why, and export the results."""

import streamlit as st

from app.dashboard import (
    adapters,
    archive_view,
    clinic,
    explain,
    preferences,
    signin,
    ui,
    views,
    write_back,
)
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.predictions import (
    NEAREST,
    OUTCOME_UNCERTAIN,
    OUTCOME_UNUSUAL,
    classify_cases,
    predictions_csv,
)
from app.dashboard.provenance import ACTION_CLASSIFY, AuditLog
from app.dashboard.uploads import resize_note, thumbnail
from models.errors import FedfewError

CURRENT = "current"  # the adapter made on the adapt page in this session, saved or not
ADAPTER_KEY = "classify_adapter"

session = ui.require_role(ROLE_CLINICIAN)
config = ui.settings()
st.title("Classify cases")
ui.intended_use_notice()
st.caption(ui.LOCAL_DATA_NOTICE)
views.take_back_draft(ui.DRAFT_KEY)

current: clinic.Adaptation | None = st.session_state.get(views.ADAPTATION_KEY)
try:
    saved = {e.id: e for e in adapters.saved_adapters(config.registry)}
except FedfewError as exc:
    ui.stop_with_error(exc)
options = ([CURRENT] if current is not None else []) + list(saved)
if not options:
    st.info("No adapter yet: adapt the model to a condition on the Adapt page first.")
    st.stop()


def describe(option: int | str) -> str:
    if isinstance(option, int):
        entry = saved[option]
        return f"{entry.label} · {', '.join(entry.info.get('classes', []))}"
    shown = current.support.classes if current is not None else ()
    return f"this session's adaptation ({', '.join(shown)})"


# The user's own choice, kept until they change it; without one, this session's adaptation, or
# nothing: never the newest adapter, whoever made it.
held = ui.recall_choice(
    ADAPTER_KEY,
    preferences.ADAPTER,
    options,
    fallback=CURRENT if current is not None else None,
)
choice: int | str | None = st.selectbox(
    "Adapter",
    options,
    index=0 if held else None,
    placeholder="Choose the adapter to classify with",
    format_func=describe,
    key=ADAPTER_KEY,
    on_change=ui.remember_choice,
    args=(ADAPTER_KEY, preferences.ADAPTER),
    help="Your choice stays until you change it.",
)
if choice is None:
    st.info("Choose the adapter to classify with.")
    st.stop()
adaptation: clinic.Adaptation
if not isinstance(choice, int):
    if current is None:  # CURRENT is offered only with an adaptation of this session
        st.stop()
    adaptation = current
else:
    cache: dict[int, clinic.Adaptation] = st.session_state.setdefault(views.ADAPTER_CACHE_KEY, {})
    if choice not in cache:
        try:
            with st.spinner("Loading the adapter..."):
                cache[choice] = adapters.load_adapter(config.registry, choice)[0]
        except FedfewError as exc:
            ui.stop_with_error(exc)
    adaptation = cache[choice]
views.reliability(adaptation)
if not clinic.separates(adaptation):  # every case would be "uncertain": say why once, instead
    st.stop()
classes = adaptation.support.classes

archive_view.archive_panel(
    config.dicomweb, key="classify_archive", targets={"the new cases": views.CLASSIFY_FILES_KEY}
)
# Kept across page switches and reloads like the adapt page's cases (the session's draft).
# Embedded when they arrive (upload or pull), so classifying only applies the head and checks.
cases = views.case_uploader(
    "New cases",
    key=views.CLASSIFY_FILES_KEY,
    pipeline=adaptation.pipeline,
    on_arrival=lambda batch: clinic.embed_new_cases(adaptation, batch),
)
views.keep_draft(ui.session_store(), st.session_state.get(ui.TOKEN_KEY))
if not cases.cases:
    st.info("Upload the cases to classify.")
    st.stop()
note = resize_note(cases.cases, adaptation.pipeline)
if note:
    st.info(note)
# Predictions are kept per (adapter, cases): a rerun (a download, another case to explain)
# shows the same result instead of computing it again.
digests = views.case_digests(cases)
key = (id(adaptation), adaptation.inputs, tuple(digests))
kept = st.session_state.get(views.PREDICTIONS_KEY)
audit = AuditLog(config.users_db)
if kept is not None and kept[0] == key:
    predictions, origin = kept[1], kept[2]
else:
    try:
        predictions = classify_cases(adaptation, cases)
        origin = adapters.provenance_for(
            config.registry,
            adaptation,
            adapter=saved.get(choice) if isinstance(choice, int) else None,
            user=session.username,
        )
        # One audit row per classification the user asked for: a pull that adds cases records
        # the new ones only, not the whole batch again; nor does a reload of this login.
        audited: dict[str, set[str]] = st.session_state.setdefault(views.AUDITED_KEY, {})
        which = f"{choice}|{adaptation.inputs}"
        token = st.session_state.get(ui.TOKEN_KEY)
        store = ui.session_store()
        if which not in audited:
            audited[which] = store.audited(token, adapter=which) if token else set()
        seen = audited[which]
        new = [(d, p) for d, p in zip(digests, predictions, strict=True) if d not in seen]
        if new:
            audit.record(
                origin,
                action=ACTION_CLASSIFY,
                case_digests=[d for d, _ in new],
                outcomes=[p.outcome(classes) for _, p in new],
            )
            seen.update(d for d, _ in new)
            if token:
                store.mark_audited(token, adapter=which, digests=[d for d, _ in new])
    except FedfewError as exc:  # CaseError, or an unreadable audit log
        ui.stop_with_error(exc)
    st.session_state[views.PREDICTIONS_KEY] = (key, predictions, origin)

st.subheader("Predictions")
unusual = [p for p in predictions if p.unusual]
if unusual:
    st.warning(
        f"{len(unusual)} of {len(predictions)} case(s) flagged as **{OUTCOME_UNUSUAL}**: they are "
        "studies of another modality than the labelled cases, or look unlike every labelled "
        "case of this adapter (as noise or a photograph would), so they are not classified: "
        + "; ".join(f"{p.name} ({p.unusual_reason})" for p in unusual[:10])
        + ("; ..." if len(unusual) > 10 else "")
        + ". Check that they are the kind of study the adapter was made for."
    )
uncertain = sum(p.uncertain and not p.unusual for p in predictions)
if uncertain:
    st.info(
        f"{uncertain} of {len(predictions)} case(s) are **{OUTCOME_UNCERTAIN}**: no class "
        f"reaches {round(100 * clinic.CALIBRATION.min_confidence)}% calibrated probability. "
        "Read them yourself, or ask a colleague."
    )
st.dataframe(
    [
        {
            "case": p.name,
            "accession": p.identity.accession,
            "patient": p.identity.patient,
            "outcome": p.outcome(classes),
            **{
                c: None if p.unusual else round(v, 3)
                for c, v in zip(classes, p.probabilities, strict=True)
            },
            "nearest labelled case": p.nearest[0].name if p.nearest else "",
        }
        for p in predictions
    ],
    hide_index=True,
    key="classify_table",
)
st.caption(
    f"Adapter: {origin.adapter} · base model {origin.base_model} ({origin.base_privacy}) · "
    f"condition {origin.condition or 'not named'} · classified by {origin.user} at {origin.time}"
)
st.download_button(
    "Download results (CSV)",
    predictions_csv(classes, predictions, provenance=origin),
    file_name="predictions.csv",
    mime="text/csv",
    key="classify_csv",
    on_click=audit.record_export,
    args=(origin,),
    kwargs={
        "case_digests": digests,
        "outcomes": [p.outcome(classes) for p in predictions],
    },
)
write_back.write_back_panel(
    config.dicomweb,
    key="classify_write_back",
    classes=classes,
    predictions=predictions,
    provenance=origin,
    uploads=views.case_shelf().all_uploads().get(views.CLASSIFY_FILES_KEY, []),
    audit=audit,
    case_digests=digests,
)

st.subheader("Why")


@st.fragment
def explanation() -> None:
    """One case's evidence map, probabilities and nearest labelled cases; choosing another case
    reruns only this part of the page."""
    signin.note_activity()
    index = st.selectbox(
        "Case",
        range(len(predictions)),
        format_func=lambda i: predictions[i].name,
        key="classify_case",
    )
    prediction = predictions[index]
    image = cases.cases[index].image
    left, right = st.columns(2)
    if prediction.unusual:
        left.image(
            thumbnail(image),
            caption=f"{prediction.name}: {OUTCOME_UNUSUAL}, unlike every labelled case "
            f"({prediction.ood_score:.1f} times the limit for flagging); not classified",
            width=320,
        )
        with right:
            st.write("Nearest labelled cases:")
            views.gallery(
                [adaptation.support.images[n.index] for n in prediction.nearest],
                [f"{n.label} ({n.name})" for n in prediction.nearest],
                per_row=NEAREST,
            )
        return
    with left:
        heat = explain.occlusion_map(adaptation.predict_proba, image, target=prediction.predicted)
        st.image(
            explain.overlay(image, heat),
            caption=f"{prediction.name}: regions that support {classes[prediction.predicted]}"
            + (" (the most likely class, yet uncertain)" if prediction.uncertain else ""),
            width=320,
        )
        st.image(explain.colour_scale(width=320), width=320)
        st.caption(
            "Colour scale: left, no effect on the result (the plain image); right, the regions "
            "whose hiding lowers the probability of this class the most on this case."
        )
    with right:
        st.bar_chart(
            {"class": list(classes), "probability": list(prediction.probabilities)},
            x="class",
            y="probability",
            height=220,
        )
        st.write("Nearest labelled cases:")
        views.gallery(
            [adaptation.support.images[n.index] for n in prediction.nearest],
            [f"{n.label} ({n.name})" for n in prediction.nearest],
            per_row=NEAREST,
        )


explanation()
