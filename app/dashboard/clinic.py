"""What the clinician pages do: adapt a base model to a few labelled cases, estimate how reliable
that is, classify new cases with their nearest labelled cases, export the results.

Cases are embedded when they arrive (:func:`embed_on_arrival`, :func:`embed_new_cases`: the pages
call them right after decoding an upload or an archive pull) when the base model's features are
kept per image (a frozen encoder, :mod:`models.feature_cache`), so "Adapt" and classifying only
fit and apply the head and run the checks.

Saving and loading adapters is in :mod:`app.dashboard.adapters`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from app.dashboard.errors import CaseError
from app.dashboard.known_classes import (
    KnownPrototypes,
    adapt_with_prototypes,
    held_out_with_prototypes,
)
from app.dashboard.uploads import LoadedCases
from models.adaptation import (
    ADAPT_MODES,
    AdaptConfig,
    AdaptedClassifier,
    adapt,
    embed,
    step_hook,
)
from models.calibration import (
    CalibrationConfig,
    Interval,
    fit_temperature,
    held_out_logits,
    reliability_sentence,
    wilson_interval,
)
from models.calibration import held_out_order as calibration_order
from models.feature_adapter import encoder_of
from models.freezing import is_fully_frozen
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
    # Whether the classifier embeds with the base model's own frozen encoder, whose features are
    # kept per image: then new cases are worth embedding when they arrive (embed_new_cases).
    caches_features: bool = False
    # The federation's released prototypes that joined the support (app.dashboard.known_classes)
    known: KnownPrototypes | None = None

    @property
    def temperature(self) -> float:
        """The calibration temperature; without held-out cases, :data:`UNCALIBRATED_T`."""
        return self.reliability.temperature if self.reliability else UNCALIBRATED_T

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities ``(n, ways)`` (what every page shows)."""
        return self.probabilities_of(self.classifier.embed(x))

    def probabilities_of(self, features: torch.Tensor) -> torch.Tensor:
        """:meth:`predict_proba` of cases whose backbone features (``classifier.embed``) are
        already at hand."""
        return torch.softmax(self.classifier.head_logits(features) / self.temperature, dim=-1)


def caches_features(model: nn.Module) -> bool:
    """Whether ``model``'s features cost nothing the second time: its encoder (the model itself,
    or the frozen encoder under a feature adapter) is frozen, so :mod:`models.feature_cache`
    keeps each image's features."""
    return is_fully_frozen(encoder_of(model))


def embed_on_arrival(model: LoadedModel, cases: LoadedCases, *, mode: str) -> bool:
    """Embed labelled cases as they arrive (after an upload or an archive pull is decoded), so
    the click on "Adapt" finds their features cached and only fits the head and runs the checks.

    Returns whether anything was embedded: nothing for a mode that changes the backbone
    (finetune, MAML: the features are those of the adapted copy) or a backbone whose features
    are not kept (a trainable encoder), where embedding now would only be done twice.
    """
    if not cases.cases or mode not in ADAPT_MODES or not ADAPT_MODES[mode].frozen_backbone:
        return False
    if not caches_features(model.model):
        return False
    config = AdaptConfig(mode=mode)
    embed(
        model.model,
        torch.from_numpy(cases.images),
        tta=config.tta,
        batch_limit=config.batch_limit,
    )
    return True


def embed_new_cases(adaptation: Adaptation, cases: LoadedCases) -> bool:
    """Embed new cases as they arrive on the classify page, with the adaptation's own backbone,
    so classifying them finds their features cached. Returns whether anything was embedded (see
    :func:`embed_on_arrival`; also nothing for cases prepared for another input size, which
    classifying refuses)."""
    if not cases.cases or not adaptation.caches_features:
        return False
    images = cases.images
    if images.shape[1:] != adaptation.support.images.shape[1:]:
        return False
    adaptation.classifier.embed(torch.from_numpy(images))
    return True


def held_out_order(labels: np.ndarray) -> list[int]:
    """Support indices taking each class in turn (see :func:`models.calibration.held_out_order`)."""
    return calibration_order(labels)


