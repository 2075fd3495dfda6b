"""The classify page's write-back: each archive case's result stored in its study as a DICOM
structured report (:mod:`app.dashboard.structured_report`, STOW-RS), recorded in the audit log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import streamlit as st

from app.dashboard import archive
from app.dashboard.errors import DashboardError
from app.dashboard.provenance import AuditLog, Provenance
from app.dashboard.structured_report import (
    ReportError,
    classification_report,
    source_dataset,
)
from app.dashboard.uploads import Upload
from models.errors import FedfewError

WRITE_LABEL = "Write the results to the archive"
ACTION_WRITE_BACK = "write-back"  # the audit log's action for reports stored in the archive
WRITTEN = "_written"  # + the panel's key: identity of the results last written back


class ClassifiedCase(Protocol):
    """What the write-back needs of a prediction (``app.dashboard`` predictions have it)."""

    name: str
    probabilities: tuple[float, ...]

    @property
    def unusual(self) -> bool:
        """Whether the case was too unlike the labelled cases to be classified."""
        ...

    def outcome(self, classes: Sequence[str]) -> str:
        """The class name, or "uncertain"."""
        ...


def write_back_panel(
    url: str | None,
    *,
    key: str,
    classes: Sequence[str],
    predictions: Sequence[ClassifiedCase],
    provenance: Provenance,
    uploads: Sequence[Upload],
    audit: AuditLog | None = None,
    case_digests: Sequence[str] = (),
) -> None:
    """Offer to store each archive case's result as a structured report in its study.

    Args:
        url: the archive's DICOMweb root; None: nothing is shown.
        key: prefix of the panel's widget and session-state keys.
        classes: the adapter's classes.
        predictions: one per classified case.
        provenance: what produced the predictions (carried by every report).
        uploads: the files classified, matched to predictions by name; cases that are not DICOM
            images with study, series and instance UIDs are left out.
        audit: where to record the write-back (action :data:`ACTION_WRITE_BACK`); None: not
            recorded.
        case_digests: the cases' digests for the audit log, in the order of ``predictions``.
    """
    if not url:
        return
    by_name: dict[str, Upload] = {}
    for upload in uploads:
        by_name.setdefault(upload.name, upload)
    matched = len(case_digests) == len(predictions)
    digests = list(case_digests) if matched else [""] * len(predictions)
    sources, written_digests = [], []
    for prediction, digest in zip(predictions, digests, strict=True):
        found = by_name.get(prediction.name)
        if found is None:
            continue
        try:
            sources.append((prediction, source_dataset(found.data)))
        except ReportError:
            continue  # a PNG or JPEG from the browser: nothing in the archive to refer to
        written_digests.append(digest)
    if not sources:
        return
    st.subheader("Write back to the archive")
    identity = (provenance, tuple(p.name for p, _ in sources))
    if st.session_state.get(key + WRITTEN) == identity:
        st.success(
            f"{len(sources)} structured report(s) stored in the archive beside their images."
        )
        return
    st.caption(
        "Each DICOM case's outcome, calibrated probabilities and provenance are stored as a "
        "DICOM structured report in the case's study, marked as not verified."
    )
    if st.button(WRITE_LABEL, key=f"{key}_write"):
        try:
            from pydicom.uid import generate_uid

            series_uid = generate_uid()
            reports = [
                classification_report(
                    source,
                    outcome=prediction.outcome(classes),
                    classes=classes,
                    # An unusual image is not classified: no probabilities, as on the screen.
                    probabilities=None if prediction.unusual else prediction.probabilities,
                    provenance=provenance,
                    series_uid=series_uid,
                    instance_number=number,
                )
                for number, (prediction, source) in enumerate(sources, start=1)
            ]
            with st.spinner("Storing the reports in the archive..."):
                archive.store_instances(url, datasets=reports)
        except DashboardError as exc:
            st.error(str(exc))
        else:
            st.session_state[key + WRITTEN] = identity
            st.success(
                f"{len(reports)} structured report(s) stored in the archive beside their images."
            )
            if audit is not None:
                try:
                    audit.record(
                        provenance,
                        action=ACTION_WRITE_BACK,
                        case_digests=written_digests,
                        outcomes=[p.outcome(classes) for p, _ in sources],
                    )
                except FedfewError as exc:
                    st.error(f"The reports are stored, but the audit log was not written: {exc}")
