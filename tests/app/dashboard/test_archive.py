"""The image archive against a real Orthanc with its DICOMweb plugin (tests/app/dashboard/
orthanc.py): search, pull a study or series, write a result back as a structured report and read
it back; then the adapt and classify pages doing the same through their archive panels."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from app.dashboard import archive, settings
from app.dashboard.auth import ROLE_CLINICIAN
from app.dashboard.provenance import ACTION_CLASSIFY, NOTICE, AuditLog, Provenance
from app.dashboard.structured_report import classification_report, read_report, source_dataset
from app.dashboard.uploads import CaseIdentity, load_uploads
from app.dashboard.write_back import ACTION_WRITE_BACK
from models.pipeline import PipelineConfig
from tests.app.dashboard.conftest import texts
from tests.app.dashboard.orthanc import Studies, free_port
from tests.app.dashboard.pages import (
    adapt_page_with_cases,
    named_classes,
    pull_from_archive,
    search_archive,
    study_box,
)

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed")


def _found(studies: Studies, **query: object) -> set[str]:
    """Which of this module's studies a search finds (the archive may hold others)."""
    found = archive.search_studies(studies.url, query=archive.StudyQuery(**query))
    assert found.complete
    return {s.study_uid for s in found.studies} & {studies.chest, studies.head}


def test_a_study_becomes_cases(studies: Studies) -> None:
    uploads = archive.study_cases(studies.url, study_uid=studies.chest)
    # Named as the archive names them (accession, patient, series, image); the three share
    # series and image numbers here, so each also gets the end of its instance UID.
    assert len({u.name for u in uploads}) == 3
    assert all(
        u.name.startswith(f"A{studies.tag} · Doe Jane · series 1 image 1 (") for u in uploads
    )
    cases = load_uploads(uploads, pipeline=PipelineConfig(image_size=32))
    assert not cases.errors and cases.images.shape == (3, 3, 32, 32)
    assert {c.original_shape for c in cases.cases} == {(40, 40)}
    assert {c.identity for c in cases.cases} == {
        CaseIdentity(
            accession=f"A{studies.tag}",
            patient="Doe Jane",
            patient_id=f"PA-{studies.tag}",
            modality=modality,
        )
        for modality in ("CR", "DX")
    }


def test_one_series_becomes_cases(studies: Studies) -> None:
    series = archive.study_series(studies.url, study_uid=studies.chest)
    assert [(s.modality, s.images) for s in series] == [("CR", 2), ("DX", 1)] or [
        (s.modality, s.images) for s in series
    ] == [("DX", 1), ("CR", 2)]
    uploads = archive.study_cases(studies.url, study_uid=studies.chest, series_uid=studies.chest_cr)
    assert len(uploads) == 2
    assert {source_dataset(u.data).Modality for u in uploads} == {"CR"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"patient": "doe jane"}, {"chest"}),  # any case, parts in order
        ({"patient": "JANE"}, {"chest"}),
        ({"patient": "PB-{tag}"}, {"head"}),  # an ID
        ({"patient": "B-{tag}"}, {"head"}),  # part of an ID
        ({"patient": "{tag}"}, {"chest", "head"}),
        ({"accession": "B{tag}"}, {"head"}),
        ({"patient": "doe", "modality": "dx"}, {"chest"}),
        ({"patient": "doe", "modality": "CT"}, set()),
        ({"date_from": dt.date(2024, 1, 1), "date_to": dt.date(2024, 2, 1)}, {"chest"}),
        ({"date_from": dt.date(2024, 2, 1)}, {"head"}),
        ({"date_to": dt.date(2024, 12, 31)}, {"chest", "head"}),
    ],
)
def test_search_finds_studies(studies: Studies, query: dict, expected: set[str]) -> None:
    query = {k: v.format(tag=studies.tag) if isinstance(v, str) else v for k, v in query.items()}
    assert _found(studies, **query) == {getattr(studies, name) for name in expected}


