"""Global model versions: a model state's digest, the network it fills, and its registry entry
(written once per distinct state, by the server and by every node that receives it)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from federation.errors import ModelMismatchError
from federation.plan import RoundPlan
from models.feature_adapter import AdaptedEncoder, share_encoder
from models.model_dir import save_model_dir
from models.networks import build_backbone
from models.pipeline import PipelineConfig
from models.registry import Registry, RegistryEntry
from privacy.prototype_release import PROTOTYPES_FILE, PrototypeRelease

DIGEST_KEY = "model-sha256"  # registry info key naming a version's state
PROTOTYPES_DIGEST_KEY = "prototypes-sha256"  # ... and the prototype release kept with it


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of a model state."""
    h = hashlib.sha256()
    for name in sorted(state):
        array = np.ascontiguousarray(state[name])
        h.update(f"{name}|{array.shape}|{array.dtype}|".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def model_from_state(state: Mapping[str, np.ndarray], plan: RoundPlan) -> torch.nn.Module:
    """The plan's network with ``state`` loaded (copied: the arrays may be read-only).

    Raises:
        ModelMismatchError: the state's names or shapes do not fit the plan's network.
    """
    model = build_backbone(plan.backbone)
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:  # torch's only signal of missing, unexpected or reshaped keys
        raise ModelMismatchError(
            f"the global model does not fit the plan's {plan.backbone.name} network: {exc}"
        ) from exc
    return share_encoder(model) if isinstance(model, AdaptedEncoder) else model


def publish_state(
    registry: Registry,
    state: Mapping[str, np.ndarray],
    plan: RoundPlan,
    *,
    name: str,
    extra: dict[str, Any],
    info: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
    prototypes: PrototypeRelease | None = None,
) -> RegistryEntry:
    """Register ``state`` as a global model directory, unless the registry already holds it.

    ``prototypes`` (a dp-prototypes round's summed release) is kept beside the weights as
    ``prototypes.safetensors``; the same weights with another release are a new version.
    """
    digest = state_digest(state)
    released = prototypes.digest() if prototypes is not None else None
    for entry in registry.entries(kind="global"):
        if (
            entry.info.get(DIGEST_KEY) == digest
            and entry.info.get(PROTOTYPES_DIGEST_KEY) == released
        ):
            return entry
    model = model_from_state(state, plan)

    def write(folder: Path) -> None:
        save_model_dir(
            folder,
            model,
            backbone=plan.backbone,
            pipeline=PipelineConfig(image_size=plan.backbone.image_size),
            meta=plan.meta,
            extra=extra,
        )
        if prototypes is not None:
            prototypes.save(folder / PROTOTYPES_FILE)

    kept = {PROTOTYPES_DIGEST_KEY: released} if released is not None else {}
    return registry.publish(
        write,
        kind="global",
        name=name,
        metrics=metrics,
        privacy=privacy,
        info={**info, DIGEST_KEY: digest, **kept},
    )
