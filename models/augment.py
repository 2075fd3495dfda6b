"""Training augmentations of the shared pipeline: MONAI random dictionary transforms (per image)
and a vectorised batch version with the same distributions (used by every trainer).

The MONAI transforms are the reference: ``augment_batch`` replaces them in training because they
cost milliseconds per image, and a test recovers the flips, turns, gamma, shift and noise each one
drew and checks that both follow the same distributions (tests/models/test_pipeline.py)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)

# Training augmentations: one table shared by the MONAI dict transforms and the batch version.
AUG_FLIP_PROB = 0.5  # anatomy has no canonical left/right in crops and lesion patches
AUG_ROT90_PROB = 0.5  # then k uniform in 1..3; 90-degree steps keep the square grid exact
AUG_CONTRAST_PROB = 0.5
AUG_GAMMA = (0.8, 1.25)  # mild gamma: scanner/stain contrast differs between sites
AUG_SHIFT_PROB = 0.5
AUG_SHIFT = 0.05  # +-5 % of the [0, 1] range: exposure differences
AUG_NOISE_PROB = 0.5
AUG_NOISE_STD = 0.02  # std drawn in [0, 0.02]: sensor noise, small against lesion contrast


def random_transforms(keys: KeysCollection) -> list[Any]:
    """MONAI random dictionary transforms for training (per image), ending with a clip to [0, 1]."""
    return [
        RandFlipd(keys, prob=AUG_FLIP_PROB, spatial_axis=0),
        RandFlipd(keys, prob=AUG_FLIP_PROB, spatial_axis=1),
        RandRotate90d(keys, prob=AUG_ROT90_PROB, max_k=3),
        RandAdjustContrastd(keys, prob=AUG_CONTRAST_PROB, gamma=AUG_GAMMA),
        RandShiftIntensityd(keys, prob=AUG_SHIFT_PROB, offsets=AUG_SHIFT),
        RandGaussianNoised(keys, prob=AUG_NOISE_PROB, std=AUG_NOISE_STD),
        ScaleIntensityRanged(keys, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
    ]


def augment_batch(images: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Apply the training augmentations to a batch, independently per image, in torch.

    The same distributions as :func:`random_transforms` (flips, 90-degree rotations, gamma contrast
    as in MONAI ``AdjustContrast``, intensity shift, Gaussian noise with std drawn in [0, max]),
    drawn from one seeded generator so a batch and seed always give the same result. Vectorised
    because MONAI's per-image random transforms cost milliseconds per 64x64 image.

    Args:
        images: float tensor ``(B, C, S, S)`` in [0, 1] (square: rotations keep the shape).
        seed: seed of the random draws.

    Returns:
        Augmented float tensor of the same shape, clipped to [0, 1]; the input is not modified.
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"augment_batch: expected a square batch (B, C, S, S), got {tuple(images.shape)}"
        )
    b, c, side = images.shape[0], images.shape[1], images.shape[-1]
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(b, 7, generator=g)
    turns = torch.randint(1, 4, (b,), generator=g)
    std = torch.rand(b, generator=g) * AUG_NOISE_STD
    std = torch.where(torch.rand(b, generator=g) < AUG_NOISE_PROB, std, 0.0)
    gamma = AUG_GAMMA[0] + u[:, 3] * (AUG_GAMMA[1] - AUG_GAMMA[0])
    gamma = torch.where(u[:, 4] < AUG_CONTRAST_PROB, gamma, 1.0)
    shift = torch.where(u[:, 5] < AUG_SHIFT_PROB, (u[:, 6] * 2.0 - 1.0) * AUG_SHIFT, 0.0)
    # Flips and 90-degree turns compose to one of 8 pixel permutations: one gather per batch.
    elem = (
        (u[:, 0] < AUG_FLIP_PROB).long()
        + 2 * (u[:, 1] < AUG_FLIP_PROB).long()
        + 8 * torch.where(u[:, 2] < AUG_ROT90_PROB, turns, 0)
    )
    index = _dihedral_index(side)[elem].unsqueeze(1).expand(b, c, side * side)
    x = images.float().reshape(b, c, side * side).gather(2, index).view(b, c, side, side)
    col = (b, 1, 1, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
    # MONAI AdjustContrast: ((x - min) / (range + 1e-7)) ** gamma * range + min; gamma 1 = off.
    x = x.sub_(lo).div_(span + 1e-7).pow_(gamma.view(col)).mul_(span).add_(lo + shift.view(col))
    x.addcmul_(torch.randn(x.shape, generator=g), std.view(col))
    return x.clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=8)
def _dihedral_index(side: int) -> torch.Tensor:
    """Pixel permutations ``(32, side**2)``: bit 0 flips rows, bit 1 columns, bits 3-4 turns."""
    grid = torch.arange(side * side).view(side, side)
    table = torch.zeros(32, side * side, dtype=torch.long)
    for code in range(32):
        m = grid
        if code & 1:
            m = m.flip(0)
        if code & 2:
            m = m.flip(1)
        m = torch.rot90(m, code >> 3, dims=(0, 1))
        table[code] = m.reshape(-1)
    return table
