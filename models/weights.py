"""Public weights from a local file (safetensors or a torch state dict), loaded into a backbone.

The operator brings the file (ImageNet, RadImageNet, a self-supervised checkpoint); nothing is
downloaded. Keys are matched up to the wrappers that training code adds (``module.`` from
DataParallel, ``backbone.``/``encoder.``/``model.`` from self-supervised and classifier
wrappers), a source classifier (``fc.``, ``head.``, ...) is left out, and the file's SHA-256 is
recorded (:class:`WeightsRecord`) in the model directory's ``config.json``.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from models.errors import WeightsError
from models.feature_adapter import encoder_of
from models.networks import BackboneConfig, build_backbone
from models.public_backbones import BATCHNORM_BACKBONES

log = logging.getLogger(__name__)

# Prefixes that wrappers put before a backbone's own keys; stripped, repeatedly, on both sides.
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "net.")
# A source classifier's keys: never part of an embedding backbone, so left out, not "unexpected".
CLASSIFIER_PREFIXES = ("fc.", "_fc.", "head.", "heads.", "classifier.", "classification_head.")
# Checkpoint dicts that hold the state dict under one of these keys (PyTorch Lightning, timm, ...).
NESTED_STATE_KEYS = ("state_dict", "model", "model_state_dict", "teacher", "student")
# BatchNorm bookkeeping that does not affect a frozen layer's output.
IGNORED_SUFFIXES = ("num_batches_tracked",)
BATCHNORM_STATS = ("running_mean", "running_var")
SAFETENSORS_SUFFIX = ".safetensors"
RECORD_KEY = "weights"  # the record's key in a model directory's config.json


@dataclass(frozen=True)
class WeightsRecord:
    """Which public weights a backbone started from, saved in the model directory."""

    file: str  # the file's name only: a path may name a site's directories
    sha256: str
    loaded: int  # tensors loaded into the backbone
    missing: tuple[str, ...] = ()  # backbone keys the file did not provide (kept at init)
    unexpected: tuple[str, ...] = ()  # file keys that fit nothing in the backbone
    ignored: tuple[str, ...] = ()  # the source's classifier keys, left out on purpose

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsRecord:
        """Read back :meth:`to_dict`'s form (a model directory's ``config["weights"]``)."""
        return cls(
            file=str(data["file"]),
            sha256=str(data["sha256"]),
            loaded=int(data["loaded"]),
            missing=tuple(data.get("missing", ())),
            unexpected=tuple(data.get("unexpected", ())),
            ignored=tuple(data.get("ignored", ())),
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-able form for ``config.json``."""
        return {
            "file": self.file,
            "sha256": self.sha256,
            "loaded": self.loaded,
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "ignored": list(self.ignored),
        }


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch state dict (``torch.load`` with
    ``weights_only=True``: a pickle that runs code is refused). A checkpoint that nests its state
    dict under ``state_dict``, ``model``, ... is unwrapped; non-tensor entries are dropped.

    Raises:
        WeightsError: the file is missing, unreadable, or holds no tensors.
    """
    path = Path(path)
    try:
        if path.suffix == SAFETENSORS_SUFFIX:
            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise WeightsError(
            f"{path.name}: cannot read weights ({type(exc).__name__}: {exc}); give a "
            ".safetensors file or a torch state dict saved with torch.save(model.state_dict())"
        ) from exc
    while isinstance(obj, dict):
        nested = next((obj[k] for k in NESTED_STATE_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    tensors = (
        {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if isinstance(obj, dict)
        else {}
    )
    if not tensors:
        raise WeightsError(f"{path.name}: holds no named tensors (got {type(obj).__name__})")
    return tensors


def canonical_key(key: str) -> str:
    """``key`` without the wrapper prefixes of :data:`WRAPPER_PREFIXES`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def has_batchnorm_statistics(path: Path) -> bool:
    """Whether a weights file carries BatchNorm running statistics (then the backbone needs
    ``BackboneConfig.norm="batch"``, which keeps them frozen)."""
    return any(k.endswith(BATCHNORM_STATS) for k in read_weights(path))


