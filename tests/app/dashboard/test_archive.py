"""Cases from a real Orthanc with its DICOMweb plugin (apt: orthanc orthanc-dicomweb), read with
dicomweb-client: the archive module, then the classify page fetching a study."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.dashboard import archive, settings
from app.dashboard.uploads import load_uploads
from models.pipeline import PipelineConfig
from tests.app.dashboard.test_clinic_pages import adapt_page_with_cases

ORTHANC = shutil.which("Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed")
if ORTHANC is None or not PLUGIN.is_file():
    pytest.skip(
        "no Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dicom(pixels: np.ndarray, study: str) -> bytes:
    """A synthetic secondary-capture instance (no patient) of ``study``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.PatientID = "OT", "synthetic"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Orthanc on 127.0.0.1 holding one synthetic study of 3 images; yields (DICOMweb root,
    study UID)."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {
        "Name": "fedfew-test",
        "HttpPort": port,
        "DicomPort": _free_port(),
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    process = subprocess.Popen(
        [str(ORTHANC), str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/system", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()}")
                time.sleep(0.2)
        study = generate_uid()
        rng = np.random.default_rng(0)
        for _ in range(3):  # what a modality sends: files stored through the REST API
            data = _dicom(rng.integers(0, 255, (40, 40)), study)
            request = urllib.request.Request(f"{base}/instances", data=data, method="POST")
            urllib.request.urlopen(request, timeout=10).close()
        yield f"{base}/dicom-web", study
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def test_a_study_becomes_cases(orthanc) -> None:
    url, study = orthanc
    uploads = archive.study_cases(url, study)
    assert len(uploads) == 3 and all(u.name.startswith("archive-") for u in uploads)
    cases = load_uploads(uploads, pipeline=PipelineConfig(image_size=32))
    assert not cases.errors and cases.images.shape == (3, 3, 32, 32)
    assert {c.original_shape for c in cases.cases} == {(40, 40)}


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("bad-uid", "digits and dots"),
        ("unknown", "has no study 1.2.3.4"),
        ("unreachable", "could not be read"),
    ],
)
def test_archive_problems_are_messages(orthanc, which: str, message: str) -> None:
    url, study = orthanc
    args = {
        "bad-uid": (url, "1.2.x"),
        "unknown": (url, "1.2.3.4"),
        "unreachable": (f"http://127.0.0.1:{_free_port()}/dicom-web", study),
    }[which]
    with pytest.raises(archive.ArchiveError, match=message) as error:
        archive.study_cases(*args)
    assert "Error" not in str(error.value)  # no exception class names shown


def test_classify_page_fetches_a_study(orthanc, registry, make_app, case_images, monkeypatch):
    url, study = orthanc
    monkeypatch.setenv(settings.ENV_DICOMWEB, url)
    at, _ = adapt_page_with_cases(make_app, case_images, shots=2)
    at.button(key="adapt_run").click().run()
    at.switch_page("screens/classify.py").run()
    at.text_input(key="classify_study").input(study)
    next(b for b in at.button if b.label == "Fetch the study").click().run()
    assert not at.exception
    table = at.dataframe[0].value
    assert len(table) == 3 and all(name.startswith("archive-") for name in table["case"])
