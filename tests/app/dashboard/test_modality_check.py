"""A DICOM case of another modality than every labelled case is flagged, not classified (issue 24,
item 9: a breast-ultrasound adapter let 26 of 30 chest radiographs through); the labelled cases'
modalities are kept with a saved adapter."""

from __future__ import annotations

import csv
import io

import numpy as np

from app.dashboard import adapters, clinic, predictions
from app.dashboard.provenance import Provenance
from app.dashboard.uploads import Upload, load_uploads
from models.pipeline import PipelineConfig
from models.registry import Registry
from tests.app.dashboard.conftest import SIZE, write_tiny_model
from tests.app.dashboard.orthanc import dicom_bytes

PIPELINE = PipelineConfig(image_size=SIZE)


def _dicom_cases(modality: str, *, seed: int, count: int, bright: bool) -> list[Upload]:
    rng = np.random.default_rng(seed)
    uploads = []
    for i in range(count):
        pixels = rng.integers(0, 60, (40, 40)).astype(np.uint8)
        if bright:
            pixels[10:30, 10:30] += 150
        uploads.append(
            Upload(
                f"{modality}-{seed}-{i}.dcm",
                dicom_bytes(pixels, study=f"1.2.3.{seed}", series=f"1.2.3.{seed}.1",
                            modality=modality, accession=f"A{seed}", patient_name="Doe^Jane"),
            )
        )  # fmt: skip
    return uploads


def test_a_study_of_another_modality_is_flagged(tmp_path) -> None:
    version = write_tiny_model(tmp_path / "registry")
    model = Registry.open(tmp_path / "registry").load_model(version)
    cases = [
        load_uploads(_dicom_cases("US", seed=s, count=3, bright=s == 1), pipeline=PIPELINE)
        for s in (0, 1)
    ]
    assert cases[0].modalities == ["US"] * 3
    support = clinic.build_support(["benign", "malignant"], cases)
    assert support.modalities == ("US",) * 6
    adaptation = clinic.adapt_cases(model, support, mode="prototype", base_version=version)
    same = load_uploads(_dicom_cases("US", seed=0, count=2, bright=False), pipeline=PIPELINE)
    chest = load_uploads(_dicom_cases("CR", seed=0, count=2, bright=False), pipeline=PIPELINE)
    # The same pixels: only the modality differs.
    assert not any(p.other_modality_of for p in predictions.classify_cases(adaptation, same))
    flagged = predictions.classify_cases(adaptation, chest)
    assert all(p.unusual and p.outcome(support.classes) == "unusual image" for p in flagged)
    assert flagged[0].unusual_reason == "a CR study; the labelled cases are US"
    origin = Provenance("a", None, "v1", "ε", "c", "u", "t", "r")
    rows = list(
        csv.DictReader(io.StringIO(predictions.predictions_csv(support.classes, flagged,
                                                               provenance=origin)))
    )  # fmt: skip
    assert [r["unusual_reason"] for r in rows] == ["a CR study; the labelled cases are US"] * 2
    assert {(r["accession"], r["patient"]) for r in rows} == {("A0", "Doe Jane")}

    entry = adapters.save_adapter(tmp_path / "registry", adaptation, name="us", condition="c")
    loaded, _ = adapters.load_adapter(tmp_path / "registry", entry.id)
    assert loaded.support.modalities == support.modalities
