"""Self-supervised learning on images without labels: SimCLR's contrastive objective (Chen et al.
2020), optionally with feature distillation from a frozen teacher (the source model), as STARTUP
(Phoo & Hariharan, ICLR 2021) keeps the source's knowledge while adapting to a new modality.

Used by ``fedfew pretrain --objective self-supervised`` (the operator's public data) and by
``fedfew adapt-domain`` (a hospital's own unlabelled images, which never leave it).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import DataError


@dataclass(frozen=True)
class ContrastiveConfig:
    """Schedule of contrastive training (SimCLR defaults scaled to a CPU and small pools)."""

    steps: int = 300  # about 5 minutes for Conv-4 on 2 cores at batch 64
    batch_size: int = 64  # images per step (two views each); SimCLR wants large, CPUs do not
    lr: float = 1e-3  # Adam, as for every trainer here
    temperature: float = 0.2  # NT-Xent temperature; small batches favour a low one
    projection_dim: int = 64  # projection head output, discarded after training
    distill_weight: float = 0.0  # weight of the teacher feature distillation (0: pure SimCLR)
    crop_scale: tuple[float, float] = (0.35, 1.0)  # area fraction of the random crops
    seed: int = 0  # head initialisation, batches and augmentation
    max_seconds: float | None = None  # stop early when this wall-clock budget is spent

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ContrastiveConfig.{name} must be an integer >= 1, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"ContrastiveConfig.batch_size must be >= 2, got {self.batch_size}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ContrastiveConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.distill_weight < 0:
            raise ValueError(
                f"ContrastiveConfig.distill_weight must be >= 0, got {self.distill_weight}"
            )
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"ContrastiveConfig.crop_scale must be 0 < a <= b <= 1, got {low, high}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"ContrastiveConfig.max_seconds must be > 0, got {self.max_seconds}")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with every model it trains."""
        return asdict(self)


def contrastive_views(
    images: torch.Tensor, *, generator: torch.Generator, crop_scale: tuple[float, float]
) -> torch.Tensor:
    """One random view per image: a resized crop, flips and a quarter turn, then brightness,
    contrast and saturation jitter (SimCLR's augmentations without colour-specific hue, which
    stains and scanners do not vary freely). Vectorised over the batch.

    Args:
        images: ``(B, C, S, S)`` in [0, 1].
        generator: source of every random draw.
        crop_scale: range of the crop's area fraction.
    """
    b = images.shape[0]
    u = torch.rand(b, 8, generator=generator)
    area = crop_scale[0] + u[:, 0] * (crop_scale[1] - crop_scale[0])
    side = area.sqrt()
    tx = (u[:, 1] * 2 - 1) * (1 - side)
    ty = (u[:, 2] * 2 - 1) * (1 - side)
    sx = torch.where(u[:, 3] < 0.5, -side, side)
    sy = torch.where(u[:, 4] < 0.5, -side, side)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, tx, ty
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
    x = torch.where((u[:, 5] < 0.5).view(b, 1, 1, 1), x.transpose(-1, -2), x)
    col = (b, 1, 1, 1)
    brightness = 1 + (u[:, 6] * 2 - 1).view(col) * 0.4
    jitter = torch.rand(b, 2, generator=generator)
    contrast = 1 + (jitter[:, 0] * 2 - 1).view(col) * 0.4
    saturation = 1 + (jitter[:, 1] * 2 - 1).view(col) * 0.4
    x = x * brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * saturation + grey
    return x.clamp(0.0, 1.0)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy (Chen et al. 2020, eq. 1): each view must
    pick its partner among the other ``2B - 1`` views of the batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -1e9)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def projection_head(in_features: int, out_features: int) -> nn.Module:
    """SimCLR's two-layer projection head (trained with the encoder, then discarded)."""
    return nn.Sequential(
        nn.Linear(in_features, in_features),
        nn.ReLU(),
        nn.Linear(in_features, out_features),
    )


def contrastive_train(
    model: nn.Module,
    images: np.ndarray,
    *,
    config: ContrastiveConfig = ContrastiveConfig(),
    parameters: list[nn.Parameter] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place on unlabelled ``images`` with SimCLR (plus distillation).

    Args:
        model: the encoder (attribute ``out_features``); with ``distill_weight > 0`` a frozen copy
            of it as it is now is the teacher whose features the student must keep predicting
            (a linear predictor maps student to teacher features).
        images: ``(N, C, S, S)`` pipeline output; labels are never used.
        config: schedule and objective.
        parameters: the encoder parameters to train (default: all of them).
        on_step: called with ``(step, loss)`` after each step.

    Returns:
        The loss of every step taken.

    Raises:
        DataError: fewer than two images.
        FloatingPointError: the loss became NaN or infinite.
    """
    if len(images) < 2:
        raise DataError(f"self-supervised training needs >= 2 images, got {len(images)}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device
    dim = int(model.out_features)  # type: ignore[arg-type]
    head = projection_head(dim, config.projection_dim).to(device)
    teacher = predictor = None
    trained = list(model.parameters()) if parameters is None else parameters
    extra = list(head.parameters())
    if config.distill_weight > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        predictor = nn.Linear(dim, dim).to(device)
        extra += list(predictor.parameters())
    optimizer = torch.optim.Adam([*trained, *extra], lr=config.lr)
    batch = min(config.batch_size, len(images))
    was_training = model.training
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    try:
        for step in range(config.steps):
            if (
                config.max_seconds is not None
                and time.perf_counter() - started > config.max_seconds
            ):
                break
            pick = rng.choice(len(images), size=batch, replace=False)
            x = torch.from_numpy(images[pick])
            v1 = contrastive_views(x, generator=generator, crop_scale=config.crop_scale)
            v2 = contrastive_views(x, generator=generator, crop_scale=config.crop_scale)
            f = model(torch.cat([v1, v2]).to(device))
            z = head(f)
            loss = nt_xent(z[:batch], z[batch:], temperature=config.temperature)
            if teacher is not None and predictor is not None:
                with torch.no_grad():
                    target = teacher(torch.cat([v1, v2]).to(device))
                loss = loss + config.distill_weight * _distillation(predictor(f), target)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"self-supervised loss is {loss.item()} at step {step}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        model.train(was_training)
    return losses


def _distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cosine distance between predicted and teacher features (scale-free, as in BYOL)."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
