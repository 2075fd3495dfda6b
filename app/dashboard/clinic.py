"""What the clinician pages do: adapt a base model to a few labelled cases, estimate how reliable
that is, classify new cases with their nearest labelled cases, export the results.

Saving and loading adapters is in :mod:`app.dashboard.adapters`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.dashboard.errors import CaseError
from app.dashboard.uploads import LoadedCases
from models.adaptation import ADAPT_MODES, AdaptConfig, AdaptedClassifier, adapt, step_hook
from models.calibration import (
    CalibrationConfig,
    Interval,
    fit_temperature,
    held_out_logits,
    reliability_sentence,
    wilson_interval,
)
from models.calibration import held_out_order as calibration_order
from models.model_dir import LoadedModel
from models.ood import FLAG_AT, support_outlier_scores
from models.pipeline import PipelineConfig

MIN_CLASSES = 2  # one class is not a classification
MIN_CASES_FOR_RELIABILITY = 2  # leave-one-out needs another case of the held-out class
FEW_CASES = 3  # below this per class the reliability estimate is too coarse to trust
LOW_RELIABILITY = 0.7  # below 7 in 10 right, a clinician should add cases before relying on it
CALIBRATION = CalibrationConfig()  # temperature grid, prior, and the "uncertain" threshold
# Without held-out cases (a class with one case) nothing can be calibrated: the probabilities are
# flattened by this temperature so no case reaches the "uncertain" threshold on raw scores alone.
UNCALIBRATED_T = CALIBRATION.t_max
SLOW_MODE_FOLDS = CALIBRATION.slow_mode_folds  # folds of finetune and MAML (seconds each)
ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class SupportSet:
    """Labelled cases of a new condition: pipeline outputs, labels and the files they came from."""

    images: np.ndarray  # (n, C, S, S) float32
    labels: np.ndarray  # (n,) int64 in 0..ways-1
    classes: tuple[str, ...]
    names: tuple[str, ...]
    # Each case's DICOM modality ("" for other files; empty for adapters saved before it).
    modalities: tuple[str, ...] = ()

    @property
    def ways(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def counts(self) -> list[int]:
        """Cases per class."""
        return np.bincount(self.labels, minlength=self.ways).tolist()


def build_support(classes: Sequence[str], cases: Sequence[LoadedCases]) -> SupportSet:
    """Check the clinician's classes and cases and put them together.

    Raises:
        CaseError: fewer than 2 classes, an empty or repeated class name, or a class without a
            readable case.
    """
    names = [c.strip() for c in classes]
    if len(names) < MIN_CLASSES:
        raise CaseError(
            f"a condition needs at least {MIN_CLASSES} classes to tell apart, got {len(names)}: "
            "add a class (for example the normal appearance)"
        )
    if any(not n for n in names):
        raise CaseError("every class needs a name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CaseError(f"class names must differ; repeated: {', '.join(repeated)}")
    empty = [n for n, c in zip(names, cases, strict=True) if not c.cases]
    if empty:
        raise CaseError(f"no readable case for {', '.join(empty)}: upload at least one per class")
    return SupportSet(
        images=np.concatenate([c.images for c in cases]).astype(np.float32, copy=False),
        labels=np.concatenate(
            [np.full(len(c.cases), k, dtype=np.int64) for k, c in enumerate(cases)]
        ),
        classes=tuple(names),
        names=tuple(n for c in cases for n in c.names),
        modalities=tuple(m for c in cases for m in c.modalities),
    )


def support_warnings(support: SupportSet) -> list[str]:
    """Plain-language cautions about a support set that is usable but thin."""
    counts = support.counts()
    few = [f"{c} ({n})" for c, n in zip(support.classes, counts, strict=True) if n < FEW_CASES]
    if not few:
        return []
    return [
        f"Few cases for {', '.join(few)}: with fewer than {FEW_CASES} cases per class the "
        "reliability estimate is rough"
        + (" and cannot be computed for a class with one case" if min(counts) < 2 else "")
        + ". Add cases if you can."
    ]


@dataclass(frozen=True)
class Reliability:
    """Leave-one-out accuracy on the support set (each case predicted after adapting to the
    rest), reported as a Wilson interval, and the temperature fitted to the same held-out cases."""

    right: int
    cases: int  # held-out cases checked
    of: int = 0  # cases in the support set (0: all were checked)
    temperature: float = 1.0  # models.calibration.fit_temperature of the held-out logits

    @property
    def accuracy(self) -> float:
        """Fraction of held-out cases predicted right."""
        return self.right / self.cases

    @property
    def interval(self) -> Interval:
        """95% Wilson interval of the accuracy."""
        return wilson_interval(self.right, self.cases, z=CALIBRATION.z)

    @property
    def low(self) -> bool:
        """Whether the interval's lower end is below :data:`LOW_RELIABILITY`: the cases do not
        show that the adapter is reliable (too few of them, or too many wrong)."""
        return self.interval.low < LOW_RELIABILITY

    def sentence(self) -> str:
        """What the number means, for someone without ML training."""
        return reliability_sentence(self.right, self.cases, of=self.of, z=CALIBRATION.z)


@dataclass
class Adaptation:
    """An adapted classifier together with everything needed to explain and save it."""

    classifier: AdaptedClassifier
    support: SupportSet
    support_embeddings: torch.Tensor
    mode: str
    base_version: int
    pipeline: PipelineConfig  # the base model's: new cases must be prepared the same way
    reliability: Reliability | None  # None when a class has a single case
    condition: str = ""  # what the clinician called the condition when adapting
    inputs: str = ""  # fingerprint of the inputs that produced it (see :func:`fingerprint`)
    # Labelled cases that look unlike all the others (models.ood.support_outlier_scores): a
    # photograph or another modality's study filed in a class. The clinician checks them.
    suspect: tuple[str, ...] = ()

    @property
    def temperature(self) -> float:
        """The calibration temperature; without held-out cases, :data:`UNCALIBRATED_T`."""
        return self.reliability.temperature if self.reliability else UNCALIBRATED_T

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities ``(n, ways)`` (what every page shows)."""
        return torch.softmax(self.classifier.logits(x) / self.temperature, dim=-1)


