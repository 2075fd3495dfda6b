"""Searching and pulling as a clinician does it all day, against a real Orthanc: a second search
and a pull, results over more than one page, pulls into one class that keep the class (also after
a reload), and reports written back that are not pulled again as images."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pytest

from app.dashboard import archive, settings
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.provenance import Provenance
from app.dashboard.structured_report import (
    classification_report,
    read_report,
    source_dataset,
)
from tests.app.dashboard.conftest import texts
from tests.app.dashboard.orthanc import OrthancArchive, Studies, dicom_bytes
from tests.app.dashboard.pages import named_classes, search_archive, study_box

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed")

MANY = 57  # more than a page of results (archive_view.PAGE_SIZE = 50)


@dataclass(frozen=True)
class Many:
    """MANY one-image studies of one made-up patient, one a day from 2023-01-01."""

    url: str
    patient_id: str
    uids: list[str]  # oldest first


@pytest.fixture(scope="module")
def many(orthanc_archive: OrthancArchive) -> Many:
    from pydicom.uid import generate_uid

    tag = generate_uid()[-6:]
    rng = np.random.default_rng(1)
    uids = []
    for day in range(MANY):
        uid = generate_uid()
        uids.append(uid)
        orthanc_archive.store(
            dicom_bytes(
                rng.integers(0, 255, (16, 16)).astype(np.uint8),
                study=uid,
                series=generate_uid(),
                patient_name=f"Many^Studies{tag}",
                patient_id=f"PM-{tag}",
                accession=f"M{tag}-{day:02d}",
                modality="CR",
                study_date=(dt.date(2023, 1, 1) + dt.timedelta(days=day)).strftime("%Y%m%d"),
            )
        )
    return Many(url=orthanc_archive.dicomweb, patient_id=f"PM-{tag}", uids=uids)


def test_every_match_is_found_newest_first(many: Many) -> None:
    found = archive.search_studies(many.url, query=archive.StudyQuery(patient=many.patient_id))
    assert found.complete
    assert [s.study_uid for s in found.studies] == many.uids[::-1]  # none missing, newest first


def test_a_cut_search_says_so(many: Many) -> None:
    found = archive.search_studies(
        many.url, query=archive.StudyQuery(patient=many.patient_id), limit=20
    )
    assert not found.complete and len(found.studies) == 20


def test_results_over_two_pages_and_a_pull_from_the_second(
    many: Many, registry, make_app, monkeypatch
) -> None:
    monkeypatch.setenv(settings.ENV_DICOMWEB, many.url)
    at = make_app(ROLE_CLINICIAN).run()
    named_classes(at, ["normal", "finding"])
    search_archive(at, key="adapt_archive", patient=many.patient_id)
    assert not at.exception
    pages = next(s for s in at.selectbox if s.label == "Results")
    assert pages.options == [
        f"studies 1-50 of {MANY}, newest first",
        f"studies 51-{MANY} of {MANY}, newest first",
    ]
    assert len(at.dataframe[0].value) == 50
    pages.set_value(1).run()
    assert len(at.dataframe[0].value) == MANY - 50
    oldest = many.uids[0]
    study_box(at, key="adapt_archive").set_value(oldest).run()
    at.selectbox(key="adapt_archive_target").set_value("the cases of finding")
    at.button(key="adapt_archive_pull").click().run()
    assert not at.exception
    assert "1 image(s) added to the cases of finding" in texts(at, "success")


def test_a_second_search_then_a_pull(studies: Studies, registry, make_app, monkeypatch) -> None:
    """Issue 24, item 1: after a second search the pull took the previous search's study (and
    crashed when it was not in the new results)."""
    monkeypatch.setenv(settings.ENV_DICOMWEB, studies.url)
    at = make_app(ROLE_CLINICIAN).run()
    named_classes(at, ["normal", "finding"])
    at.date_input(key="adapt_archive_to").set_value(dt.date(2024, 12, 31))
    search_archive(at, key="adapt_archive")
    assert len(study_box(at, key="adapt_archive").options) >= 2
    study_box(at, key="adapt_archive").set_value(studies.head).run()
    at.date_input(key="adapt_archive_to").set_value(None)
    search_archive(at, key="adapt_archive", accession=f"A{studies.tag}")
    box = study_box(at, key="adapt_archive")
    assert box.value == studies.chest  # the new search's study, not the last one's
    at.selectbox(key="adapt_archive_target").set_value("the cases of normal")
    at.button(key="adapt_archive_pull").click().run()
    assert not at.exception
    assert "3 image(s) added to the cases of normal" in texts(at, "success")


def test_pulls_keep_the_class_also_after_a_reload(
    studies: Studies, registry, make_app, monkeypatch
) -> None:
    """Issue 24, item 5: the target moved to another class after every pull."""
    monkeypatch.setenv(settings.ENV_DICOMWEB, studies.url)
    at = make_app(ROLE_CLINICIAN).run()
    named_classes(at, ["normal", "finding", "other"])
    search_archive(at, key="adapt_archive", accession=f"A{studies.tag}")
    target = at.selectbox(key="adapt_archive_target")
    assert target.value is None  # several classes: the clinician picks one
    target.set_value("the cases of finding").run()
    for pull in range(5):
        at.button(key="adapt_archive_pull").click().run()
        assert not at.exception
        assert at.selectbox(key="adapt_archive_target").value == "the cases of finding", pull
    # A new session of the same user (a reload, the next login) finds the same class chosen.
    again = make_app(ROLE_CLINICIAN).run()
    named_classes(again, ["normal", "finding", "other"])
    search_archive(again, key="adapt_archive", accession=f"A{studies.tag}")
    assert again.selectbox(key="adapt_archive_target").value == "the cases of finding"


def test_reports_written_back_are_not_pulled_as_images(studies: Studies) -> None:
    """Issue 24, item 10: a study pulled again brought its written-back reports as cases."""
    (image,) = archive.study_cases(studies.url, study_uid=studies.head)
    origin = Provenance(
        adapter="v3 head-ct",
        adapter_version=3,
        base_model="v1",
        base_privacy="ε 2.50",
        condition="bleed",
        user="clinician",
        time="2026-01-02T03:04:05Z",
        reliability="between 48% and 100%",
    )
    report = classification_report(
        source_dataset(image.data),
        outcome="unusual image",
        classes=("normal", "bleed"),
        probabilities=None,
        provenance=origin,
    )
    content = read_report(report)  # what the screen shows: no probabilities for this case
    assert (content.outcome, content.probabilities) == ("unusual image", {})
    archive.store_instances(studies.url, datasets=[report])
    series = archive.study_series(studies.url, study_uid=studies.head)
    assert {s.modality for s in series} == {"CT", "SR"}
    assert [s.is_image for s in series if s.modality == "SR"] == [False]
    again = archive.study_cases(studies.url, study_uid=studies.head)
    assert [u.data for u in again] == [image.data]
    sr = next(s for s in series if s.modality == "SR")
    with pytest.raises(archive.ArchiveError, match="holds no images"):
        archive.study_cases(studies.url, study_uid=studies.head, series_uid=sr.series_uid)
