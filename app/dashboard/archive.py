"""The hospital's image archive over DICOMweb (PS3.18), with ``dicomweb-client``: search studies
(QIDO-RS), pull a study's or series' instances as uploads read by the same guard and MONAI readers
as files from the browser (WADO-RS), and store results back (STOW-RS).

Patient identifiers are shown on the clinician's screen and in the CSV only, never logged:
instances are named as the archive names them (:func:`case_name`), and the client
(:mod:`app.dashboard.archive_client`) withholds the query strings that carry patient names from
the HTTP libraries' log records.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from dataclasses import dataclass
from typing import Any

from app.dashboard.archive_client import (
    ArchiveError,
    call,
    check_uid,
    client,
    reading,
    value,
    values,
)
from app.dashboard.uploads import Upload

MAX_INSTANCES = 200  # a classification batch, not a whole CT volume per slice
MAX_STUDIES = 1000  # studies one search fetches (in pages); beyond this, a narrower search
QUERY_PAGE = 100  # studies per QIDO-RS request (limit/offset paging, PS3.18 8.3.4.4)
# Series that hold no image (structured reports, key objects, presentation states): a pull
# leaves them out, so results written back are not pulled again as cases.
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC", "RWV", "SEG", "REG", "PLAN"})
NAME_SEPARATORS = re.compile(r"[\s^,]+")  # between the parts of a typed patient name
# Study attributes asked for besides the default return keys (PS3.18 10.6.3.3.1).
STUDY_FIELDS = ("NumberOfStudyRelatedInstances", "ModalitiesInStudy", "StudyDescription")
SERIES_FIELDS = ("NumberOfSeriesRelatedInstances", "SeriesDescription", "SeriesNumber")


def _date(value: Any) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else text


@dataclass(frozen=True)
class StudyQuery:
    """What the clinician searches the archive for; empty fields match everything."""

    patient: str = ""  # a patient's name (any part, any case) or their ID
    accession: str = ""
    modality: str = ""  # a DICOM modality code: CR, DX, CT, MR, ...
    date_from: dt.date | None = None
    date_to: dt.date | None = None

    def filters(self) -> list[dict[str, str]]:
        """QIDO-RS search filters: one set per way of matching the patient (name, ID).

        Raises:
            ArchiveError: no criterion at all (a patient of only separators and wildcards is
                none), or a date range that ends before it starts.
        """
        words = [w for w in NAME_SEPARATORS.split(self.patient.strip()) if w.strip("*?")]
        patient = self.patient.strip() if words else ""
        if not any((patient, self.accession.strip(), self.modality.strip())) and (
            self.date_from is None and self.date_to is None
        ):
            raise ArchiveError(
                "give a patient, an accession number, a modality or a date range: the whole "
                "archive is too much to list"
            )
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ArchiveError(
                f"the date range ends ({self.date_to}) before it starts ({self.date_from})"
            )
        common: dict[str, str] = {}
        if self.accession.strip():
            common["AccessionNumber"] = self.accession.strip()
        if self.modality.strip():
            common["ModalitiesInStudy"] = self.modality.strip().upper()
        if self.date_from or self.date_to:
            start = self.date_from.strftime("%Y%m%d") if self.date_from else ""
            end = self.date_to.strftime("%Y%m%d") if self.date_to else ""
            common["StudyDate"] = f"{start}-{end}"  # PS3.4 C.2.2.2.5 range matching
        if not patient:
            return [common]
        # Names are matched as wildcards over their parts, in order ("doe jane" finds
        # Doe^Jane), which Orthanc matches without regard to case; IDs by any part ("0042"
        # finds PAT-00421), as typed when the clinician gives wildcards.
        name = "*" + "*".join(words) + "*"
        known = patient if set(patient) & set("*?") else f"*{patient}*"
        return [{**common, "PatientName": name}, {**common, "PatientID": known}]


@dataclass(frozen=True)
class StudySummary:
    """One study found in the archive, as the result table shows it."""

    study_uid: str
    date: str
    patient_name: str
    patient_id: str
    modalities: tuple[str, ...]
    description: str
    images: int
    accession: str

    def row(self) -> dict[str, object]:
        """A row of the result table (on screen only: it names the patient)."""
        return {
            "date": self.date,
            "patient": self.patient_name.replace("^", " ").strip(),
            "patient ID": self.patient_id,
            "modality": ", ".join(self.modalities),
            "description": self.description,
            "images": self.images,
            "accession": self.accession,
        }


@dataclass(frozen=True)
class SeriesSummary:
    """One series of a study."""

    series_uid: str
    number: int | None
    modality: str
    description: str
    images: int

    @property
    def is_image(self) -> bool:
        """Whether the series holds images (not reports, key objects or presentation states)."""
        return self.modality.upper() not in NON_IMAGE_MODALITIES

    def label(self) -> str:
        """How the series is offered in a list."""
        number = f"series {self.number}" if self.number is not None else "series"
        text = f"{number}: {self.modality} {self.description}".strip()
        return f"{text} ({self.images} image(s))"


@dataclass(frozen=True)
class StudySearch:
    """What a search found: every matching study, newest first, and whether that is all."""

    studies: list[StudySummary]
    complete: bool  # False: more than ``MAX_STUDIES`` matched and only that many were fetched


def search_studies(url: str, *, query: StudyQuery, limit: int = MAX_STUDIES) -> StudySearch:
    """The studies matching ``query``, newest first; the archive is read page by page (QIDO-RS
    ``limit``/``offset``), so no match is cut silently: beyond ``limit`` the result says so.

    Args:
        url: the archive's DICOMweb root.
        query: what to look for; a patient is looked up by name and by ID.
        limit: the most studies fetched per way of matching the patient.

    Raises:
        ArchiveError: an empty or inconsistent query, or an unreachable archive.
    """
    filters = query.filters()

    def search(web: Any) -> tuple[list[dict[str, Any]], bool]:
        found: dict[str, dict[str, Any]] = {}
        complete = True
        for search_filters in filters:

            def page(offset: int, size: int, where: dict[str, str] = search_filters) -> list[Any]:
                return list(
                    web.search_for_studies(
                        search_filters=where, fields=list(STUDY_FIELDS), limit=size, offset=offset
                    )
                )

            offset = 0
            while offset < limit:
                size = min(QUERY_PAGE, limit - offset)
                items = page(offset, size)
                for item in items:
                    found.setdefault(str(value(item, "StudyInstanceUID")), item)
                offset += len(items)
                if len(items) < size:  # the last page
                    break
            else:
                complete = complete and not page(offset, 1)  # one more beyond the limit?
        return list(found.values()), complete

    items, complete = call(url, search)
    studies = [
        StudySummary(
            study_uid=str(value(item, "StudyInstanceUID")),
            date=_date(value(item, "StudyDate")),
            patient_name=str(value(item, "PatientName") or ""),
            patient_id=str(value(item, "PatientID") or ""),
            modalities=tuple(str(m) for m in values(item, "ModalitiesInStudy")),
            description=str(value(item, "StudyDescription") or ""),
            images=int(value(item, "NumberOfStudyRelatedInstances") or 0),
            accession=str(value(item, "AccessionNumber") or ""),
        )
        for item in items
    ]
    ordered = sorted(studies, key=lambda s: (s.date, s.study_uid), reverse=True)
    return StudySearch(studies=ordered, complete=complete)


def study_series(url: str, *, study_uid: str) -> list[SeriesSummary]:
    """The series of one study, in series-number order.

    Args:
        url: the archive's DICOMweb root.
        study_uid: the Study Instance UID.

    Raises:
        ArchiveError: a malformed UID or an unreachable archive.
    """
    uid = check_uid(study_uid)
    items = call(
        url,
        lambda c: c.search_for_series(study_instance_uid=uid, fields=list(SERIES_FIELDS)),
    )
    series = []
    for item in items:
        number = value(item, "SeriesNumber")
        series.append(
            SeriesSummary(
                series_uid=str(value(item, "SeriesInstanceUID")),
                number=int(number) if number is not None else None,
                modality=str(value(item, "Modality") or ""),
                description=str(value(item, "SeriesDescription") or ""),
                images=int(value(item, "NumberOfSeriesRelatedInstances") or 0),
            )
        )
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.series_uid))


def case_name(ds: Any) -> str:
    """What the archive calls an instance, for the screen and the CSV: accession number,
    patient, series and image number, e.g. ``A123 · Doe Jane · series 2 image 5.dcm`` (the
    ``.dcm`` tells the readers its format). Never logged: it names the patient."""
    accession = str(ds.get("AccessionNumber", "") or "").strip() or "no accession"
    patient = str(ds.get("PatientName", "") or "").replace("^", " ").strip()
    patient = " ".join(patient.split()) or str(ds.get("PatientID", "") or "").strip()
    series, image = ds.get("SeriesNumber"), ds.get("InstanceNumber")
    where = " ".join(
        part
        for part in (
            f"series {series}" if series not in (None, "") else "",
            f"image {image}" if image not in (None, "") else "",
        )
        if part
    )
    parts = [accession, patient or "unnamed patient", where or "image"]
    return " · ".join(parts) + ".dcm"


def _named(datasets: list[Any]) -> list[Upload]:
    """Each dataset as a DICOM file named by :func:`case_name`; names that two instances would
    share get the end of their SOP Instance UID, so every case keeps its own name."""
    names = [case_name(ds) for ds in datasets]
    uploads = []
    for ds, name in zip(datasets, names, strict=True):
        if names.count(name) > 1:
            tail = str(ds.get("SOPInstanceUID", ""))[-6:]
            name = f"{name.removesuffix('.dcm')} ({tail}).dcm"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        uploads.append(Upload(name=name, data=buffer.getvalue()))
    return uploads


def study_cases(url: str, *, study_uid: str, series_uid: str | None = None) -> list[Upload]:
    """Every image of one study (or of one of its series), as DICOM files in memory named by
    :func:`case_name`. Series without images (structured reports, such as results written back,
    key objects, presentation states) are left out.

    Args:
        url: the archive's DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
        study_uid: the Study Instance UID (digits and dots).
        series_uid: only this series of the study; None: the whole study.

    Raises:
        ArchiveError: a malformed UID, an unreachable archive, an unknown study or series, a
            series or study without images, or more than :data:`MAX_INSTANCES` images.
    """
    uid = check_uid(study_uid)
    series = check_uid(series_uid, what="Series Instance UID") if series_uid else None
    where = f"study {uid}" + (f" series {series}" if series else "")
    known = study_series(url, study_uid=uid)
    if series is not None:
        known = [s for s in known if s.series_uid == series]
    if not known:
        raise ArchiveError(f"the archive at {url} has no {where}")
    chosen = [s for s in known if s.is_image]
    if not chosen:
        raise ArchiveError(
            f"{where} holds no images (only {', '.join(sorted({s.modality for s in known}))} "
            "objects, such as reports): pick another study or series"
        )
    if sum(s.images for s in chosen) > MAX_INSTANCES:
        raise ArchiveError(
            f"{where} has more than {MAX_INSTANCES} images: pick a smaller study or series"
        )
    web = client(url)
    with reading(url):
        datasets = [ds for s in chosen for ds in web.retrieve_series(uid, s.series_uid)]
    return _named([ds for ds in datasets if "PixelData" in ds])


def store_instances(url: str, *, datasets: list[Any]) -> None:
    """Store DICOM datasets (reports, captures) in the archive with STOW-RS.

    Args:
        url: the archive's DICOMweb root.
        datasets: complete instances (pydicom datasets with file meta information).

    Raises:
        ArchiveError: an unreachable archive, or one that refuses an instance (an HTTP error, or
            a Failed SOP Sequence in its reply, PS3.18 10.5.3).
    """
    if not datasets:
        return
    reply = call(url, lambda c: c.store_instances(datasets))
    failed = len(reply.get("FailedSOPSequence", None) or [])
    if failed:
        raise ArchiveError(
            f"the image archive at {url} refused {failed} of {len(datasets)} instance(s): ask IT "
            "whether it accepts structured reports (SR) over STOW-RS"
        )
