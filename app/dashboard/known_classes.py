"""Classes the federation already knows: the DP class prototypes it released once
(``mechanism = "dp-prototypes"``), kept beside a global version as ``prototypes.safetensors``
(:mod:`privacy.prototype_release`), offered where a clinician adapts to a condition.

A clinician's class named like a released class (case, spaces, ``_`` and ``-`` aside) gets that
class's prototype in its support, :data:`COPIES` times, as ``bench/federated_encoder.py`` measures
it: the prototype (a mean of unit-length features) is put at the features' own scale, mapped like
every feature (centred, each part normalised) and joins the labelled cases before the head is
fitted. The leave-one-out reliability holds out only the clinician's own cases; the prototypes
stay in every fold. Reading the release is post-processing of what the federation published: no
privacy is spent here, and the epsilon shown is what the sites' reports say the release cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from app.dashboard.errors import CaseError
from models.adaptation import (
    ADAPT_MODES,
    AdaptConfig,
    AdaptedClassifier,
    FeatureMap,
    embed,
    fit_head,
    model_feature_map,
)
from models.calibration import HeldOut, head_held_out, held_out_order
from models.errors import RegistryError
from models.meta import split_params
from models.model_dir import LoadedModel
from models.registry import RegistryEntry
from privacy.errors import ReportFormatError
from privacy.mechanisms import PROTOTYPES
from privacy.prototype_release import PROTOTYPES_FILE, PrototypeRelease
from privacy.site_report import SitePrivacyReport

# Each released prototype joins its class's support as this many cases: bench/federated_encoder.py
# (--prototype-weight 5) measured +4.7 (brain MRI) and +3.8 (skin) points at epsilon 8.
COPIES = 5


def class_key(name: str) -> str:
    """How class names are compared: case, spacing, ``_`` and ``-`` ignored."""
    return " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()


def uses_prototypes(mode: str) -> bool:
    """Whether the adaptation ``mode`` can take released prototypes: a head fitted on mapped
    features of the unchanged backbone (ridge, prototype, linear), not finetune or MAML."""
    if mode not in ADAPT_MODES:
        return False
    spec = ADAPT_MODES[mode]
    return spec.frozen_backbone and spec.uses_feature_map


@dataclass(frozen=True)
class ReleasedPrototypes:
    """A federation's DP prototype release kept with a base model version, and what it cost."""

    version: int  # the base model version it is kept with
    classes: tuple[str, ...]  # the federation's class names, in row order
    prototypes: np.ndarray  # (K, d) float64 (privacy.prototype_release.prototypes_from_sums)
    sites: tuple[str, ...]  # the sites whose releases were summed
    epsilon: float | None  # the most any site's report says the release cost; None: no report
    delta: float | None
    digest: str  # PrototypeRelease.digest(): names this release in a saved adapter

    def cost(self) -> str:
        """``"ε 1.41 (δ 1e-05, the most any of 3 sites spent on it)"``, or that no site
        reported it."""
        sites = len(self.sites)
        of = f"{sites} sites" if sites != 1 else "1 site"
        if self.epsilon is None:
            return f"released by {of}; this copy carries no privacy report (ask IT)"
        most = "the most any of" if sites > 1 else "what"
        return f"ε {self.epsilon:.2f} (δ {self.delta:g}, {most} {of} spent on it)"

    def matches(self, classes: Sequence[str]) -> tuple[tuple[int, int], ...]:
        """(index of a clinician's class, row of the released class named alike), in order."""
        rows = {class_key(c): i for i, c in enumerate(self.classes)}
        return tuple(
            (i, rows[class_key(name)]) for i, name in enumerate(classes) if class_key(name) in rows
        )

    def for_classes(self, classes: Sequence[str]) -> KnownPrototypes | None:
        """The prototypes an adaptation to ``classes`` takes (None: no class is known)."""
        rows = self.matches(classes)
        return KnownPrototypes(release=self, rows=rows) if rows else None


@dataclass(frozen=True)
class KnownPrototypes:
    """The released prototypes one adaptation uses: which clinician class takes which row."""

    release: ReleasedPrototypes
    rows: tuple[tuple[int, int], ...]  # (clinician class index, release row)

    def names(self) -> list[str]:
        """The released class names used, in the clinician's class order."""
        return [self.release.classes[row] for _, row in self.rows]

    def fingerprint(self) -> str:
        """What an adaptation's inputs digest includes of it."""
        return f"{self.release.version}|{self.release.digest}|{list(self.rows)}"

    def to_json(self) -> dict[str, object]:
        """What a saved adapter keeps to take the same prototypes again."""
        return {
            "version": self.release.version,
            "release_sha256": self.release.digest,
            "copies": COPIES,
            "rows": [[i, self.release.classes[row]] for i, row in self.rows],
        }