def load_weights(model: nn.Module, path: Path, *, strict: bool = False) -> WeightsRecord:
    """Load public weights from a local file into ``model`` (in place) and say what was loaded.

    Keys match up to wrapper prefixes on either side (:func:`canonical_key`); the source's
    classifier is ignored; loaded tensors are cast to the backbone's dtype. Build the backbone
    first (``build_backbone``), with ``norm="batch"`` when the file has BatchNorm statistics
    (:func:`has_batchnorm_statistics`). Frozen parameters load like any other.

    Args:
        model: the backbone to fill.
        path: a ``.safetensors`` file or a torch state dict (``.pt``, ``.pth``, ``.bin``, ...).
        strict: also refuse backbone keys the file lacks and file keys that fit nothing.

    Returns:
        The record to save with the model (``save_model_dir(..., weights=record)``).

    Raises:
        WeightsError: unreadable file; no tensor fits; shapes disagree; the file has BatchNorm
            statistics but the backbone has no BatchNorm to hold them; or, with ``strict``,
            any missing or unexpected key.
    """
    path = Path(path)
    source = read_weights(path)
    own = {canonical_key(k): k for k in model.state_dict() if not k.endswith(IGNORED_SUFFIXES)}
    state = model.state_dict()
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    mismatched: list[str] = []
    for key, tensor in source.items():
        name = canonical_key(key)
        if key.endswith(IGNORED_SUFFIXES):
            continue
        if name not in own:
            (ignored if name.startswith(CLASSIFIER_PREFIXES) else unexpected).append(key)
        elif state[own[name]].shape != tensor.shape:
            mismatched.append(
                f"{key}: file {tuple(tensor.shape)}, backbone {tuple(state[own[name]].shape)}"
            )
        else:
            matched[own[name]] = tensor.to(state[own[name]].dtype)
    missing = sorted(set(own.values()) - set(matched))
    if mismatched:
        raise WeightsError(
            f"{path.name}: {len(mismatched)} tensors have the wrong shape for this backbone "
            f"(another architecture or width?): {'; '.join(mismatched[:5])}"
        )
    if not matched:
        raise WeightsError(
            f"{path.name}: no tensor fits this backbone (file keys such as "
            f"{sorted(source)[:3]}, backbone keys such as {sorted(own.values())[:3]}); "
            "is it the weights of another architecture?"
        )
    stats = [k for k in unexpected if k.endswith(BATCHNORM_STATS)]
    if stats:
        raise WeightsError(
            f"{path.name}: holds BatchNorm statistics ({stats[0]}, ...) that this backbone has no "
            "BatchNorm for: build it with norm='batch' (the statistics then stay frozen)"
        )
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{path.name}: strict load: backbone keys missing from the file {missing[:5]} "
            f"({len(missing)}), file keys that fit nothing {unexpected[:5]} ({len(unexpected)})"
        )
    model.load_state_dict(matched, strict=False)
    if missing or unexpected:
        log.warning(
            "%s: loaded %d tensors; %d backbone keys kept at init (%s), %d file keys unused (%s)",
            path.name,
            len(matched),
            len(missing),
            ", ".join(missing[:3]),
            len(unexpected),
            ", ".join(unexpected[:3]),
        )
    return WeightsRecord(
        file=path.name,
        sha256=file_sha256(path),
        loaded=len(matched),
        missing=tuple(missing),
        unexpected=tuple(sorted(unexpected)),
        ignored=tuple(sorted(ignored)),
    )


@dataclass(frozen=True)
class StartedBackbone:
    """A freshly built backbone, the config it was built under, and its weights record."""

    model: nn.Module
    config: BackboneConfig
    weights: WeightsRecord | None = None


def start_backbone(
    config: BackboneConfig, *, weights: Path | None = None, strict: bool = False
) -> StartedBackbone:
    """Build the backbone ``config`` names and, given a local weights file, load it.

    A file with BatchNorm statistics switches a public backbone to ``norm="batch"`` (the
    statistics then stay frozen, models/freezing.py); save ``.config`` and ``.weights`` with the
    model (``save_model_dir(..., backbone=started.config, weights=started.weights)``).

    Raises:
        WeightsError: as :func:`load_weights` (``strict`` as there), or BatchNorm statistics for
            a backbone that has no BatchNorm form (conv4, resnet12, vit_tiny).
    """
    if weights is not None and config.norm != "batch" and has_batchnorm_statistics(weights):
        if config.name not in BATCHNORM_BACKBONES:
            raise WeightsError(
                f"{Path(weights).name}: holds BatchNorm statistics, but {config.name!r} has no "
                f"BatchNorm form; use one of {sorted(BATCHNORM_BACKBONES)}"
            )
        config = replace(config, norm="batch")
    model = build_backbone(config)
    target = encoder_of(model)  # public weights are the encoder's; an adapter starts as identity
    record = load_weights(target, weights, strict=strict) if weights is not None else None
    return StartedBackbone(model=model, config=config, weights=record)
