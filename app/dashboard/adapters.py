"""Adapters and base models in this node's registry: list them, show their privacy budget,
save an adaptation, rebuild a saved one.

An adapter is stored as its support set (pipeline outputs and labels), class names, adaptation
mode and base version; loading it adapts the same base version to the same cases again (the
adaptation is deterministic, and the registry's versions never change).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from app.dashboard.clinic import (
    Adaptation,
    Reliability,
    SupportSet,
    adapt_cases,
    reliability_text,
)
from app.dashboard.errors import CaseError
from app.dashboard.known_classes import from_saved
from app.dashboard.provenance import Provenance, utc_now
from models.adaptation import AdaptConfig
from models.errors import RegistryError
from models.model_dir import LoadedModel
from models.public_start import ensure_public_base
from models.registry import KIND_GLOBAL, KIND_LOCAL, KIND_PUBLIC, Registry, RegistryEntry
from privacy.errors import ReportFormatError
from privacy.site_report import SitePrivacyReport

ADAPTER_JSON = "adapter.json"
SUPPORT_FILE = "support.safetensors"
ADAPTER_FORMAT = 1
KNOWN_KEY = "known_prototypes"  # adapter.json: the federation's prototypes it took (or absent)
IMAGES_KEY = "images"
LABELS_KEY = "labels"


def site_reports(entry: RegistryEntry) -> dict[str, SitePrivacyReport]:
    """Each site's privacy report in a version (the federation's one record type).

    Raises:
        ReportFormatError: a report is not a :class:`SitePrivacyReport`.
    """
    return {str(site): SitePrivacyReport.from_dict(r) for site, r in sorted(entry.privacy.items())}


def epsilon_label(entry: RegistryEntry) -> str:
    """``"ε 2.31 (highest of 3 sites)"``, or that the version carries no (readable) report."""
    try:
        reports = site_reports(entry)
    except ReportFormatError:
        return "privacy report unreadable: ask IT to check this version"
    if not reports and entry.info.get("round", 0) > 0:  # a federated round's output
        return "trained with DP by the federation; this copy has no privacy report (ask IT)"
    if not reports:
        return "no privacy report (not trained with differential privacy)"
    worst = max(r.epsilon_spent for r in reports.values())
    sites = len(reports)
    return f"ε {worst:.2f}" + (f" (highest of {sites} sites)" if sites > 1 else f" ({sites} site)")


def base_models(registry: Path, *, local: bool = True, public: bool = True) -> list[RegistryEntry]:
    """Model versions to adapt from, newest first: the federation's global versions, unless
    ``public`` is false the public encoder (:data:`KIND_PUBLIC`), and unless ``local`` is false
    this hospital's local versions prepared for a modality.

    Raises:
        RegistryError: no registry at ``registry``.
    """
    kinds = (KIND_GLOBAL,) + ((KIND_PUBLIC,) if public else ()) + ((KIND_LOCAL,) if local else ())
    found = [e for e in Registry.open(registry).entries() if e.kind in kinds]
    return list(reversed(found))


def default_base(models: Sequence[RegistryEntry]) -> int | None:
    """The base model offered when the user has chosen none: the newest federated version,
    else the public encoder; never "the newest whoever made it" (a local version one user
    prepared for their modality is chosen only by choosing it). None: nothing to offer."""
    for kind in (KIND_GLOBAL, KIND_PUBLIC):
        newest = max((e.id for e in models if e.kind == kind), default=None)
        if newest is not None:
            return newest
    return None


def ensure_base(registry: Path) -> list[RegistryEntry]:
    """The base models of ``registry``, registering the public encoder first when it holds none
    at all (a hospital whose federation has published nothing yet).

    Raises:
        WeightsError: the public encoder's weights are not installed (the message says how).
        RegistryError: the registry cannot be created or read.
    """
    try:
        models = base_models(registry)
    except RegistryError:
        models = []
    if models:
        return models
    ensure_public_base(registry)
    return base_models(registry)


def saved_adapters(registry: Path) -> list[RegistryEntry]:
    """Adapters saved in the registry, newest first (none when there is no registry yet)."""
    if not (registry / "registry.sqlite").is_file():
        return []
    return list(reversed(Registry.open(registry).entries(kind="adapter")))


def save_adapter(
    registry: Path, adaptation: Adaptation, *, name: str, condition: str = "", author: str = ""
) -> RegistryEntry:
    """Publish the adapter in this node's registry (kind ``adapter``, parent = base version).

    Raises:
        CaseError: an empty name or condition.
    """
    if not name.strip():
        raise CaseError("give the adapter a name, for example the condition and the date")
    if not condition.strip():
        raise CaseError("name the condition the adapter tells apart, then adapt again")
    support = adaptation.support
    meta: dict[str, Any] = {
        "format": ADAPTER_FORMAT,
        "classes": list(support.classes),
        "case_names": list(support.names),
        "case_modalities": list(support.modalities),
        "mode": adaptation.mode,
        "base_version": adaptation.base_version,
        "adapt_config": AdaptConfig(mode=adaptation.mode).to_dict(),
    }
    if adaptation.known is not None:
        meta[KNOWN_KEY] = adaptation.known.to_json()

    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        tensors = {
            IMAGES_KEY: torch.from_numpy(np.ascontiguousarray(support.images)),
            LABELS_KEY: torch.from_numpy(support.labels),
        }
        save_file(tensors, str(folder / SUPPORT_FILE))
        (folder / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True))

    score = adaptation.reliability
    return Registry.open(registry).publish(
        write,
        kind="adapter",
        name=name.strip(),
        parent=adaptation.base_version,
        metrics=(
            {
                "loo_accuracy": score.accuracy,
                "loo_right": score.right,
                "loo_cases": score.cases,
                "temperature": score.temperature,
            }
            if score
            else {}
        ),
        info={
            "condition": condition.strip(),
            "classes": list(support.classes),
            "cases_per_class": support.counts(),
            "mode": adaptation.mode,
            "author": author,
            **(
                {"federation_prototypes": adaptation.known.names()}
                if adaptation.known is not None
                else {}
            ),
        },
    )


def load_adapter(registry: Path, version: int) -> tuple[Adaptation, LoadedModel]:
    """Rebuild a saved adapter: load its base version and adapt it to the saved cases again.

    Raises:
        RegistryError: no such adapter, a missing base version, or unreadable adapter files.
    """
    reg = Registry.open(registry)
    entry = reg.get(version)
    if entry.kind != "adapter" or entry.parent is None:
        raise RegistryError(f"registry version {version} is not an adapter")
    try:
        meta = json.loads((entry.path / ADAPTER_JSON).read_text())
        tensors = load_file(str(entry.path / SUPPORT_FILE))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"adapter {entry.label} is unreadable: {exc}") from exc
    model = reg.load_model(entry.parent)
    known = from_saved(meta.get(KNOWN_KEY), reg.get(entry.parent))
    support = SupportSet(
        images=tensors[IMAGES_KEY].numpy(),
        labels=tensors[LABELS_KEY].numpy(),
        classes=tuple(meta["classes"]),
        names=tuple(meta["case_names"]),
        modalities=tuple(meta.get("case_modalities", ())),
    )
    right, cases = entry.metrics.get("loo_right"), entry.metrics.get("loo_cases")
    temperature = entry.metrics.get("temperature")
    stored = (
        isinstance(right, int)
        and isinstance(cases, int)
        and cases > 0
        and isinstance(temperature, int | float)
    )
    # Adapters saved before calibration existed have no temperature: compute it again.
    adaptation = adapt_cases(
        model,
        support,
        mode=meta["mode"],
        base_version=entry.parent,
        with_reliability=not stored,
        condition=str(entry.info.get("condition", "")),
        known=known,
    )
    if stored:
        adaptation.reliability = Reliability(
            right=int(right),  # type: ignore[arg-type]
            cases=int(cases),  # type: ignore[arg-type]
            of=len(support.labels),
            temperature=float(temperature),  # type: ignore[arg-type]
        )
    return adaptation, model


UNSAVED = "unsaved adaptation of this session"


def provenance_for(
    registry: Path, adaptation: Adaptation, *, adapter: RegistryEntry | None, user: str
) -> Provenance:
    """The provenance of predictions made now by ``adaptation`` (saved as ``adapter``, or not).

    A base version missing from the registry is named by its id, with an unknown privacy status.
    """
    try:
        base = Registry.open(registry).get(adaptation.base_version)
    except RegistryError:
        base_label, privacy = f"v{adaptation.base_version}", "unknown: version not in registry"
    else:
        base_label, privacy = base.label, epsilon_label(base)
    if adaptation.known is not None:
        privacy += (
            f"; with the federation's DP prototypes of {', '.join(adaptation.known.names())} "
            f"({adaptation.known.release.cost()})"
        )
    return Provenance(
        adapter=adapter.label if adapter is not None else UNSAVED,
        adapter_version=adapter.id if adapter is not None else None,
        base_model=base_label,
        base_privacy=privacy,
        condition=adaptation.condition,
        user=user,
        time=utc_now(),
        reliability=reliability_text(adaptation),
    )
