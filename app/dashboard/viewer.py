"""Pixels for the image viewer: a DICOM image at native resolution, window/level to 8 bits, and
zoom by cropping. The classifier never sees these pixels (it reads the same files through the
MONAI pipeline); they are only for the clinician's eyes.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from app.dashboard.errors import DashboardError

ZOOMS = (1, 2, 4, 8)  # integer factors: each image pixel becomes a whole block of screen pixels
MIN_WIDTH = 1.0  # PS3.3 C.11.2.1.2: Window Width >= 1


class ViewerError(DashboardError):
    """A file cannot be shown in the viewer (not DICOM, or no pixels)."""


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): values around ``center`` over ``width`` map to grey."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width >= MIN_WIDTH:
            raise ValueError(f"Window.width must be >= {MIN_WIDTH}, got {self.width!r}")


@dataclass(frozen=True)
class ViewerImage:
    """One image as stored: modality values (after Rescale Slope/Intercept), the window the file
    suggests (or one spanning the pixel range), and whether bright means low (MONOCHROME1)."""

    pixels: np.ndarray  # (H, W) or (H, W, 3) float64
    window: Window
    invert: bool = False

    @property
    def value_range(self) -> tuple[float, float]:
        """The lowest and highest pixel value."""
        return float(self.pixels.min()), float(self.pixels.max())


def range_window(pixels: np.ndarray) -> Window:
    """The window that spans the pixel range exactly (for files that suggest none)."""
    low, high = float(np.min(pixels)), float(np.max(pixels))
    width = max(high - low + 1.0, MIN_WIDTH)  # +1: the linear function maps [c-w/2, c+w/2)
    return Window(center=low + (width - 1.0) / 2.0 + 0.5, width=width)


def _first(value: object) -> float | None:
    """The first of a possibly multi-valued DICOM number (WindowCenter may hold several)."""
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        value = next(iter(value), None)
    if value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_image(data: bytes) -> ViewerImage:
    """The first frame of a DICOM file as modality values, with its suggested window.

    Raises:
        ViewerError: not a DICOM file, or one without readable pixels.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        pixels = ds.pixel_array
    except (InvalidDicomError, AttributeError, ValueError, RuntimeError) as exc:
        raise ViewerError(
            "the viewer shows DICOM images with pixel data; this file is not one"
        ) from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[0]
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= MIN_WIDTH:
        window = Window(center=center, width=width)
    else:
        window = range_window(values)
    invert = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
    return ViewerImage(pixels=values, window=window, invert=invert)


def apply_window(pixels: np.ndarray, *, window: Window, invert: bool = False) -> np.ndarray:
    """Map values to 8-bit grey with DICOM's linear VOI function (PS3.3 C.11.2.1.2.1):
    below ``c - 0.5 - (w-1)/2`` black, above ``c - 0.5 + (w-1)/2`` white, linear between.

    Args:
        pixels: modality values, any shape.
        window: centre and width.
        invert: MONOCHROME1 (low values bright).

    Returns:
        uint8 array of the same shape.
    """
    c, w = window.center, window.width
    x = np.asarray(pixels, dtype=np.float64)
    if w <= MIN_WIDTH:  # a threshold: the linear part has no extent
        out = np.where(x > c - 0.5, 255.0, 0.0)
    else:
        out = ((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0
    grey = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return 255 - grey if invert else grey


def zoom_crop(
    image: np.ndarray, *, zoom: int, center: tuple[float, float] = (0.5, 0.5)
) -> np.ndarray:
    """The part of ``image`` a ``zoom``-times magnification shows, each pixel repeated
    ``zoom`` times along both axes (no interpolation: the clinician sees the stored pixels).

    Args:
        image: (H, W) or (H, W, C).
        zoom: an integer factor >= 1; 1 returns the image unchanged.
        center: where to look, as fractions of height and width (0.5, 0.5: the middle); the
            crop is moved inside the image rather than padded.

    Raises:
        ValueError: a zoom below 1 or a centre outside [0, 1].
    """
    if not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"zoom must be an integer >= 1, got {zoom!r}")
    if not all(0.0 <= f <= 1.0 for f in center):
        raise ValueError(f"center must be fractions in [0, 1], got {center!r}")
    if zoom == 1:
        return image
    height, width = image.shape[:2]
    crop_h, crop_w = max(1, math.ceil(height / zoom)), max(1, math.ceil(width / zoom))
    top = min(max(round(center[0] * height - crop_h / 2), 0), height - crop_h)
    left = min(max(round(center[1] * width - crop_w / 2), 0), width - crop_w)
    crop = image[top : top + crop_h, left : left + crop_w]
    return np.repeat(np.repeat(crop, zoom, axis=0), zoom, axis=1)
