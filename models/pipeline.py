"""The one MONAI pipeline shared by training, adaptation and inference.

A sample is a dict whose :data:`IMAGE_KEY` holds a file path (PNG, JPEG, DICOM, NIfTI) or an array
(``(H, W)`` grey or ``(H, W, C)`` channel-last). Deterministic steps: read, channel-first, middle
slice of a volume, optional guard, fixed channel count, percentile intensity scaling to [0, 1],
resize to the model's input side. Training appends MONAI random augmentations; batches use the
vectorised twin :func:`augment_batch` (same parameters).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    MapTransform,
    Resize,
    ScaleIntensityRangePercentilesd,
    Transform,
)

from models.augment import random_transforms
from models.errors import DataError
from models.guard import GuardConfig, check_array

__all__ = [
    "IMAGE_KEY",
    "FixChannels",
    "FixChannelsd",
    "GuardArrayd",
    "PipelineConfig",
    "ReadImaged",
    "SliceVolume",
    "SliceVolumed",
    "build_transforms",
    "preprocess_arrays",
]

IMAGE_KEY = "image"  # the one dictionary key every transform of the pipeline works on
RESIZE_MODE = "area"  # anti-aliased when shrinking (scans are larger than a model's input)
# Enlarging (64-px sets to a public encoder's 224 px): smooth, not the blocks area/nearest give.
UPSAMPLE_MODE = "bilinear"


def resize_mode(height: int, width: int, size: int) -> str:
    """The interpolation for resizing an ``height x width`` image to ``size x size``."""
    return UPSAMPLE_MODE if max(height, width) < size else RESIZE_MODE


class ResizeSided(MapTransform):
    """Resize to ``size x size``, averaging areas when shrinking and bilinear when enlarging."""

    def __init__(self, keys: KeysCollection, size: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.size = size

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            h, w = d[key].shape[-2:]
            mode = resize_mode(h, w, self.size)
            d[key] = Resize((self.size, self.size), mode=mode)(d[key])
        return d


@dataclass(frozen=True)
class PipelineConfig:
    """Preprocessing parameters; saved with every model so inference repeats them exactly."""

    # Model input side: 64 px matches the shared benchmark sets and keeps DP-SGD cheap on CPU.
    image_size: int = 64
    # Fixed channel count so grey (repeated x3) and colour (RGBA alpha dropped) modalities mix.
    channels: int = 3
    # Per-image robust window: ignores the 0.5 % darkest/brightest pixels (text, hot pixels),
    # works alike for uint8 photos and 12-bit DICOM / float NIfTI ranges.
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(
                f"PipelineConfig.image_size must be an integer >= 8, got {self.image_size!r}"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"PipelineConfig.channels must be 1 or 3, got {self.channels!r}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                "PipelineConfig.lower_percentile/upper_percentile must satisfy "
                f"0 <= lower < upper <= 100, got {self.lower_percentile!r}, "
                f"{self.upper_percentile!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PipelineConfig:
        """Rebuild a config saved by :meth:`to_dict`; unknown keys fail, missing take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"PipelineConfig.from_dict: unknown keys {unknown}; known keys {sorted(known)}"
            )
        return cls(**dict(d))


def fix_channels(img: torch.Tensor, channels: int, *, axis: int = 0) -> torch.Tensor:
    """Drop an alpha channel, then repeat grey to 3 or average colour to 1 along ``axis``."""
    c = img.shape[axis]
    if c in (2, 4):  # grey+alpha or RGBA: alpha is transparency, not anatomy
        img = img.narrow(axis, 0, c - 1)
        c -= 1
    if c == channels:
        return img
    if c == 1 and channels == 3:
        reps = [1] * img.ndim
        reps[axis] = 3
        return img.repeat(*reps)
    if c == 3 and channels == 1:
        return img.mean(dim=axis, keepdim=True)
    raise ValueError(
        f"FixChannels: cannot map {img.shape[axis]} channels (shape {tuple(img.shape)}) "
        f"to {channels}"
    )


class FixChannels(Transform):
    """Give a channel-first image exactly ``channels`` channels (see :func:`fix_channels`)."""

    def __init__(self, channels: int = 3) -> None:
        self.channels = channels

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return fix_channels(torch.as_tensor(img), self.channels)


