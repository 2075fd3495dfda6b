"""Preparing a model version for a new modality from this hospital's unlabelled studies, as the
dashboard does it: check where the studies are, run :func:`models.domain.adapt_domain`, and publish
the result as a *local* version of this node's registry (kind ``local``, parent = the base version).

A local version is derived from the hospital's own images without differential privacy, so it
never leaves the node: the federation only ever reads and publishes ``global`` versions
(``federation/publishing.py``), and docs/privacy.md ("Local domain adaptation") says why anything
derived from it must pass through an accounted DP mechanism before it is shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.dashboard.adapters import epsilon_label
from app.dashboard.errors import SourceError
from app.dashboard.uploads import Upload, load_uploads
from models.adaptation import AdaptConfig
from models.domain import (
    DomainConfig,
    UnlabeledImages,
    adapt_domain,
    domain_record,
    load_unlabeled,
    save_prepared,
)
from models.errors import DataError
from models.pipeline import PipelineConfig
from models.registry import KIND_LOCAL, KIND_PUBLIC, Registry, RegistryEntry

# Registry info keys of a local version, written here and read by the adapt page.
INFO_DOMAIN = "domain"  # models.domain.domain_record: method, images, digest, source...
INFO_LOCAL_ONLY = "local_only"
INFO_AUTHOR = "author"
LOCAL_ONLY = "local only: derived from this hospital's unlabelled images; never shared"
# What the adapt page says about a version's domain statistics (no jargon: issue 24, item 11).
CENTRE_ACTIVE = (
    "Cases are compared after removing what these studies look like on average at this "
    "hospital (learnt from the unlabelled studies), so the common look of the scanner and "
    "modality does not hide the differences between classes."
)
CENTRE_UNUSED = (
    "This version knows what these studies look like on average at this hospital, but the "
    "{mode} adaptation does not use it."
)
PUBLIC_NOTE = "public ImageNet encoder, trained on no patient's data (no privacy budget spent)"
SOURCE_SUFFIXES = (".npz", ".csv")  # besides folders (models.domain.load_unlabeled)
LOAD_SHARE = 0.1  # share of the progress bar for reading the studies
SAVE_AT = 0.95  # where training ends on the progress bar and saving begins

# What each method does, in plain words (one entry per DOMAIN_METHODS name).
METHOD_HELP: dict[str, str] = {
    "statistics": "statistics: seconds; learns only the modality's average appearance, used to "
    "centre the features",
    "batch-statistics": "batch-statistics: a minute; also re-measures how strongly each of "
    "the encoder's filters responds to these studies (nothing is trained)",
    "contrastive": "contrastive: minutes; teaches the model what varies in these studies, "
    "keeping what it knew (the largest measured gain)",
    "contrastive-norm": "contrastive-norm: minutes; the same, changing only the normalisation "
    "layers (a smaller change, for few studies)",
}

ProgressFn = Callable[[float, str], None]


def resolve_source(text: str, *, roots: Sequence[Path] = ()) -> Path:
    """The folder, CSV manifest or ``.npz`` of unlabelled studies named on the page.

    Args:
        text: the path as typed (``~`` is expanded).
        roots: folders the studies must lie in (``FEDFEW_DATA_ROOTS``); empty: no folder may be
            read (IT names them: a dashboard must not read any file its account can).

    Raises:
        SourceError: empty, no folder allowed, missing, outside every allowed folder, or neither
            a folder, a ``.csv`` nor an ``.npz``.
    """
    if not text.strip():
        raise SourceError("give the folder (or the .csv manifest or .npz file) of the studies")
    if not roots:
        raise SourceError(
            "this dashboard may read no folder yet: ask IT to name the folders of studies it may "
            "read (fedfew dashboard --data-root DIR, or FEDFEW_DATA_ROOTS), or take the studies "
            "from the image archive"
        )
    path = Path(text.strip()).expanduser().resolve()
    if not any(path.is_relative_to(Path(r).expanduser().resolve()) for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise SourceError(
            f"{text.strip()} is outside the folders this dashboard may read ({allowed}); copy "
            "the studies there or ask IT to add the folder to FEDFEW_DATA_ROOTS"
        )
    if not path.exists():
        raise SourceError(f"{text.strip()} does not exist on this machine: check the path")
    if not path.is_dir() and path.suffix.lower() not in SOURCE_SUFFIXES:
        raise SourceError(
            f"{text.strip()} is neither a folder, a .csv manifest with a path column nor an .npz "
            "file of images"
        )
    return path


def studies_from_cases(
    uploads: Sequence[Upload], *, source: str
) -> Callable[[PipelineConfig], UnlabeledImages]:
    """Studies pulled from the archive (or uploaded) as a :func:`prepare_model` source: read
    through the base model's pipeline when the preparation runs; ``source`` names them in the
    local version's record (never a patient: e.g. "image archive, 40 CR studies")."""

    def read(pipeline: PipelineConfig) -> UnlabeledImages:
        loaded = load_uploads(uploads, pipeline=pipeline)
        if not loaded.cases:
            raise DataError("none of the studies could be read: pull or upload image studies")
        return UnlabeledImages(images=loaded.images, source=source, skipped=len(loaded.errors))

    return read


@dataclass(frozen=True)
class Prepared:
    """A published local version and what went into it."""

    entry: RegistryEntry
    images: int  # unlabelled studies used
    skipped: int  # unreadable files left out
    steps: int  # training steps taken (0 for ``statistics``)


