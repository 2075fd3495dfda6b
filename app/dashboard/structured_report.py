"""A classification written back to the archive as a DICOM Comprehensive SR (PS3.3 A.35.3),
made with ``highdicom``: the outcome (a class or "uncertain"), the calibrated probability of every
class, and the provenance every export carries, referencing the image it classified.

The report joins the source image's study (patient and study attributes are copied from it by
``highdicom``), so the archive files it beside the image. Concepts without a standard code use the
private coding scheme :data:`CODING_SCHEME` (a "99" prefix, PS3.16 8).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from app.dashboard.errors import DashboardError
from app.dashboard.provenance import Provenance

CODING_SCHEME = "99FEDFEW"
MANUFACTURER = "fedfew"
SERIES_DESCRIPTION = "fedfew decision support (not a diagnosis)"
SERIES_NUMBER = 9901  # apart from the modality's own series numbers
OUTCOME_CODE = "outcome"
PROBABILITY_CODE = "p-{index}"  # one NUM item per class, in the adapter's class order
UTF8 = "ISO_IR 192"  # Specific Character Set of UTF-8 (PS3.3 C.12.1.1.2)
MAX_MEANING_CHARS = 64  # Code Meaning is LO (PS3.5 6.2)
NOT_SAVED = "not saved"  # the adapter version of an unsaved adaptation
# Type 2 patient and study attributes (PS3.3 C.7.1.1, C.7.2.1) the report copies from its source:
# present in every archive image, though possibly empty; filled empty where a file lacks them.
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class ReportError(DashboardError):
    """A result cannot be written as a report (the case is not a DICOM image from the archive)."""


@dataclass(frozen=True)
class ReportContent:
    """What a classification report says, as read back from the archive."""

    outcome: str
    probabilities: dict[str, float]  # class -> calibrated probability
    provenance: dict[str, str]  # Provenance field -> text
    source_instance_uid: str


def _code(value: str, meaning: str) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(
        value=value, scheme_designator=CODING_SCHEME, meaning=meaning[:MAX_MEANING_CHARS]
    )


def source_dataset(data: bytes) -> Any:
    """The DICOM header of a case file (no pixels), if it is an archive image.

    Raises:
        ReportError: not DICOM, or without the study, series and instance UIDs a report refers to.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except InvalidDicomError:
        raise ReportError(
            "only DICOM images can get a report in the archive; this case is another file"
        ) from None
    missing = [
        k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k not in ds
    ]
    if missing:
        raise ReportError(f"this DICOM file has no {', '.join(missing)}: it cannot be referred to")
    return ds


def classification_report(
    source: Any,
    *,
    outcome: str,
    classes: Sequence[str],
    probabilities: Sequence[float] | None,
    provenance: Provenance,
    series_uid: str | None = None,
    instance_number: int = 1,
) -> Any:
    """A Comprehensive SR of one classification, in the source image's study.

    Args:
        source: the classified image's dataset (its header is enough).
        outcome: the class name, "uncertain" when no class was confident enough, or "unusual
            image" for a case unlike the labelled ones.
        classes: the adapter's classes, in order.
        probabilities: the calibrated probability of each class; None for a case that was not
            classified (an unusual image): the report then holds no probabilities, as the
            screen shows none.
        provenance: adapter, version, base model and privacy status, condition, user, time,
            reliability and the intended-use notice, as every export carries them.
        series_uid: the reports' series (one per batch written back); None: a new one.
        instance_number: the report's number in its series.

    Raises:
        ReportError: a probability per class is missing.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if probabilities is not None and len(classes) != len(probabilities):
        raise ReportError(
            f"{len(classes)} classes but {len(probabilities)} probabilities: classify again"
        )
    source = copy.deepcopy(source)
    for keyword in COPIED_TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
    items: list[Any] = [
        hd.sr.ImageContentItem(
            name=codes.DCM.SourceOfMeasurement,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
        hd.sr.TextContentItem(
            name=_code(OUTCOME_CODE, "Outcome"),
            value=outcome,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    ]
    shown = () if probabilities is None else zip(classes, probabilities, strict=True)
    for index, (name, p) in enumerate(shown):
        items.append(
            hd.sr.NumContentItem(
                name=_code(PROBABILITY_CODE.format(index=index), f"Probability: {name}"),
                value=round(float(p), 6),
                unit=codes.UCUM.NoUnits,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    for field in fields(Provenance):
        value = getattr(provenance, field.name)
        items.append(
            hd.sr.TextContentItem(
                name=_code(field.name, field.name.replace("_", " ").capitalize()),
                value=NOT_SAVED if value is None else str(value),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = hd.sr.ContentSequence(items)
    report = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=series_uid or generate_uid(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # a clinician has not verified it
        # UTF-8: provenance holds "ε" and class names may hold any script, whatever the
        # source image's character set.
        specific_character_set=UTF8,
    )
    report.SeriesDescription = SERIES_DESCRIPTION
    return report


def read_report(report: Any) -> ReportContent:
    """The outcome, probabilities and provenance of a report made by
    :func:`classification_report` (for example read back from the archive).

    Raises:
        ReportError: a report without an outcome.
    """
    outcome, source = None, ""
    probabilities: dict[str, float] = {}
    provenance: dict[str, str] = {}
    names = {f.name for f in fields(Provenance)}
    for item in report.ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        code, meaning = str(concept.CodeValue), str(concept.CodeMeaning)
        if item.ValueType == "IMAGE":
            source = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif concept.CodingSchemeDesignator != CODING_SCHEME:
            continue
        elif code == OUTCOME_CODE:
            outcome = str(item.TextValue)
        elif item.ValueType == "NUM":
            label = meaning.removeprefix("Probability: ")
            probabilities[label] = float(item.MeasuredValueSequence[0].NumericValue)
        elif code in names:
            provenance[code] = str(item.TextValue)
    if outcome is None:
        raise ReportError("this structured report holds no fedfew classification")
    return ReportContent(
        outcome=outcome,
        probabilities=probabilities,
        provenance=provenance,
        source_instance_uid=source,
    )
