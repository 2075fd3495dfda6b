"""A real Orthanc with its DICOMweb plugin on 127.0.0.1 (Debian: orthanc orthanc-dicomweb) for
the archive tests and the browser test, and synthetic DICOM instances to fill it (no real
patients). The fixture is imported by the conftests that need it; it skips when Orthanc is absent.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ORTHANC = shutil.which("Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_S = 30  # it answers in well under a second here
MISSING_REASON = "no Orthanc with the DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicom_bytes(
    pixels: np.ndarray,
    *,
    study: str,
    series: str,
    patient_id: str = "synthetic",
    patient_name: str = "",
    accession: str = "",
    modality: str = "OT",
    study_date: str = "",
    description: str = "",
    window: tuple[float, float] | None = None,
) -> bytes:
    """A synthetic secondary-capture instance of ``study``/``series``: 8-bit pixels when
    ``pixels`` is uint8 (grey, or RGB when (H, W, 3)), else 16-bit grey (12 stored); ``window``
    is (centre, width) when given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, patient_name
    ds.AccessionNumber, ds.StudyDate, ds.StudyDescription = accession, study_date, description
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.Rows, ds.Columns = pixels.shape[:2]
    if pixels.ndim == 3:  # colour, (H, W, 3) uint8
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, min(bits, 12), min(bits, 12) - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass(frozen=True)
class OrthancArchive:
    """A running Orthanc: its REST root and its DICOMweb root."""

    base: str

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root the dashboard is given."""
        return f"{self.base}/dicom-web"

    def store(self, data: bytes) -> None:
        """Store one DICOM file through the REST API, as a modality's upload would."""
        request = urllib.request.Request(f"{self.base}/instances", data=data, method="POST")
        urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="session")
def orthanc_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancArchive]:
    """An empty Orthanc on 127.0.0.1 for the session; tests store studies with their own UIDs."""
    if ORTHANC is None or not PLUGIN.is_file():
        pytest.skip(MISSING_REASON)
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "fedfew-test",
        "HttpPort": port,
        "DicomPort": free_port(),
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
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/system", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()}")
                time.sleep(0.1)
        yield OrthancArchive(base=base)
    finally:
        process.kill()  # a throwaway database: no need to wait ~2 s for a clean shutdown
        process.wait(timeout=15)
        log.close()


@dataclass(frozen=True)
class Studies:
    """The two synthetic studies stored for this module (patients are made up)."""

    url: str
    chest: str  # Doe^Jane, 2024-01-05: a CR series of 2 images and a DX series of 1
    chest_cr: str  # its CR series
    head: str  # Smith^John, 2024-03-01: one CT image, 16-bit, with a window in the file
    tag: str  # makes the patient IDs and accession numbers unique to this module


@pytest.fixture(scope="module")
def studies(orthanc_archive: OrthancArchive) -> Studies:
    """Two synthetic studies of made-up patients, stored once per test module."""
    from pydicom.uid import generate_uid

    tag = generate_uid()[-6:]
    rng = np.random.default_rng(0)
    chest, cr, dx, head = (generate_uid() for _ in range(4))
    common = {"patient_name": "Doe^Jane", "patient_id": f"PA-{tag}", "accession": f"A{tag}"}
    for series, modality in ((cr, "CR"), (cr, "CR"), (dx, "DX")):
        orthanc_archive.store(
            dicom_bytes(
                rng.integers(0, 255, (40, 40)).astype(np.uint8),
                study=chest,
                series=series,
                modality=modality,
                study_date="20240105",
                description="Chest PA",
                **common,
            )
        )
    orthanc_archive.store(
        dicom_bytes(
            rng.integers(0, 4095, (24, 32)).astype(np.uint16),
            study=head,
            series=generate_uid(),
            patient_name="Smith^John",
            patient_id=f"PB-{tag}",
            accession=f"B{tag}",
            modality="CT",
            study_date="20240301",
            description="Head",
            window=(1000.0, 400.0),
        )
    )
    return Studies(url=orthanc_archive.dicomweb, chest=chest, chest_cr=cr, head=head, tag=tag)