def test_search_results_describe_the_study(studies: Studies) -> None:
    (found,) = archive.search_studies(
        studies.url, query=archive.StudyQuery(accession=f"A{studies.tag}")
    ).studies
    assert found.row() == {
        "date": "2024-01-05",
        "patient": "Doe Jane",
        "patient ID": f"PA-{studies.tag}",
        "modality": "CR, DX",
        "description": "Chest PA",
        "images": 3,
        "accession": f"A{studies.tag}",
    }


def test_patient_names_stay_out_of_the_log(studies: Studies, caplog) -> None:
    with caplog.at_level(logging.DEBUG):
        assert _found(studies, patient="Smith") == {studies.head}
    assert "GET" in caplog.text  # the requests were logged...
    assert "smith" not in caplog.text.lower()  # ...without the name they searched for


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("bad-uid", "digits and dots"),
        ("unknown", "has no study 1.2.3.4"),
        ("unreachable", "could not be read"),
        ("empty-query", "give a patient"),
        ("wildcard-only", "give a patient"),
        ("backwards-dates", "ends (2024-01-01) before it starts"),
    ],
)
def test_archive_problems_are_messages(studies: Studies, which: str, message: str) -> None:
    url = studies.url
    calls = {
        "bad-uid": lambda: archive.study_cases(url, study_uid="1.2.x"),
        "unknown": lambda: archive.study_cases(url, study_uid="1.2.3.4"),
        "unreachable": lambda: archive.study_cases(
            f"http://127.0.0.1:{free_port()}/dicom-web", study_uid=studies.chest
        ),
        "empty-query": lambda: archive.search_studies(url, query=archive.StudyQuery()),
        "wildcard-only": lambda: archive.search_studies(
            url, query=archive.StudyQuery(patient=" ^ * ")
        ),
        "backwards-dates": lambda: archive.search_studies(
            url,
            query=archive.StudyQuery(date_from=dt.date(2024, 2, 1), date_to=dt.date(2024, 1, 1)),
        ),
    }
    with pytest.raises(archive.ArchiveError) as error:
        calls[which]()
    assert message in str(error.value)
    assert "Error" not in str(error.value)  # no exception class names shown