def released_prototypes(entry: RegistryEntry) -> ReleasedPrototypes | None:
    """The prototype release kept with a registry version (None when it has none), with the
    epsilon it cost from the version's privacy reports of the ``dp-prototypes`` mechanism.

    Raises:
        RegistryError: the file is there but cannot be read.
    """
    path = entry.path / PROTOTYPES_FILE
    if not path.is_file():
        return None
    try:
        release = PrototypeRelease.load(path)
        prototypes = release.prototypes()
    except (OSError, ValueError, KeyError) as exc:
        raise RegistryError(f"the prototype release of {entry.label} is unreadable: {exc}") from exc
    try:
        reports = [SitePrivacyReport.from_dict(r) for r in entry.privacy.values()]
    except ReportFormatError:
        reports = []
    spent = [r for r in reports if r.mechanism == PROTOTYPES]
    return ReleasedPrototypes(
        version=entry.id,
        classes=release.classes,
        prototypes=prototypes,
        sites=release.sites,
        epsilon=max(r.epsilon_round for r in spent) if spent else None,
        delta=max(r.delta for r in spent) if spent else None,
        digest=release.digest(),
    )


def from_saved(saved: object, base: RegistryEntry) -> KnownPrototypes | None:
    """The prototypes a saved adapter used (its ``to_json``), taken again from its base version.

    Raises:
        RegistryError: the adapter used a release its base version no longer holds as it was.
    """
    if not saved:
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("rows"), list):
        raise RegistryError("the adapter's record of the federation's prototypes is unreadable")
    release = released_prototypes(base)
    if release is None or release.digest != saved.get("release_sha256"):
        raise RegistryError(
            f"the adapter was made with the federation's prototypes kept with {base.label}, "
            "which that version no longer holds as they were: adapt again"
        )
    rows = {name: i for i, name in enumerate(release.classes)}
    try:
        pairs = tuple((int(i), rows[str(name)]) for i, name in saved["rows"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RegistryError(
            "the adapter's record of the federation's prototypes is unreadable"
        ) from exc
    return KnownPrototypes(release=release, rows=pairs)


@dataclass(frozen=True)
class KnownFit:
    """A classifier fitted on the support and the released prototypes, and what its
    reliability check needs."""

    classifier: AdaptedClassifier
    mapped: torch.Tensor  # the support's mapped features (n, d)
    extra: torch.Tensor  # the prototypes' mapped rows, COPIES of each (m, d)
    extra_labels: torch.Tensor  # (m,)


def prototype_rows(
    known: KnownPrototypes, raw: torch.Tensor, fmap: FeatureMap
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prototypes as support rows: at the scale of the support's backbone features ``raw``
    (a prototype is a mean of unit-length features; for a feature adapter, whose features have
    norm sqrt(parts), this is bench/federated_encoder.py's scale), mapped by ``fmap``,
    :data:`COPIES` of each; and their labels.

    Raises:
        CaseError: the release was made with features of another width (another network).
    """
    protos = known.release.prototypes[[row for _, row in known.rows]]
    if protos.shape[1] != raw.shape[1]:
        raise CaseError(
            f"the federation's prototypes have {protos.shape[1]} features but this base model "
            f"gives {raw.shape[1]}: they were made with another network and cannot be used"
        )
    scale = raw.norm(dim=1).mean()
    rows = fmap(scale * torch.from_numpy(protos).to(raw.dtype))
    labels = torch.tensor([i for i, _ in known.rows], dtype=torch.int64)
    return rows.repeat(COPIES, 1), labels.repeat(COPIES)


def adapt_with_prototypes(
    model: LoadedModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    known: KnownPrototypes,
    on_step: Callable[[int, int], None] | None = None,
    raw: torch.Tensor | None = None,
) -> KnownFit:
    """The frozen-backbone adaptation of :func:`models.adaptation.adapt` (its feature map from
    the support, centred on the model's domain mean when it has one) with the prototypes'
    rows joining the support before the head is fitted. ``raw``: the support's backbone
    features when already computed.

    Raises:
        CaseError: the mode cannot take prototypes, or they do not fit the network.
    """
    if not uses_prototypes(config.mode):
        raise CaseError(
            f"the federation's prototypes join a head on the features; {config.mode} changes "
            "the network itself: choose ridge, prototype or linear to use them"
        )
    if raw is None:
        raw = embed(model.model, images, tta=config.tta, batch_limit=config.batch_limit)
    fmap = model_feature_map(config, model.model, domain_mean=model.domain_mean, features=raw)
    mapped = fmap(raw)
    extra, extra_labels = prototype_rows(known, raw, fmap)
    head = fit_head(
        torch.cat([mapped, extra]),
        torch.cat([labels, extra_labels]),
        ways=ways,
        config=config,
        on_step=on_step,
    )
    if on_step is not None:
        on_step(1, 1)  # the head is fitted
    params, buffers = split_params(model.model)
    classifier = AdaptedClassifier(
        model.model, {**params, **head}, buffers, ways=ways, config=config, features=fmap
    )
    return KnownFit(classifier=classifier, mapped=mapped, extra=extra, extra_labels=extra_labels)


def held_out_with_prototypes(
    fit: KnownFit,
    labels: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    on_fold: Callable[[int, int], None] | None = None,
) -> HeldOut:
    """Leave-one-out logits of the clinician's cases (classes in turn, as
    :func:`models.calibration.held_out_logits`), each from a head fitted on the other cases and
    every prototype row (in closed form for ridge and prototypes, in one batched fit for linear:
    the prototype rows are never held out)."""
    return head_held_out(
        fit.mapped,
        labels,
        held_out_order(labels.cpu().numpy()),
        ways=ways,
        config=config,
        extra=fit.extra,
        extra_labels=fit.extra_labels,
        on_fold=on_fold,
    )
