"""A model directory: weights (safetensors), resolved config and pipeline config, side by side."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.errors import ModelDirError
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.version import code_version
from models.weights import RECORD_KEY, WeightsRecord

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
PIPELINE = "pipeline.json"
DOMAIN = "domain.safetensors"  # optional: the modality's feature statistics (adapt-domain)
DOMAIN_MEAN_KEY = "feature_mean"


@dataclass(frozen=True)
class LoadedModel:
    """A backbone ready for adaptation, with the configs it was trained under."""

    model: nn.Module
    backbone: BackboneConfig
    pipeline: PipelineConfig
    meta: MetaConfig
    config: dict[str, Any]
    domain_mean: torch.Tensor | None = None  # mean feature of the modality, for centring


def save_model_dir(
    path: Path,
    model: nn.Module,
    *,
    backbone: BackboneConfig,
    pipeline: PipelineConfig,
    meta: MetaConfig,
    extra: dict[str, Any] | None = None,
    domain_mean: torch.Tensor | None = None,
    weights: WeightsRecord | None = None,
) -> Path:
    """Write a model directory atomically (a crash leaves either the old one or none).

    ``domain_mean`` (the mean feature of the modality's images, from ``fedfew adapt-domain``) is
    kept beside the weights and used for centring at adaptation time. ``weights`` records the
    public weights file the backbone started from (name and SHA-256; ``models.weights``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "backbone": backbone.to_dict(),
        "meta": meta.to_dict(),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    if weights is not None:
        config[RECORD_KEY] = weights.to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS))
    if domain_mean is not None:
        save_file({DOMAIN_MEAN_KEY: domain_mean.detach().contiguous()}, str(tmp / DOMAIN))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    (tmp / PIPELINE).write_text(json.dumps(pipeline.to_dict(), indent=2, sort_keys=True))
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        os.replace(tmp, path)
    return path


def load_model_dir(path: Path) -> LoadedModel:
    """Load a model directory written by :func:`save_model_dir`.

    Raises:
        ModelDirError: missing files, unreadable JSON, or weights that do not fit the config.
    """
    path = Path(path)
    missing = [f for f in (WEIGHTS, CONFIG, PIPELINE) if not (path / f).is_file()]
    if missing:
        raise ModelDirError(f"{path} is not a fedfew model directory: missing {', '.join(missing)}")
    try:
        config = json.loads((path / CONFIG).read_text())
        pipeline = PipelineConfig.from_dict(json.loads((path / PIPELINE).read_text()))
        backbone = BackboneConfig(**config["backbone"])
        meta = MetaConfig(**config["meta"])
        model = build_backbone(backbone)
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        domain = path / DOMAIN
        domain_mean = load_file(str(domain))[DOMAIN_MEAN_KEY] if domain.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelDirError(f"{path}: cannot load model ({type(exc).__name__}: {exc})") from exc
    model.eval()
    return LoadedModel(
        model=model,
        backbone=backbone,
        pipeline=pipeline,
        meta=meta,
        config=config,
        domain_mean=domain_mean,
    )
