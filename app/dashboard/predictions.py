"""Classifying new cases with an adaptation: first check that each case is like the labelled
cases at all (:mod:`models.ood`), then calibrated probabilities, the outcome (a class,
"uncertain", or "unusual image" for a flagged case, which gets no label) and the nearest labelled
cases; and the CSV export of all that with its provenance.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from app.dashboard.clinic import CALIBRATION, Adaptation
from app.dashboard.errors import CaseError
from app.dashboard.provenance import Provenance
from app.dashboard.uploads import CaseIdentity, LoadedCase, LoadedCases
from models.calibration import UNCERTAIN, decide
from models.ood import FLAG_AT, OODConfig, unusual_scores

NEAREST = 3  # labelled cases shown beside each prediction
OOD = OODConfig()  # distance and threshold measured in bench/results/ood.json
OUTCOME_UNCERTAIN = "uncertain"
OUTCOME_UNUSUAL = "unusual image"


@dataclass(frozen=True)
class Neighbour:
    """A labelled support case near a new case in the adapted embedding."""

    index: int
    name: str
    label: str
    distance: float


@dataclass(frozen=True)
class Prediction:
    """One new case: how far it lies from the labelled cases, its calibrated class
    probabilities, the outcome, and its nearest labelled cases."""

    name: str
    probabilities: tuple[float, ...]
    nearest: tuple[Neighbour, ...]
    # How unlike the labelled cases it is (models.ood.unusual_scores): above 1, flagged.
    ood_score: float = 0.0
    identity: CaseIdentity = field(default_factory=CaseIdentity)  # an archive case's names
    # The labelled cases' modalities when this DICOM case is of none of them ("" otherwise).
    other_modality_of: tuple[str, ...] = ()

    @property
    def unusual(self) -> bool:
        """Whether the case is not to be given a label: it lies too far from every labelled
        case, or it is a study of another modality than all of them."""
        return self.ood_score > FLAG_AT or bool(self.other_modality_of)

    @property
    def unusual_reason(self) -> str:
        """Why the case is flagged, in words ("" when it is not)."""
        if self.other_modality_of:
            return (
                f"a {self.identity.modality} study; the labelled cases are "
                f"{', '.join(self.other_modality_of)}"
            )
        return "unlike every labelled case" if self.unusual else ""

    @property
    def predicted(self) -> int:
        """Index of the most probable class."""
        return int(np.argmax(self.probabilities))

    @property
    def uncertain(self) -> bool:
        """Whether no class reaches the confidence threshold (then no label is given)."""
        return (
            int(decide(np.asarray(self.probabilities), min_confidence=CALIBRATION.min_confidence))
            == UNCERTAIN
        )

    @property
    def labelled(self) -> bool:
        """Whether the page gives this case a class: neither unusual nor uncertain."""
        return not (self.unusual or self.uncertain)

    def outcome(self, classes: Sequence[str]) -> str:
        """The class name, "unusual image" for a case unlike the labelled ones, or "uncertain"
        when no class is confident enough."""
        if self.unusual:
            return OUTCOME_UNUSUAL
        return OUTCOME_UNCERTAIN if self.uncertain else classes[self.predicted]


def classify_cases(adaptation: Adaptation, cases: LoadedCases) -> list[Prediction]:
    """Out-of-distribution scores, calibrated probabilities and nearest labelled cases for each
    readable new case.

    Raises:
        CaseError: no readable case, or cases preprocessed for a different input size.
    """
    if not cases.cases:
        raise CaseError("no readable case to classify: upload PNG, JPEG, DICOM or NIfTI files")
    images = cases.images
    expected = adaptation.support.images.shape[1:]
    if images.shape[1:] != expected:
        raise CaseError(
            f"cases were prepared as {images.shape[1:]} but this adapter's model takes "
            f"{expected}; upload them again"
        )
    x = torch.from_numpy(images)
    features = adaptation.classifier.embed(x)
    scores = unusual_scores(
        support_features=adaptation.support_embeddings,
        case_features=features,
        support_images=torch.from_numpy(adaptation.support.images),
        case_images=x,
        config=OOD,
    ).tolist()
    probabilities = adaptation.probabilities_of(features).numpy()
    known = tuple(sorted({m for m in adaptation.support.modalities if m}))

    def other(case: LoadedCase) -> tuple[str, ...]:
        """The labelled cases' modalities, when this DICOM case is of none of them."""
        modality = case.identity.modality
        return known if modality and known and modality not in known else ()

    distances = torch.cdist(features, adaptation.support_embeddings)
    order = distances.argsort(dim=1)[:, :NEAREST].numpy()
    support = adaptation.support
    return [
        Prediction(
            name=case.name,
            probabilities=tuple(float(p) for p in probs),
            nearest=tuple(
                Neighbour(
                    index=int(j),
                    name=support.names[j],
                    label=support.classes[support.labels[j]],
                    distance=float(distances[i, j]),
                )
                for j in order[i]
            ),
            ood_score=float(scores[i]),
            identity=case.identity,
            other_modality_of=other(case),
        )
        for i, (case, probs) in enumerate(zip(cases.cases, probabilities, strict=True))
    ]


def predictions_csv(
    classes: Sequence[str], predictions: Sequence[Prediction], *, provenance: Provenance
) -> str:
    """One row per case: file, the archive's accession number, patient and patient ID (empty for
    files that are not DICOM), outcome (a class, "uncertain" or "unusual image"), the most likely
    class and its calibrated probability (empty for an unusual image: it is not classified),
    every class's probability, the out-of-distribution score, the nearest labelled cases, then
    the provenance (adapter, version, base model and its privacy status, condition, user, time,
    reliability, notice) on every row."""
    origin = provenance.columns()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "case",
            "accession",
            "patient",
            "patient_id",
            "outcome",
            "most_likely",
            "probability",
            *(f"p({c})" for c in classes),
            "unusual_score",
            "unusual_reason",
            "nearest_cases",
            *origin,
        ]
    )
    for p in predictions:
        shown = not p.unusual
        writer.writerow(
            [
                p.name,
                p.identity.accession,
                p.identity.patient,
                p.identity.patient_id,
                p.outcome(classes),
                classes[p.predicted] if shown else "",
                f"{p.probabilities[p.predicted]:.4f}" if shown else "",
                *(f"{v:.4f}" if shown else "" for v in p.probabilities),
                f"{p.ood_score:.2f}",
                p.unusual_reason,
                "; ".join(f"{n.name} ({n.label})" for n in p.nearest),
                *origin.values(),
            ]
        )
    return out.getvalue()