def _reports(url: str, study: str) -> list:
    """The structured reports stored in ``study``, read back over WADO-RS."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url)
    found = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SR"})
    return [
        ds for item in found for ds in client.retrieve_series(study, item["0020000E"]["Value"][0])
    ]


def test_a_result_is_written_back_and_read_back(studies: Studies) -> None:
    upload = archive.study_cases(studies.url, study_uid=studies.head)[0]
    source = source_dataset(upload.data)
    origin = Provenance(
        adapter="v3 head-ct",
        adapter_version=3,
        base_model="v1 global-round-2",
        base_privacy="ε 2.50 (highest of 2 sites)",
        condition="bleed",
        user="clinician",
        time="2026-01-02T03:04:05Z",
        reliability="between 48% and 100% on 5 held-out cases",
    )
    report = classification_report(
        source,
        outcome="uncertain",
        classes=("normal", "bleed"),
        probabilities=(0.55, 0.45),
        provenance=origin,
    )
    archive.store_instances(studies.url, datasets=[report])

    (stored,) = _reports(studies.url, studies.head)
    assert stored.StudyInstanceUID == studies.head and stored.PatientID == source.PatientID
    content = read_report(stored)
    assert content.outcome == "uncertain"
    assert content.probabilities == {"normal": 0.55, "bleed": 0.45}
    assert content.source_instance_uid == source.SOPInstanceUID
    assert content.provenance == {
        "adapter": "v3 head-ct",
        "adapter_version": "3",
        "base_model": "v1 global-round-2",
        "base_privacy": "ε 2.50 (highest of 2 sites)",
        "condition": "bleed",
        "user": "clinician",
        "time": "2026-01-02T03:04:05Z",
        "reliability": "between 48% and 100% on 5 held-out cases",
        "notice": NOTICE,
    }


def test_adapt_page_pulls_a_series_as_a_class(
    studies, registry, make_app, case_images, monkeypatch
) -> None:
    monkeypatch.setenv(settings.ENV_DICOMWEB, studies.url)
    at = make_app(ROLE_CLINICIAN).run()
    named_classes(at, ["normal", "finding"])
    search_archive(at, key="adapt_archive", patient="doe")
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["accession"]).count(f"A{studies.tag}") == 1
    study_box(at, key="adapt_archive").set_value(studies.chest).run()
    series = at.selectbox(key=f"adapt_archive_series_{studies.chest}")
    assert len(series.options) == 3  # the whole study, CR, DX
    assert any(": CR " in o for o in series.options)
    series.set_value(studies.chest_cr)
    pull_from_archive(at, key="adapt_archive", target="the cases of finding")
    assert not at.exception
    assert "2 image(s) added to the cases of finding" in texts(at, "success")
    captions = [c for image in at.image for c in image.captions]
    gallery = [c for c in captions if c.startswith(f"A{studies.tag} · Doe Jane")]
    viewer = [str(c.value) for c in at.caption if "pixels, window" in str(c.value)]
    assert len(gallery) == 2 and len(viewer) == 1  # the class's thumbnails, and the viewer
    assert viewer[0].startswith(gallery[0]) and "40x40 pixels" in viewer[0]
    assert len(at.image) == len(gallery) + 1  # the viewer's image
    at.slider(key="adapt_archive_viewer_width_0").set_value(10.0).run()
    at.select_slider(key="adapt_archive_viewer_zoom_0").set_value(4).run()
    assert not at.exception
    (viewer,) = [str(c.value) for c in at.caption if "pixels, window" in str(c.value)]
    assert "/10, zoom 4x" in viewer
    assert len(at.slider) == 4  # centre, width, and where to look when zoomed


def test_classify_page_pulls_classifies_and_writes_back(
    studies, registry, make_app, case_images, monkeypatch, env
) -> None:
    monkeypatch.setenv(settings.ENV_DICOMWEB, studies.url)
    at, _ = adapt_page_with_cases(make_app, case_images, shots=2)
    at.button(key="adapt_run").click().run()
    at.switch_page("screens/classify.py").run()
    search_archive(at, key="classify_archive", accession=f"A{studies.tag}")
    pull_from_archive(at, key="classify_archive")
    assert not at.exception
    table = next(d.value for d in at.dataframe if "outcome" in d.value.columns)
    assert len(table) == 3 and set(table["accession"]) == {f"A{studies.tag}"}
    assert set(table["patient"]) == {"Doe Jane"}
    before = {r.SOPInstanceUID for r in _reports(studies.url, studies.chest)}
    next(b for b in at.button if b.label == "Write the results to the archive").click().run()
    assert "3 structured report(s) stored" in texts(at, "success")
    new = [r for r in _reports(studies.url, studies.chest) if r.SOPInstanceUID not in before]
    assert len(new) == 3
    written = sorted((read_report(r).outcome, read_report(r).provenance["user"]) for r in new)
    assert written == sorted((outcome, ROLE_CLINICIAN) for outcome in table["outcome"])
    write_back, classified = AuditLog(env["users"]).entries()[:2]
    assert (write_back.action, classified.action) == (ACTION_WRITE_BACK, ACTION_CLASSIFY)
    assert write_back.case_digests == classified.case_digests and write_back.cases == 3


def test_clearing_the_cases_clears_the_viewer(studies, registry, make_app, monkeypatch) -> None:
    """Issue 24, item 15: the viewer kept the last image after "Clear kept cases"."""
    monkeypatch.setenv(settings.ENV_DICOMWEB, studies.url)
    at = make_app(ROLE_CLINICIAN).run()
    named_classes(at, ["normal", "finding"])
    search_archive(at, key="adapt_archive", accession=f"B{studies.tag}")
    pull_from_archive(at, key="adapt_archive", target="the cases of finding")
    assert [c for c in at.caption if "pixels, window" in str(c.value)]
    at.button(key="adapt_files_1_clear").click().run()
    assert not at.exception
    assert not [c for c in at.caption if "pixels, window" in str(c.value)]
