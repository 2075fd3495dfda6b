"""Streamlit panels of the image archive: search studies and pull a study or series into the
page's cases (adapt: a class's labelled cases; classify: the new cases), and view a pulled image
with window/level and zoom (writing results back: :mod:`app.dashboard.write_back`).

The logic is in :mod:`app.dashboard.archive` and :mod:`app.dashboard.viewer`; patient identifiers
appear on the screen only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

import streamlit as st

from app.dashboard import archive, preferences, signin, ui, views
from app.dashboard.errors import DashboardError
from app.dashboard.uploads import Upload
from app.dashboard.viewer import ZOOMS, Window, apply_window, read_image, zoom_crop

PANEL_TITLE = "From the image archive (DICOMweb)"
SEARCH_LABEL = "Search the archive"
PULL_LABEL = "Pull the images"
MODALITIES = ("", "CR", "DX", "CT", "MR", "US", "MG", "NM", "PT", "XA", "OT")  # "" : any
EARLIEST_DATE = dt.date(1900, 1, 1)  # the date pickers' default floor is only ten years back
PAGE_SIZE = 50  # studies per page of results; the pages cover every study found
# Suffixes of the session-state keys of one panel (the page passes the prefix).
STUDIES = "_studies"  # the last search's result (archive.StudySearch)
SEARCHES = "_searches"  # searches made: each search's study list is a new widget
SERIES = "_series"  # series per study UID, fetched once
PULLED = "_pulled"  # uploads pulled by this panel, for the viewer
MESSAGE = "_message"  # (succeeded, text) of the last pull, shown once
# Suffixes of the widgets that the Pull callback reads as well as the panel.
RESULTS_PAGE = "_page"  # + search number: which page of results is shown
STUDY = "_study"  # + search number and page: the chosen study's UID
SERIES_OF = "_series_"  # + study UID: the chosen series' UID ("": the whole study)
TARGET = "_target"  # where the pulled images go (remembered per user)


def _study_label(study: archive.StudySummary) -> str:
    parts = [study.date, ", ".join(study.modalities), study.description, study.accession]
    return " · ".join(p for p in parts if p) + f" ({study.images} image(s))"


def _search_form(url: str, *, key: str) -> None:
    with st.form(f"{key}_search"):
        patient, accession, modality = st.columns([2, 1, 1])
        query_patient = patient.text_input("Patient (name or ID)", key=f"{key}_patient")
        query_accession = accession.text_input("Accession number", key=f"{key}_accession")
        query_modality = modality.selectbox(
            "Modality",
            MODALITIES,
            format_func=lambda m: m or "any",
            key=f"{key}_modality",
        )
        start, end = st.columns(2)
        date_from = start.date_input(
            "Study date from", value=None, min_value=EARLIEST_DATE, key=f"{key}_from"
        )
        date_to = end.date_input(
            "Study date to", value=None, min_value=EARLIEST_DATE, key=f"{key}_to"
        )
        submitted = st.form_submit_button(SEARCH_LABEL)
    if submitted:
        query = archive.StudyQuery(
            patient=query_patient,
            accession=query_accession,
            modality=query_modality,
            date_from=date_from,
            date_to=date_to,
        )
        # A new search is new widgets: a study list keyed as the last one would keep showing
        # (and send back) the last search's choice.
        st.session_state[key + SEARCHES] = st.session_state.get(key + SEARCHES, 0) + 1
        st.session_state.pop(key + STUDIES, None)
        try:
            with st.spinner("Searching the archive..."):
                st.session_state[key + STUDIES] = archive.search_studies(url, query=query)
        except DashboardError as exc:
            st.error(str(exc))
        st.session_state[key + SERIES] = {}


def _series_of(url: str, *, key: str, study: archive.StudySummary) -> list[archive.SeriesSummary]:
    """The study's image series (reports and other non-image series are not offered)."""
    known: dict[str, list[archive.SeriesSummary]] = st.session_state.setdefault(key + SERIES, {})
    if study.study_uid not in known:
        found = archive.study_series(url, study_uid=study.study_uid)
        known[study.study_uid] = [s for s in found if s.is_image]
    return known[study.study_uid]