class FixChannelsd(MapTransform):
    """Dictionary wrapper of :class:`FixChannels`."""

    def __init__(self, keys: KeysCollection, channels: int = 3, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.fixer = FixChannels(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.fixer(d[key])
        return d


class SliceVolume(Transform):
    """Take one slice of a channel-first volume ``(C, X, Y, Z)``; 2-D images pass unchanged."""

    def __init__(self, index: int | None = None) -> None:
        self.index = index  # None: the middle slice, where the anatomy of interest usually is

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if img.ndim == 3:
            return img
        if img.ndim != 4:
            raise ValueError(
                f"SliceVolume: expected (C, X, Y) or (C, X, Y, Z), got shape {tuple(img.shape)}"
            )
        depth = img.shape[-1]
        index = depth // 2 if self.index is None else self.index
        if not 0 <= index < depth:
            raise ValueError(f"SliceVolume: slice {index} outside a volume of depth {depth}")
        return img[..., index]


class SliceVolumed(MapTransform):
    """Dictionary wrapper of :class:`SliceVolume`."""

    def __init__(
        self, keys: KeysCollection, index: int | None = None, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.slicer = SliceVolume(index)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.slicer(d[key])
        return d


class GuardArrayd(MapTransform):
    """Run :func:`models.guard.check_array` on the decoded image (NaN, constant, size)."""

    def __init__(self, keys: KeysCollection, guard: GuardConfig, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.guard = guard

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            source = str(getattr(img, "meta", {}).get("filename_or_obj", "") or f"array {key!r}")
            check_array(
                np.asarray(img.detach().cpu() if torch.is_tensor(img) else img),
                source=source,
                config=self.guard,
            )
        return d


class _DropLogLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "nvImageCodec is not available" not in record.getMessage()


@contextlib.contextmanager
def _quiet_nvimagecodec() -> Iterator[None]:
    """MONAI probes a GPU DICOM decoder in every LoadImage; on CPU it warns and logs: mute that."""
    logger = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    line_filter = _DropLogLine()
    logger.addFilter(line_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            yield
    finally:
        logger.removeFilter(line_filter)


class ReadImaged(MapTransform):
    """Load a path with MONAI's PIL / pydicom / nibabel readers, or wrap an in-memory array.

    Rows stay first (``reverse_indexing=False`` / ``swap_ij=False``) so a file and the same pixels
    given as a numpy array produce identical tensors. Arrays are ``(H, W)`` or channel-last.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self._loader: LoadImage | None = None

    def _load(self, path: str) -> MetaTensor:
        with _quiet_nvimagecodec():
            if self._loader is None:
                readers = [
                    PILReader(reverse_indexing=False),
                    PydicomReader(swap_ij=False),
                    NibabelReader(),
                ]
                self._loader = LoadImage(reader=readers, image_only=True, dtype=np.float32)
            with warnings.catch_warnings():
                # 2-D radiographs and secondary captures carry no patient orientation tags; we use
                # pixels only, so the identity affine MONAI then falls back to is harmless.
                warnings.filterwarnings("ignore", message="PydicomReader: ImageOrientationPatient")
                return self._loader(path)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, str | os.PathLike):
                d[key] = self._load(os.fspath(value))
                continue
            arr = torch.as_tensor(np.asarray(value), dtype=torch.float32)
            if arr.ndim not in (2, 3):
                raise ValueError(
                    f"ReadImaged: key {key!r} array must be (H, W) or (H, W, C), "
                    f"got {tuple(arr.shape)}"
                )
            channel_dim: Any = "no_channel" if arr.ndim == 2 else -1
            d[key] = MetaTensor(arr, meta={"original_channel_dim": channel_dim})
        return d


def build_transforms(
    config: PipelineConfig,
    *,
    train: bool,
    guard: GuardConfig | None = GuardConfig(),
) -> Compose:
    """Build the pipeline on :data:`IMAGE_KEY`.

    Args:
        config: preprocessing parameters.
        train: append MONAI random augmentations (see :func:`random_transforms`).
        guard: checks on the decoded image (NaN/Inf, constant, size); None skips them.

    Returns:
        A MONAI ``Compose`` mapping ``{"image": path_or_array}`` to a float32 tensor ``(C, S, S)``
        in [0, 1].
    """
    k = [IMAGE_KEY]
    steps: list[Any] = [
        ReadImaged(k),
        EnsureChannelFirstd(k),
        SliceVolumed(k),
    ]
    if guard is not None:
        steps.append(GuardArrayd(k, guard))
    steps += [
        # Channels first: alpha must not enter the percentiles, and the fast path repeats the order.
        FixChannelsd(k, channels=config.channels),
        ScaleIntensityRangePercentilesd(
            k,
            lower=config.lower_percentile,
            upper=config.upper_percentile,
            b_min=0.0,
            b_max=1.0,
            clip=True,
        ),
        ResizeSided(k, config.image_size),
    ]
    if train:
        steps += random_transforms(k)
    steps.append(EnsureTyped(k, data_type="tensor", dtype=torch.float32, track_meta=False))
    return Compose(steps)


_QUANTILE_MAX = 16_000_000  # torch.quantile refuses larger inputs
_MONAI_TORCH_PERCENTILE_MAX = 1_000_000  # above this MONAI's percentile() switches to numpy


def preprocess_arrays(images: np.ndarray, config: PipelineConfig) -> np.ndarray:
    """Apply the deterministic pipeline to a whole array set at once (no guard).

    Numerically the same as ``build_transforms(config, train=False)`` per image, vectorised.

    Args:
        images: ``(N, H, W)`` grey or ``(N, H, W, C)`` channel-last, any real dtype.
        config: preprocessing parameters.

    Returns:
        float32 ``(N, config.channels, S, S)`` in [0, 1].

    Raises:
        DataError: wrong shape, non-numeric dtype or NaN/Inf values.
    """
    arr = np.asarray(images)
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and not 1 <= arr.shape[-1] <= 4):
        raise DataError(
            f"preprocess_arrays: expected (N, H, W) or (N, H, W, C<=4), got {arr.shape}"
        )
    if arr.dtype.kind not in "biuf":
        raise DataError(f"preprocess_arrays: dtype {arr.dtype} is not numeric")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"preprocess_arrays: {int((~np.isfinite(arr)).sum())} NaN/Inf values")
    size = config.image_size
    if len(arr) == 0:
        return np.zeros((0, config.channels, size, size), dtype=np.float32)
    x = torch.as_tensor(arr, dtype=torch.float32)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = fix_channels(x, config.channels, axis=1).contiguous()
    n, c, h, w = x.shape
    rows = x.reshape(n, -1)
    lo, hi = _row_percentiles(rows, config.lower_percentile, config.upper_percentile)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    scaled = ((rows - lo) / safe * 1.0 + 0.0).clamp(0.0, 1.0)  # ScaleIntensityRange's op order
    scaled = torch.where(
        span > 0, scaled, rows - lo
    )  # MONAI's (warned) result for a constant image
    resize = Resize((size, size), mode=resize_mode(h, w, size))
    flat = scaled.reshape(n * c, h, w)
    chunk = max(1, 4096 // max(1, c)) * c  # whole images per chunk bounds the memory of interpolate
    out = torch.cat([torch.as_tensor(resize(flat[i : i + chunk])) for i in range(0, n * c, chunk)])
    return out.reshape(n, c, size, size).numpy().astype(np.float32, copy=False)


def _row_percentiles(
    rows: torch.Tensor, lower: float, upper: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row percentiles computed the way MONAI's ``percentile`` does for one image."""
    per_row = rows.shape[1]
    if per_row > _MONAI_TORCH_PERCENTILE_MAX:
        q = np.percentile(rows.numpy(), [lower, upper], axis=1)
        lo, hi = (torch.as_tensor(v, dtype=torch.float32)[:, None] for v in q)
        return lo, hi
    step = max(1, _QUANTILE_MAX // per_row)
    qs = torch.tensor([lower / 100.0, upper / 100.0], dtype=torch.float32)
    parts = [torch.quantile(rows[i : i + step], qs, dim=1) for i in range(0, len(rows), step)]
    q = torch.cat(parts, dim=1)  # (2, N)
    return q[0][:, None], q[1][:, None]