def held_out_order(labels: np.ndarray) -> list[int]:
    """Support indices taking each class in turn (see :func:`models.calibration.held_out_order`)."""
    return calibration_order(labels)


def reliability(
    model: LoadedModel,
    support: SupportSet,
    *,
    config: AdaptConfig,
    on_progress: ProgressFn | None = None,
) -> Reliability:
    """Leave-one-out accuracy (the protocol of :func:`models.evaluation.leave_one_out`) and the
    temperature fitted to the held-out logits.

    With prototypes the backbone is fixed, so the support set is embedded once and each fold only
    recomputes the prototypes. Finetune and MAML adapt once per fold, so they hold out at most
    :data:`SLOW_MODE_FOLDS` cases (every class in turn): an unbiased but coarser estimate.

    Raises:
        CaseError: a class with fewer than 2 cases.
    """
    counts = support.counts()
    if min(counts) < MIN_CASES_FOR_RELIABILITY:
        raise CaseError(
            f"leave-one-out needs at least {MIN_CASES_FOR_RELIABILITY} cases per class, "
            f"got {dict(zip(support.classes, counts, strict=True))}"
        )

    def on_fold(done: int, total: int) -> None:
        if on_progress is not None:
            on_progress(done / total, f"checking reliability: case {done} of {total}")

    held = held_out_logits(
        model.model,
        torch.from_numpy(support.images),
        torch.from_numpy(support.labels),
        ways=support.ways,
        config=config,
        meta=model.meta,
        domain_mean=model.domain_mean,
        max_folds=CALIBRATION.folds(config),
        on_fold=on_fold,
    )
    return Reliability(
        right=held.right,
        cases=len(held.indices),
        of=len(support.labels),
        temperature=fit_temperature(held.logits, held.labels, config=CALIBRATION),
    )


def fingerprint(*, base_version: int, mode: str, support: SupportSet) -> str:
    """A digest of everything an adaptation depends on: base version, mode, class names, and
    each case's class and pixels. A result is shown and saved only while the inputs match."""
    digest = hashlib.sha256(f"{base_version}|{mode}|{list(support.classes)}".encode())
    digest.update(np.ascontiguousarray(support.labels).tobytes())
    digest.update(np.ascontiguousarray(support.images).tobytes())
    return digest.hexdigest()