def _page_of(found: archive.StudySearch, *, key: str) -> list[archive.StudySummary]:
    """The page of results the clinician chose (a page picker when there is more than one)."""
    studies = found.studies
    if not found.complete:
        st.warning(
            f"More than {archive.MAX_STUDIES} studies match: the {len(studies)} shown are those "
            "the archive returned first, newest first, and others are missing. Narrow the "
            "search (a modality, a date range, part of a name)."
        )
    pages = max(1, -(-len(studies) // PAGE_SIZE))
    if pages == 1:
        st.caption(f"{len(studies)} study(ies) found, newest first.")
        return studies
    number = st.session_state.get(key + SEARCHES, 0)
    page = st.selectbox(
        "Results",
        range(pages),
        format_func=lambda i: (
            f"studies {i * PAGE_SIZE + 1}-{min((i + 1) * PAGE_SIZE, len(studies))} of "
            f"{len(studies)}, newest first"
        ),
        key=f"{key}{RESULTS_PAGE}{number}",
    )
    return studies[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]


def archive_panel(
    url: str | None, *, key: str, targets: Mapping[str, str], pull_all: bool = False
) -> None:
    """Search the archive and pull a study or one of its series into the page's cases.

    Args:
        url: the archive's DICOMweb root; None: no archive, nothing is shown.
        key: prefix of this panel's widget and session-state keys (one per page).
        targets: where pulled images may go, as label -> case-shelf slot (the uploader's key);
            empty: the panel says to name the classes first. The chosen target is the user's
            remembered choice and changes only when the user changes it.
        pull_all: also offer to pull every study found (unlabelled studies to prepare a
            model from), up to :data:`archive.MAX_INSTANCES` images.
    """
    if not url:
        return
    found: archive.StudySearch | None = st.session_state.get(key + STUDIES)
    with st.expander(PANEL_TITLE, expanded=found is not None):
        _search_form(url, key=key)
        found = st.session_state.get(key + STUDIES)
        if found is None:
            return
        if not found.studies:
            st.info("No study matches: widen the search (part of a name, a longer date range).")
            return
        shown = _page_of(found, key=key)
        st.dataframe([s.row() for s in shown], hide_index=True, key=f"{key}_table")
        by_uid = {s.study_uid: s for s in shown}
        number = st.session_state.get(key + SEARCHES, 0)
        page = st.session_state.get(f"{key}{RESULTS_PAGE}{number}", 0)
        study_key = f"{key}{STUDY}{number}_{page}"
        uid = st.selectbox(
            "Study",
            list(by_uid),
            format_func=lambda u: _study_label(by_uid[u]) if u in by_uid else str(u),
            key=study_key,
        )
        study = by_uid[uid]
        try:
            series = {s.series_uid: s for s in _series_of(url, key=key, study=study)}
        except DashboardError as exc:
            st.error(str(exc))
            return
        st.selectbox(
            "Series",
            ["", *series],  # "": the whole study
            format_func=lambda u: series[u].label() if u in series else "all series of the study",
            key=key + SERIES_OF + study.study_uid,
        )
        if not targets:
            st.info("Name the classes first; then pull each class's cases.")
            return
        names = list(targets)
        remembered = f"{preferences.PULL_TARGET}:{key}"  # one remembered target per panel
        only = names[0] if len(names) == 1 else None  # several: the clinician picks one
        held = ui.recall_choice(key + TARGET, remembered, names, fallback=only)
        st.selectbox(
            "Add the images to",
            names,
            index=0 if held else None,
            placeholder="Choose where the images go",
            key=key + TARGET,
            on_change=ui.remember_choice,
            args=(key + TARGET, remembered),
        )
        st.button(
            PULL_LABEL,
            key=f"{key}_pull",
            on_click=_pull,
            args=(url,),
            kwargs={
                "key": key,
                "study_key": study_key,
                "studies": by_uid,
                "targets": dict(targets),
            },
        )
        if pull_all:
            st.button(
                f"Pull every study found ({len(found.studies)})",
                key=f"{key}_pull_all",
                on_click=_pull_every,
                args=(url,),
                kwargs={"key": key, "studies": found.studies, "targets": dict(targets)},
            )
        outcome = st.session_state.pop(key + MESSAGE, None)
        if outcome is not None:
            (st.success if outcome[0] else st.error)(outcome[1])
    # Only what is still among the page's cases: "Clear kept cases" also clears the viewer.
    present = {u for slot in views.case_shelf().all_uploads().values() for u in slot}
    pulled = [u for u in st.session_state.get(key + PULLED, []) if u in present]
    st.session_state[key + PULLED] = pulled
    image_viewer(pulled, key=f"{key}_viewer")


def _pull(
    url: str,
    *,
    key: str,
    study_key: str,
    studies: Mapping[str, archive.StudySummary],
    targets: dict[str, str],
) -> None:
    """The Pull button's callback. It runs before the page, so the pulled cases show in this
    run; it reads the study, series and target from their widgets' state (what the clinician
    sees now) and leaves the target where the clinician put it."""
    state = st.session_state
    study = studies.get(state.get(study_key))  # type: ignore[arg-type]
    target = state.get(key + TARGET)
    if study is None:
        state[key + MESSAGE] = (False, "Choose a study in the list, then pull its images.")
        return
    if target not in targets:
        state[key + MESSAGE] = (False, "Choose where the images go, then pull them.")
        return
    series = state.get(key + SERIES_OF + study.study_uid) or None
    try:
        uploads = archive.study_cases(url, study_uid=study.study_uid, series_uid=series)
    except DashboardError as exc:
        state[key + MESSAGE] = (False, str(exc))
        return
    views.case_shelf().restore({targets[target]: uploads})
    pulled = state.setdefault(key + PULLED, [])
    pulled.extend(u for u in uploads if u not in pulled)
    state[key + MESSAGE] = (True, f"{len(uploads)} image(s) added to {target}.")


def _pull_every(
    url: str,
    *,
    key: str,
    studies: Sequence[archive.StudySummary],
    targets: dict[str, str],
) -> None:
    """The "Pull every study found" callback: each study's images in turn, newest first, until
    :data:`archive.MAX_INSTANCES` images; the message says how many studies were left out."""
    target = st.session_state.get(key + TARGET)
    if target not in targets:
        st.session_state[key + MESSAGE] = (False, "Choose where the images go, then pull them.")
        return
    uploads: list[Upload] = []
    used = left = 0
    for study in studies:
        if len(uploads) + study.images > archive.MAX_INSTANCES:
            left += 1
            continue
        try:
            uploads += archive.study_cases(url, study_uid=study.study_uid)
        except DashboardError:
            left += 1  # no images, or unreadable: the others still count
            continue
        used += 1
    views.case_shelf().restore({targets[target]: uploads})
    note = (
        f"; {left} left out (unreadable, or beyond {archive.MAX_INSTANCES} images)" if left else ""
    )
    st.session_state[key + MESSAGE] = (
        bool(uploads),
        f"{len(uploads)} image(s) from {used} studies added to {target}{note}.",
    )


def image_viewer(uploads: Sequence[Upload], *, key: str) -> None:
    """One image at native resolution, with window/level (centre and width, starting from the
    file's WindowCenter/WindowWidth or its pixel range) and zoom; only this part reruns when a
    slider moves."""
    if not uploads:
        return

    @st.fragment
    def view() -> None:
        signin.note_activity()  # a slider moved: the user is there
        st.markdown("**Viewer**")
        index = st.selectbox(
            "Image", range(len(uploads)), format_func=lambda i: uploads[i].name, key=f"{key}_image"
        )
        try:
            image = read_image(uploads[index].data)
        except DashboardError as exc:
            st.warning(str(exc))
            return
        low, high = image.value_range
        span = max(high - low, 1.0)
        default = image.window
        level, width, zoom = st.columns(3)
        center = level.slider(
            "Window centre (level)",
            min_value=min(low - span, default.center),
            max_value=max(high + span, default.center),
            value=default.center,
            key=f"{key}_center_{index}",
        )
        wide = width.slider(
            "Window width",
            min_value=1.0,
            max_value=max(2.0 * span, default.width),
            value=default.width,
            key=f"{key}_width_{index}",
        )
        factor = zoom.select_slider("Zoom", options=ZOOMS, key=f"{key}_zoom_{index}")
        focus = (0.5, 0.5)
        if factor > 1:
            down, across = st.columns(2)
            focus = (
                down.slider("Look at: top to bottom", 0.0, 1.0, 0.5, key=f"{key}_y_{index}"),
                across.slider("Look at: left to right", 0.0, 1.0, 0.5, key=f"{key}_x_{index}"),
            )
        grey = apply_window(image.pixels, window=Window(center, wide), invert=image.invert)
        picture = zoom_crop(grey, zoom=factor, center=focus)
        rows, columns = image.pixels.shape[:2]
        st.image(picture, width=int(picture.shape[1]))  # one stored pixel per screen pixel
        # Below the image rather than its caption, which wraps to the width of a small image.
        st.caption(
            f"{uploads[index].name}: {columns}x{rows} pixels, window {center:g}/{wide:g}, "
            f"zoom {factor}x"
        )

    view()
