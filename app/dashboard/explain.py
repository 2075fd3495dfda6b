"""Explanation images: which parts of a case the prediction depends on, by occlusion.

Occlusion sensitivity (Zeiler & Fergus 2014, "Visualizing and understanding convolutional
networks", section 4.2): grey out one patch at a time and record how much the probability of the
predicted class drops. Model-agnostic, so it explains every adaptation mode alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# A patch of 1/8 of the side covers a lesion-sized region at 64 px (8 px). Patches tile the image
# (stride = patch: 64 forward passes, ~0.5 s on 2 cores for Conv-4 at 64 px; half-patch strides
# would cost 4x); a box blur of one patch then smooths the block edges of the map.
PATCH_FRACTION = 8
MIN_PATCH = 4
OVERLAY_ALPHA = 0.45  # enough colour to read the map, enough grey to see the anatomy
COLORMAP = "inferno"  # perceptually uniform and readable by colour-blind viewers


def occlusion_map(
    predict_proba: Callable[[torch.Tensor], torch.Tensor],
    image: np.ndarray,
    *,
    target: int,
    patch: int | None = None,
    stride: int | None = None,
) -> np.ndarray:
    """Drop in the probability of ``target`` when each region is hidden.

    Args:
        predict_proba: the adapted classifier's ``(n, C, S, S) -> (n, ways)`` probabilities.
        image: one pipeline output ``(C, S, S)``.
        target: the class whose evidence is mapped (usually the predicted one).
        patch: side of the hidden square (default: 1/8 of the image side, at least 4 pixels).
        stride: step between patches (default: one patch, so patches tile the image).

    Returns:
        ``(S, S)`` float map in [0, 1]: 1 where hiding the region removes the most evidence,
        0 where hiding changes nothing or raises the probability.

    Raises:
        ValueError: an image that is not ``(C, S, S)``, or a patch or stride out of range.
    """
    if image.ndim != 3:
        raise ValueError(f"occlusion_map: image must be (C, S, S), got shape {image.shape}")
    _, height, width = image.shape
    patch = patch or max(MIN_PATCH, min(height, width) // PATCH_FRACTION)
    stride = stride or patch
    if not 0 < patch <= min(height, width) or stride < 1:
        raise ValueError(
            f"occlusion_map: patch {patch} and stride {stride} do not fit {height}x{width}"
        )
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    fill = x.mean(dim=(1, 2), keepdim=True)
    corners = [
        (top, left)
        for top in range(0, height - patch + 1, stride)
        for left in range(0, width - patch + 1, stride)
    ]
    batch = x.repeat(len(corners), 1, 1, 1)
    for k, (top, left) in enumerate(corners):
        batch[k, :, top : top + patch, left : left + patch] = fill
    base = float(predict_proba(x[None])[0, target])
    drops = (base - predict_proba(batch)[:, target]).numpy()
    heat = np.zeros((height, width), dtype=np.float64)
    cover = np.zeros((height, width), dtype=np.float64)
    for drop, (top, left) in zip(drops, corners, strict=True):
        heat[top : top + patch, left : left + patch] += drop
        cover[top : top + patch, left : left + patch] += 1
    heat = np.where(cover > 0, heat / np.maximum(cover, 1), 0.0).clip(min=0.0)
    heat = _box_blur(heat, patch)
    peak = heat.max()
    return (heat / peak if peak > 0 else heat).astype(np.float32)


def _box_blur(heat: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size`` x ``size`` window (odd, centred), edges averaging what they cover."""
    k = size | 1
    x = torch.from_numpy(heat)[None, None].float()
    blurred = torch.nn.functional.avg_pool2d(
        x, k, stride=1, padding=k // 2, count_include_pad=False
    )
    return blurred[0, 0].numpy().astype(np.float64)


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The case in grey with the map in colour on top, as 8-bit ``(S, S, 3)``.

    Args:
        image: pipeline output ``(C, S, S)`` in [0, 1].
        heat: ``(S, S)`` map in [0, 1] from :func:`occlusion_map`.
        alpha: weight of the colour map where the map is 1 (it fades to 0 with the map).
    """
    from matplotlib import colormaps

    grey = np.clip(np.asarray(image, dtype=np.float32).mean(axis=0), 0.0, 1.0)
    colour = colormaps[COLORMAP](np.clip(heat, 0.0, 1.0))[..., :3]
    weight = alpha * np.clip(heat, 0.0, 1.0)[..., None]
    mixed = (1.0 - weight) * grey[..., None] + weight * colour
    return np.round(mixed * 255).astype(np.uint8)


def colour_scale(*, width: int = 256, height: int = 12) -> np.ndarray:
    """The overlay's colour scale as an 8-bit ``(height, width, 3)`` strip, from no evidence
    (left, the plain grey image) to the strongest evidence on the case (right)."""
    from matplotlib import colormaps

    ramp = np.linspace(0.0, 1.0, width)
    colour = colormaps[COLORMAP](ramp)[..., :3]
    mixed = (1.0 - OVERLAY_ALPHA * ramp[:, None]) * 0.5 + OVERLAY_ALPHA * ramp[:, None] * colour
    return np.round(np.repeat(mixed[None], height, axis=0) * 255).astype(np.uint8)
