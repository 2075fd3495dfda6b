"""Cases from the hospital's image archive over DICOMweb (WADO-RS, PS3.18), with
``dicomweb-client``: a study's instances become uploads, read by the same guard and MONAI readers
as files from the browser.

Instances are named by the end of their SOP Instance UID, never by patient attributes.
``dicomweb-client`` is optional: without it the page says how to install it.
"""

from __future__ import annotations

import io
from typing import Any

from app.dashboard.errors import DashboardError
from app.dashboard.uploads import Upload

MAX_INSTANCES = 200  # a classification batch, not a whole CT volume per slice
UID_CHARS = set("0123456789.")


class ArchiveError(DashboardError):
    """The archive cannot be reached, or the study cannot be read from it."""


def _client(url: str) -> Any:
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise ArchiveError(
            "reading from the image archive needs the dicomweb-client package: ask IT to "
            "install it (pip install dicomweb-client) and restart the dashboard"
        ) from None
    client = DICOMwebClient(url=url, chunk_size=10**6)
    # A clinician is waiting on the page: one attempt, and a message, rather than five retries
    # with exponential waits.
    client.set_http_retry_params(retry=False)
    return client


def study_cases(url: str, study_uid: str) -> list[Upload]:
    """Every instance of one study, as DICOM files in memory.

    Args:
        url: the archive's DICOMweb root, e.g. ``http://pacs:8042/dicom-web``.
        study_uid: the Study Instance UID (digits and dots).

    Raises:
        ArchiveError: a malformed UID, an unreachable archive, an unknown study, or more than
            :data:`MAX_INSTANCES` instances.
    """
    uid = study_uid.strip()
    if not uid or not set(uid) <= UID_CHARS or len(uid) > 64:
        raise ArchiveError(
            f"a Study Instance UID is up to 64 digits and dots, got {study_uid!r}: copy it from "
            "the archive viewer"
        )
    client = _client(url)
    import requests  # a dependency of dicomweb-client, there once the client imports

    try:
        found = client.search_for_instances(study_instance_uid=uid, limit=MAX_INSTANCES + 1)
        if not found:
            raise ArchiveError(f"the archive at {url} has no study {uid}")
        if len(found) > MAX_INSTANCES:
            raise ArchiveError(
                f"study {uid} has more than {MAX_INSTANCES} images: pick a smaller study or series"
            )
        datasets = client.retrieve_study(uid)
    except requests.RequestException as exc:
        reason = getattr(getattr(exc, "response", None), "status_code", None)
        detail = f"HTTP {reason}" if reason else "no answer"
        raise ArchiveError(
            f"the image archive at {url} could not be read ({detail}): check the address with IT"
        ) from exc
    uploads = []
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        name = f"archive-{str(ds.get('SOPInstanceUID', ''))[-12:] or len(uploads)}.dcm"
        uploads.append(Upload(name=name, data=buffer.getvalue()))
    return uploads