def reliability(
    model: LoadedModel,
    support: SupportSet,
    *,
    config: AdaptConfig,
    on_progress: ProgressFn | None = None,
    embeddings: torch.Tensor | None = None,
    known: KnownPrototypes | None = None,
) -> Reliability:
    """Leave-one-out accuracy (the protocol of :func:`models.evaluation.leave_one_out`) and the
    temperature fitted to the held-out logits.

    In frozen-backbone modes the support set is embedded once (or ``embeddings``, its backbone
    features, are given) and each fold only refits the head: a ridge head's fold is a solve of
    the size of the support set, about a millisecond. Finetune and MAML adapt once per fold, so
    they hold out at most :data:`SLOW_MODE_FOLDS` cases (every class in turn): an unbiased but
    coarser estimate. With ``known`` (the federation's prototypes) every fold's head also takes
    the prototypes; only the clinician's cases are held out.

    Raises:
        CaseError: a class with fewer than 2 cases, or prototypes with a mode that changes the
            network.
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

    if known is not None:
        images = torch.from_numpy(support.images)
        labels = torch.from_numpy(support.labels)
        fit = adapt_with_prototypes(
            model, images, labels, ways=support.ways, config=config, known=known, raw=embeddings
        )
        held = held_out_with_prototypes(
            fit, labels, ways=support.ways, config=config, on_fold=on_fold
        )
        return Reliability(
            right=held.right,
            cases=len(held.indices),
            of=len(support.labels),
            temperature=fit_temperature(held.logits, held.labels, config=CALIBRATION),
        )
    held = held_out_logits(
        model.model,
        torch.from_numpy(support.images),
        torch.from_numpy(support.labels),
        ways=support.ways,
        config=config,
        meta=model.meta,
        domain_mean=model.domain_mean,
        embeddings=embeddings if config.frozen_backbone else None,
        max_folds=CALIBRATION.folds(config),
        on_fold=on_fold,
    )
    return Reliability(
        right=held.right,
        cases=len(held.indices),
        of=len(support.labels),
        temperature=fit_temperature(held.logits, held.labels, config=CALIBRATION),
    )


def fingerprint(
    *, base_version: int, mode: str, support: SupportSet, known: KnownPrototypes | None = None
) -> str:
    """A digest of everything an adaptation depends on: base version, mode, class names, each
    case's class and pixels, and the federation's prototypes it took. A result is shown and
    saved only while the inputs match."""
    digest = hashlib.sha256(f"{base_version}|{mode}|{list(support.classes)}".encode())
    if known is not None:  # (without: the digest of adapters saved before prototypes existed)
        digest.update(f"|known|{known.fingerprint()}".encode())
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
    known: KnownPrototypes | None = None,
) -> Adaptation:
    """Adapt the base model to the support set, estimate its reliability and calibrate it.

    ``known``: the federation's released prototypes of the classes it knows, which join the
    support (:mod:`app.dashboard.known_classes`; ridge, prototype and linear only).

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
    images = torch.from_numpy(support.images)

    def on_step(done: int, total: int) -> None:
        report(share * done / total, f"adapting ({mode}): step {done} of {total}")

    if known is not None:
        classifier = adapt_with_prototypes(
            model,
            images,
            torch.from_numpy(support.labels),
            ways=support.ways,
            config=config,
            known=known,
            on_step=on_step,
        ).classifier
    else:
        classifier = adapt(
            model.model,
            images,
            torch.from_numpy(support.labels),
            ways=support.ways,
            config=config,
            meta=model.meta,
            domain_mean=model.domain_mean,
            on_step=on_step,
        )
    # The backbone's features of the support: cached when the cases were embedded on arrival.
    embeddings = classifier.embed(images)
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
            score = reliability(
                model,
                support,
                config=config,
                on_progress=after_fold,
                embeddings=embeddings,
                known=known,
            )
    report(1.0, "done")
    outliers = support_outlier_scores(support_features=embeddings, support_images=images)
    return Adaptation(
        classifier=classifier,
        support=support,
        support_embeddings=embeddings,
        mode=mode,
        base_version=base_version,
        pipeline=model.pipeline,
        reliability=score,
        condition=condition.strip(),
        inputs=fingerprint(base_version=base_version, mode=mode, support=support, known=known),
        caches_features=ADAPT_MODES[mode].frozen_backbone and caches_features(model.model),
        known=known,
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
    known: KnownPrototypes | None = None,
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
    if (adaptation.known is None) != (known is None) or (
        known is not None
        and adaptation.known is not None
        and known.fingerprint() != adaptation.known.fingerprint()
    ):
        return "the use of the federation's prototypes"
    digest = fingerprint(base_version=base_version, mode=mode, support=support, known=known)
    if digest != adaptation.inputs:
        return "the classes or cases"
    return ""