def prepare_model(
    registry: Path,
    *,
    base_version: int,
    source: Path | Callable[[PipelineConfig], UnlabeledImages],
    config: DomainConfig,
    author: str = "",
    on_progress: ProgressFn | None = None,
) -> Prepared:
    """Prepare ``base_version`` for the modality of the studies at ``source`` and publish it as a
    local version of ``registry`` (labels in the source are never read).

    Args:
        registry: this node's registry.
        base_version: the version to prepare.
        source: a folder, CSV manifest or ``.npz`` (:func:`models.domain.load_unlabeled`), or a
            function that gives the studies through the base model's pipeline
            (:func:`studies_from_cases`: studies pulled from the archive).
        config: the preparation.
        author: who prepared it (kept in the registry).
        on_progress: (fraction done, what is happening); an exception it raises (Cancel) stops
            the work before anything is published.

    Raises:
        SourceError: nothing readable at ``source``, or fewer than two studies.
        RegistryError: no registry or no such base version.
    """
    report = on_progress or (lambda _fraction, _text: None)
    reg = Registry.open(registry)
    base = reg.get(base_version)
    loaded = reg.load_model(base_version)
    report(0.0, "reading the studies")
    try:
        if isinstance(source, Path):
            unlabeled = load_unlabeled(source, loaded.pipeline)  # an .npz of images is enough
        else:
            unlabeled = source(loaded.pipeline)
    except DataError as exc:
        raise SourceError(f"cannot use these studies: {exc}") from exc
    report(LOAD_SHARE, f"preparing ({config.method}) on {len(unlabeled.images)} studies")
    start = time.monotonic()
    budget_s = 60.0 * config.minutes

    def on_step(step: int, _loss: float) -> None:  # step counts from 0
        # Training stops at the step count or the time budget, whichever comes first.
        done = max((step + 1) / config.steps, (time.monotonic() - start) / budget_s)
        report(
            LOAD_SHARE + (SAVE_AT - LOAD_SHARE) * min(done, 1.0),
            f"training: step {step + 1} of at most {config.steps}",
        )

    try:
        result = adapt_domain(loaded.model, unlabeled.images, config=config, on_step=on_step)
    except DataError as exc:
        raise SourceError(f"cannot use these studies: {exc}") from exc
    record = domain_record(config, unlabeled, result)

    def write(folder: Path) -> None:
        save_prepared(folder, loaded, result, record=record, parent={"version": base_version})

    report(SAVE_AT, "saving the local version")
    entry = reg.publish(
        write,
        kind=KIND_LOCAL,
        name=f"{base.name} prepared for {unlabeled.source}",
        parent=base_version,
        info={INFO_DOMAIN: record, INFO_LOCAL_ONLY: LOCAL_ONLY, INFO_AUTHOR: author},
    )
    report(1.0, "done")
    return Prepared(
        entry=entry, images=len(unlabeled.images), skipped=unlabeled.skipped, steps=result.steps
    )


def preparation(entry: RegistryEntry) -> dict[str, Any] | None:
    """The domain record of a local version (None for a global one)."""
    record = entry.info.get(INFO_DOMAIN) if entry.kind == KIND_LOCAL else None
    return record if isinstance(record, dict) else None


def local_rows(registry: Path) -> list[dict[str, Any]]:
    """One row per local version of ``registry``, newest first: what it was prepared from, on
    which studies, how, and when."""
    rows = []
    for entry in reversed(Registry.open(registry).entries(kind=KIND_LOCAL)):
        record = preparation(entry) or {}
        rows.append(
            {
                "version": entry.id,
                "prepared from": f"v{entry.parent}",
                **{key: record.get(key) for key in ("source", "method", "images", "steps_taken")},
                "created": entry.created,
            }
        )
    return rows


def version_label(entry: RegistryEntry) -> str:
    """How a base-model choice reads, e.g. ``v3 global-round-2 · ε 2.50 (highest of 2 sites)`` or
    ``v7 · prepared for chest-ct (contrastive, 812 images) · local, from v3``."""
    record = preparation(entry)
    if entry.kind == KIND_PUBLIC:
        return f"{entry.label} · {PUBLIC_NOTE}"
    if record is None:
        return f"{entry.label} · {epsilon_label(entry)}"
    return (
        f"v{entry.id} · prepared for {record.get('source', '?')} ({record.get('method', '?')}, "
        f"{record.get('images', '?')} images) · local, from v{entry.parent}"
    )


def centring_active(mode: str, *, domain_mean: torch.Tensor | None) -> bool:
    """Whether the clinician's adaptation in ``mode`` centres on the version's domain statistics:
    the version must carry them and the adaptation config (``clinic.adapt_cases`` uses
    ``AdaptConfig(mode=mode)``) must centre."""
    return domain_mean is not None and AdaptConfig(mode=mode).centres


def base_model_note(entry: RegistryEntry, *, domain_mean: torch.Tensor | None, mode: str) -> str:
    """One paragraph for the adapt page: which version and which domain preparation it uses,
    and whether centring on domain statistics is active."""
    record = preparation(entry)
    if entry.kind == KIND_PUBLIC:
        used = f"Using {entry.label}: {PUBLIC_NOTE}."
    elif record is None:
        used = f"Using {entry.label}, a federated model version, without a domain preparation."
    else:
        used = (
            f"Using v{entry.id}: v{entry.parent} prepared on this hospital's "
            f"{record.get('images')} unlabelled studies from {record.get('source')} "
            f"({record.get('method')}, {record.get('steps_taken')} training steps); {LOCAL_ONLY}."
        )
    if centring_active(mode, domain_mean=domain_mean):
        centre = CENTRE_ACTIVE
    elif domain_mean is not None:
        centre = CENTRE_UNUSED.format(mode=mode)
    else:
        return used  # nothing prepared: nothing more to say
    return f"{used} {centre}"