def adapt_cases(
    model: LoadedModel,
    support: SupportSet,
    *,
    mode: str,
    base_version: int,
    with_reliability: bool = True,
    condition: str = "",
    on_progress: ProgressFn | None = None,
) -> Adaptation:
    """Adapt the base model to the support set, estimate its reliability and calibrate it.

    ``on_progress`` is called with (fraction done, what is happening) after every step of the
    adaptation and every fold of the reliability check. An exception it raises (a Cancel button)
    stops the work and propagates: nothing is returned and the base model is unchanged.

    Raises:
        CaseError: an unknown mode.
    """
    if mode not in ADAPT_MODES:
        raise CaseError(f"adaptation must be one of {', '.join(ADAPT_MODES)}, got {mode!r}")
    config = AdaptConfig(mode=mode)
    report: ProgressFn = on_progress or (lambda fraction, text: None)
    checked = with_reliability and min(support.counts()) >= MIN_CASES_FOR_RELIABILITY
    limit = CALIBRATION.folds(config) or len(support.labels)
    folds = min(limit, len(support.labels)) if checked else 0
    share = 1 / (1 + folds)  # each fold of the reliability check costs about one adaptation
    report(0.0, f"adapting ({mode})")
    classifier = adapt(
        model.model,
        torch.from_numpy(support.images),
        torch.from_numpy(support.labels),
        ways=support.ways,
        config=config,
        meta=model.meta,
        domain_mean=model.domain_mean,
        on_step=lambda done, total: report(
            share * done / total, f"adapting ({mode}): step {done} of {total}"
        ),
    )
    score = None
    if checked:
        folds_done = [0.0]  # fraction of the folds finished

        def after_fold(fraction: float, text: str) -> None:
            folds_done[0] = fraction
            report(share + (1 - share) * fraction, text)

        def in_fold(step: int, steps: int) -> None:  # a fold's own steps: progress and Cancel
            case = round(folds_done[0] * folds) + 1
            within = min(folds_done[0] + step / steps / folds, 1.0)
            report(
                share + (1 - share) * within,
                f"checking reliability: case {case} of {folds}, step {step} of {steps}",
            )

        with step_hook(in_fold):
            score = reliability(model, support, config=config, on_progress=after_fold)
    report(1.0, "done")
    embeddings = classifier.embed(torch.from_numpy(support.images))
    outliers = support_outlier_scores(
        support_features=embeddings, support_images=torch.from_numpy(support.images)
    )
    return Adaptation(
        classifier=classifier,
        support=support,
        support_embeddings=embeddings,
        mode=mode,
        base_version=base_version,
        pipeline=model.pipeline,
        reliability=score,
        condition=condition.strip(),
        inputs=fingerprint(base_version=base_version, mode=mode, support=support),
        suspect=tuple(
            name
            for name, score in zip(support.names, outliers.tolist(), strict=True)
            if score > FLAG_AT
        ),
    )


CANNOT_SEPARATE = (
    "The model cannot tell these classes apart from these cases: checked on each labelled case "
    "in turn, it was right no more often than guessing, so every new case would come out about "
    'equally likely for each class ("uncertain"). What would help: more cases of each class, '
    "cases that show the difference clearly, or another base model (one prepared for this "
    "modality, or the public encoder)."
)


def separates(adaptation: Adaptation) -> bool:
    """Whether the held-out checks show the model telling the classes apart. False when the
    calibration temperature reached its cap (every calibrated probability is then about
    1/classes) or the held-out accuracy is no better than guessing; True when there was no check
    (a class with one case: the page says so separately)."""
    score = adaptation.reliability
    if score is None:
        return True
    capped = score.temperature >= CALIBRATION.t_max * (1 - 1e-9)
    return not (capped or score.accuracy <= 1 / adaptation.support.ways)


def reliability_text(adaptation: Adaptation) -> str:
    """The reliability sentence, or why there is none (for exports and the audit)."""
    if adaptation.reliability is None:
        return "not estimated (a class has a single case); probabilities not calibrated"
    return adaptation.reliability.sentence()


def changed_inputs(
    adaptation: Adaptation,
    *,
    base_version: int,
    mode: str,
    condition: str,
    classes: Sequence[str],
    cases: Sequence[LoadedCases],
) -> str:
    """What on the page differs from the inputs that produced ``adaptation``, in words ("" when
    nothing does): a result may only be saved for exactly the inputs it came from."""
    if base_version != adaptation.base_version:
        return "the base model"
    if mode != adaptation.mode:
        return "the adaptation"
    if condition.strip() != adaptation.condition:
        return "the condition"
    try:
        support = build_support(classes, cases)
    except CaseError:
        return "the classes or cases"
    if fingerprint(base_version=base_version, mode=mode, support=support) != adaptation.inputs:
        return "the classes or cases"
    return ""
