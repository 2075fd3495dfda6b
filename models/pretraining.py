"""Supervised pre-training baseline: a backbone trained as an ordinary classifier over the union of
the training classes, then adapted to new classes like a meta-trained one.

Chen et al. 2019 ("A Closer Look at Few-shot Classification") and Tian et al. 2020 ("Rethinking
Few-Shot Image Classification: a Good Embedding Is All You Need?") show that such a baseline,
followed by fine-tuning or a prototype head, matches or beats meta-learning, above all across
domains; the cross-domain benchmark therefore reports it beside every meta-learner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.augment import augment_batch
from models.catalogue import Catalogue
from models.errors import DataError
from models.imageset import ImageSet
from models.meta import MetaConfig, cross_entropy
from models.model_dir import save_model_dir
from models.networks import BackboneConfig
from models.pipeline import PipelineConfig
from models.self_supervised import ContrastiveConfig, contrastive_train
from models.training import TrainConfig, meta_train, optimizer_step
from models.weights import start_backbone


@dataclass(frozen=True)
class PretrainConfig:
    """Schedule of supervised pre-training."""

    steps: int = 1500  # the full benchmark profile gives the meta-learners as many steps
    batch_size: int = 64  # about the images of one 5-way 5-shot 10-query training episode
    lr: float = 1e-3  # Adam, as for meta-training
    seed: int = 0  # initialisation of the head, batch draws and augmentation
    augment: bool = True  # the same MONAI-equivalent augmentations as meta-training

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PretrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"PretrainConfig.lr must be > 0, got {self.lr!r}")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with every benchmark result."""
        return asdict(self)


def _class_offsets(sets: Sequence[ImageSet]) -> np.ndarray:
    """First global label of each set: the union's labels are ``offset[set] + local label``."""
    sizes = [len(s.classes) for s in sets]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def supervised_pretrain(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    config: PretrainConfig = PretrainConfig(),
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place as a classifier over every class of every set.

    A temporary linear head maps the backbone's ``out_features`` to the union of the sets'
    classes (labels offset per set, so equal class names of two sets stay distinct); batches are
    drawn uniformly over all images, augmented, and trained with cross-entropy and Adam. The head
    is discarded: only the embedding is kept, as in Chen et al. 2019 (Baseline) and
    Tian et al. 2020.

    Args:
        model: the backbone (attribute ``out_features``); its device is used for every batch.
        sets: the training sets.
        config: steps, batch size, learning rate, seed and augmentation.
        on_step: called with ``(step, loss)`` after each optimiser step.

    Returns:
        The loss of every step.

    Raises:
        DataError: no set holds an image.
        FloatingPointError: the loss became NaN or infinite.
    """
    sizes = np.array([len(s) for s in sets], dtype=np.int64)
    if len(sets) == 0 or sizes.sum() == 0:
        raise DataError(f"supervised_pretrain needs images, got {len(sets)} sets of sizes {sizes}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = next(model.parameters()).device
    offsets = _class_offsets(sets)
    n_classes = int(sum(len(s.classes) for s in sets))
    head = nn.Linear(int(model.out_features), n_classes).to(device)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=config.lr)
    owner = np.repeat(np.arange(len(sets)), sizes)  # set of each global image index
    local = np.concatenate([np.arange(n) for n in sizes])  # index inside its set
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for step in range(config.steps):
            pick = rng.integers(len(owner), size=config.batch_size)
            x = torch.from_numpy(
                np.stack([sets[owner[i]].images[local[i]] for i in pick])
            )  # per-set gather: sets may differ in source but share the pipeline's shape
            y = torch.from_numpy(
                np.array([offsets[owner[i]] + sets[owner[i]].labels[local[i]] for i in pick])
            )
            if config.augment:  # on the CPU: augment_batch draws from a CPU generator
                x = augment_batch(x, seed=int(rng.integers(2**31)))
            optimizer.zero_grad()
            loss = cross_entropy(head(model(x.to(device))), y.to(device))
            value = optimizer_step(loss, optimizer, step=step, what="pre-training")
            losses.append(value)
            if on_step is not None:
                on_step(step, value)
    finally:
        model.train(was_training)
    return losses


@dataclass(frozen=True)
class Objective:
    """One pre-training objective of ``fedfew pretrain``: its trainer and default length."""

    train: Callable[..., list[float]]  # (model, sets, *, steps, seed, on_step) -> losses
    default_steps: int  # about 5 minutes of Conv-4 on 2 cores
    uses_labels: bool
    description: str


def _supervised(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    steps: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    config = PretrainConfig(steps=steps, seed=seed)
    return supervised_pretrain(model, sets, config=config, on_step=on_step)


def _protonet(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    steps: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    config = TrainConfig(steps=steps, seed=seed)
    return meta_train(model, sets, config=config, meta=MetaConfig("protonet"), on_step=on_step)


def _self_supervised(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    steps: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    images = np.concatenate([s.images for s in sets])  # labels are never read
    config = ContrastiveConfig(steps=steps, seed=seed)
    return contrastive_train(model, images, config=config, on_step=on_step)


# name -> pre-training objective; a new objective is one new entry.
PRETRAIN_OBJECTIVES: Catalogue[Objective] = Catalogue(
    "pre-training objective",
    {
        "supervised": Objective(
            _supervised, 1500, True, "classifier over every class of the sets (Chen et al. 2019)"
        ),
        "protonet": Objective(_protonet, 300, True, "episodic ProtoNet meta-training"),
        "self-supervised": Objective(
            _self_supervised, 300, False, "SimCLR on the images, labels ignored (Chen et al. 2020)"
        ),
    },
)


def write_pretrained(
    out: Path,
    sets: Sequence[ImageSet],
    *,
    objective: str,
    backbone: BackboneConfig,
    steps: int | None = None,
    seed: int = 0,
    weights: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Pre-train a backbone on public sets with a registered objective and write it as a model
    directory (the operator's non-private step: `fedfew pretrain`, the demo's public start).

    Raises:
        ValueError: ``objective`` is not in :data:`PRETRAIN_OBJECTIVES`.
        WeightsError: the weights file cannot start this backbone.
    """
    if objective not in PRETRAIN_OBJECTIVES:
        raise ValueError(
            f"unknown objective {objective!r}: use one of {', '.join(PRETRAIN_OBJECTIVES)}"
        )
    spec = PRETRAIN_OBJECTIVES[objective]
    total = steps or spec.default_steps
    torch.manual_seed(seed)
    started = start_backbone(backbone, weights=weights)
    losses = spec.train(started.model, sets, steps=total, seed=seed, on_step=on_step)
    extra = {
        "pretrain": {"objective": objective, "steps": total, "seed": seed},
        "data": [s.name for s in sets],
        "private": False,
        "final_loss": float(np.mean(losses[-50:])),
    }
    save_model_dir(
        out,
        started.model,
        backbone=started.config,
        pipeline=PipelineConfig(image_size=backbone.image_size),
        meta=MetaConfig(),
        extra=extra,
        weights=started.weights,
    )
    return out
