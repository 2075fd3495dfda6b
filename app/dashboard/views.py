"""Streamlit rendering shared by the clinician pages: case galleries, file errors, reliability,
and the session-scoped caches of decoded uploads and loaded models/adapters.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from app.dashboard import clinic, predictions
from app.dashboard.errors import user_message
from app.dashboard.jobs import Job
from app.dashboard.persistence import Draft, draft_of
from app.dashboard.settings import MAX_UPLOAD_MB
from app.dashboard.uploads import (
    ACCEPTED_SUFFIXES,
    CaseShelf,
    LoadedCases,
    Upload,
    load_uploads,
    thumbnail,
)
from models.errors import FedfewError, ModelDirError, UnreadableImageError
from models.model_dir import LoadedModel
from models.pipeline import PipelineConfig
from models.registry import Registry

LOG = logging.getLogger(__name__)
# Session-state keys of the clinician pages (widget keys are the pages' own, prefixed alike).
CASE_CACHE_KEY = "clinic_case_cache"  # decoded uploads by content hash
CASE_SHELF_KEY = "clinic_case_shelf"  # uploads kept across page switches (uploads.CaseShelf)
ADAPTATION_KEY = "clinic_adaptation"  # the adaptation made on the adapt page (unsaved or saved)
ADAPTER_CACHE_KEY = "clinic_adapter_cache"  # saved adapters rebuilt for the classify page
ADAPT_JOB_KEY = "clinic_adapt_job"  # the adaptation running in the background (jobs.Job)
PREPARE_JOB_KEY = "prepare_job"  # the preparation running in the background (jobs.Job)
ADAPT_NOTICE_KEY = "clinic_adapt_notice"  # (cancelled?, message) of a run that left no result
PREDICTIONS_KEY = "clinic_predictions"  # (adapter and cases key, predictions) last shown
AUDITED_KEY = "clinic_audited"  # "adapter|its inputs" -> digests of cases already audited
CLASSIFY_FILES_KEY = "classify_files"  # the classify page's uploader (a case-shelf slot)
CLASSES_KEY = "adapt_classes"  # the adapt page's class names, one per line
CONDITION_KEY = "adapt_condition"  # the adapt page's condition
DRAFT_FIELDS = (CONDITION_KEY, CLASSES_KEY)  # text kept in the session's draft
DRAFT_DIGEST_KEY = "clinic_draft_digest"  # digest of the draft last written
ProgressFn = Callable[[float, str], None]
POLL_S = 0.5  # how often a running job's progress bar is redrawn
GALLERY_COLUMNS = 8
THUMB_PX = 72
UPLOAD_HELP = (
    f"{', '.join(s.lstrip('.').upper() for s in ACCEPTED_SUFFIXES)}; several at once; "
    f"up to {MAX_UPLOAD_MB} MB each."
)


@st.cache_resource(max_entries=4, show_spinner="Loading the model...")
def base_model(registry: str, version: int) -> LoadedModel:
    """A global model version, loaded once per dashboard process (adaptation never changes it).

    Raises:
        FedfewError: the version is missing or its files cannot be loaded (a damaged file that a
            loader reports with an error of its own is turned into :class:`ModelDirError`).
    """
    try:
        return Registry.open(Path(registry)).load_model(version)
    except FedfewError:
        raise
    except Exception as exc:  # e.g. safetensors' own error for a damaged weights file
        LOG.exception("model version %s cannot be loaded", version)
        raise ModelDirError(
            f"model version {version} cannot be loaded: its files are damaged. Choose another "
            "version, or ask IT to check this node's registry."
        ) from exc


def case_digests(cases: LoadedCases) -> list[str]:
    """One digest per readable case (name and pixels), to key results by the cases."""
    return [
        hashlib.sha256(c.name.encode() + np.ascontiguousarray(c.image).tobytes()).hexdigest()
        for c in cases.cases
    ]


def case_shelf() -> CaseShelf:
    """This session's uploads kept across page switches."""
    shelf: CaseShelf = st.session_state.setdefault(CASE_SHELF_KEY, CaseShelf())
    return shelf


def case_uploader(
    label: str,
    *,
    key: str,
    pipeline: PipelineConfig,
    on_arrival: Callable[[LoadedCases], object] | None = None,
) -> LoadedCases:
    """A file uploader whose cases survive page switches: it shows the cases kept from before
    (with a button to clear them), the file errors and a gallery; returns every readable case.

    ``on_arrival`` is called with the readable cases once they are decoded (on every run: it
    must cost nothing for cases it has seen, as embedding with a frozen encoder does,
    :func:`app.dashboard.clinic.embed_on_arrival`), so the work of a later click is done while
    the clinician is still adding cases."""
    shelf = case_shelf()
    reset = key not in st.session_state  # no widget state: first render or back from a page
    files = st.file_uploader(
        label,
        accept_multiple_files=True,
        key=key,
        max_upload_size=MAX_UPLOAD_MB,
        help=UPLOAD_HELP,
    )
    current = [Upload(name=f.name, data=f.getvalue()) for f in files or []]
    uploads = shelf.uploads(key, current, uploader_reset=reset)
    loaded = load_uploads(
        uploads, pipeline=pipeline, cache=st.session_state.setdefault(CASE_CACHE_KEY, {})
    )
    kept = shelf.kept_count(key)
    if kept:
        left, right = st.columns([4, 1], vertical_alignment="center")
        left.caption(f"{kept} case(s) kept from earlier in this session, shown below.")
        right.button("Clear kept cases", key=f"{key}_clear", on_click=shelf.clear, args=(key,))
    if on_arrival is not None and loaded.cases:
        with st.spinner("Reading the cases..."):
            on_arrival(loaded)
    file_errors(loaded.errors)
    gallery([c.image for c in loaded.cases], loaded.names)
    return loaded


def take_back_draft(restored_key: str) -> None:
    """After a reload: put the session's draft (``st.session_state[restored_key]``, left there by
    :func:`app.dashboard.ui.current_session`) back into the widgets and the case shelf."""
    draft: Draft | None = st.session_state.pop(restored_key, None)
    if draft is None:
        return
    for key, value in draft.fields.items():
        if key in DRAFT_FIELDS:
            st.session_state[key] = value
    case_shelf().restore(draft.uploads)
    st.session_state[DRAFT_DIGEST_KEY] = draft.digest()


def keep_draft(store: Any, token: str | None) -> None:
    """Write the condition, class names and uploads to the session's draft when they changed
    (``store`` is a :class:`app.dashboard.persistence.SessionStore`; no token: not kept)."""
    if not token:
        return
    draft = draft_of(
        {k: st.session_state.get(k, "") for k in DRAFT_FIELDS}, case_shelf().all_uploads()
    )
    digest = draft.digest()
    if st.session_state.get(DRAFT_DIGEST_KEY) != digest:
        store.save_draft(token, draft)
        st.session_state[DRAFT_DIGEST_KEY] = digest


def clear_cases(*widget_keys: str, prefix: str = "adapt_files_") -> None:
    """Start over (a button's callback): forget the kept uploads of the slots named ``prefix...``
    (the adapt page's; the classify page keeps its own) and empty the given text widgets (class
    names, condition), which also removes the class uploaders."""
    case_shelf().clear_prefix(prefix)
    for key in widget_keys:
        st.session_state[key] = ""


def file_errors(errors: Sequence[UnreadableImageError]) -> None:
    """One warning listing every file that could not be used and why."""
    if errors:
        lines = "\n".join(f"- **{e.path}**: {user_message(e.reason)}" for e in errors)
        st.warning(f"{len(errors)} file(s) could not be used and were left out:\n{lines}")


def gallery(
    images: Sequence[Any], captions: Sequence[str], *, per_row: int = GALLERY_COLUMNS
) -> None:
    """Thumbnails in rows of ``per_row``."""
    for start in range(0, len(images), per_row):
        columns = st.columns(per_row)
        for column, image, caption in zip(
            columns,
            images[start : start + per_row],
            captions[start : start + per_row],
            strict=False,
        ):
            column.image(thumbnail(image), caption=caption, width=THUMB_PX)


def reliability(adaptation: clinic.Adaptation) -> None:
    """The leave-one-out estimate as an interval in words (never a green "all good"), with a
    warning when its lower end is low or it cannot be computed."""
    score = adaptation.reliability
    if not clinic.separates(adaptation):
        st.error(clinic.CANNOT_SEPARATE)
    if score is None:
        st.warning(
            "Reliability could not be estimated and the probabilities are not calibrated: a "
            "class has a single case. Add at least one more case to every class before relying "
            "on the predictions."
        )
    elif score.low:
        st.warning(
            f"{score.sentence()} The lower end is below "
            f"{round(100 * clinic.LOW_RELIABILITY)}%: add cases, check that each case is in the "
            "right class, or try another adaptation."
        )
    else:
        st.info(score.sentence())
    st.caption(
        "Probabilities are adjusted to how often the model was right on those same checks, so "
        "they claim no more confidence than the checks showed; a case whose most likely class "
        f"stays under {round(100 * clinic.CALIBRATION.min_confidence)}% is reported as "
        f'"{predictions.OUTCOME_UNCERTAIN}" instead of a label.'
    )


@st.fragment(run_every=POLL_S)
def job_progress(job: Job[Any], *, cancel_key: str) -> None:
    """A running job's progress bar and Cancel button, redrawn every :data:`POLL_S` seconds
    without rerunning the page; when the job has ended, the whole page reruns to show how."""
    if not job.running:
        st.rerun()
    fraction, text = job.progress()
    # The whole run's share first: a step count of one part ("step 16 of 25") is not the run's.
    st.progress(fraction, text=f"{round(100 * fraction)}% of the run done · now {text}")
    st.button(
        "Cancel",
        key=cancel_key,
        on_click=job.cancel,
        disabled=job.cancelling,
        help="Stop at the next step; nothing is kept from a cancelled run.",
    )
    if job.cancelling:
        st.caption("Stopping at the next step...")
