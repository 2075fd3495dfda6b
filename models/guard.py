"""Input guard: cheap checks on a file or array before MONAI decodes it.

Every rejection is an :class:`~models.errors.UnreadableImageError` naming the file (or array source)
and the reason, so a batch loader can report it and go on with the other files.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import UnreadableImageError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")
ARRAY_SET_SUFFIXES: tuple[str, ...] = (".npz",)


@dataclass(frozen=True)
class GuardConfig:
    """Limits applied to every input file and array."""

    # Medical 2-D images (PNG/JPEG/DICOM) are well under 50 MB; larger is an error or an attack.
    max_file_bytes: int = 50 * 1024 * 1024
    # Decompression bombs: a tiny compressed file can declare 1e10 pixels; 50e6 (~7000^2) covers
    # any real radiograph or slide crop while bounding decoder memory (~200 MB as float32).
    max_pixels: int = 50_000_000
    # Below 8 pixels a side there is no anatomy left to classify (and resizing invents it).
    min_side: int = 8
    # Array sets (.npz) are datasets, not single images: MedMNIST+ 64 px files reach ~1 GB
    # uncompressed, so they get their own cap on the arrays they declare.
    max_array_set_bytes: int = 4 * 1024**3
    # The formats the pipeline has a MONAI reader for; anything else is refused before decoding.
    allowed_suffixes: tuple[str, ...] = IMAGE_SUFFIXES + ARRAY_SET_SUFFIXES

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_pixels", "min_side", "max_array_set_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GuardConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.allowed_suffixes or not all(
            isinstance(s, str) and s.startswith(".") and s == s.lower()
            for s in self.allowed_suffixes
        ):
            raise ValueError(
                "GuardConfig.allowed_suffixes must be a non-empty tuple of lower-case suffixes "
                f"starting with '.', got {self.allowed_suffixes!r}"
            )


def file_suffix(path: str | Path) -> str:
    """Return the lower-case suffix of ``path``, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def check_file(path: str | Path, config: GuardConfig = GuardConfig()) -> None:
    """Check a file's existence, size, format and declared dimensions without decoding pixels.

    Args:
        path: the image or array-set file.
        config: the limits to apply.

    Raises:
        UnreadableImageError: the file is missing, empty, too big, of a format not allowed, has an
            unreadable or truncated header, declares too many pixels, or is too small.
    """
    p = Path(path)
    where = str(path)
    if not p.is_file():
        raise UnreadableImageError(where, "file does not exist (or is not a regular file)")
    size = p.stat().st_size
    if size == 0:
        raise UnreadableImageError(where, "file is empty (0 bytes)")
    suffix = file_suffix(p)
    if suffix not in config.allowed_suffixes:
        raise UnreadableImageError(
            where,
            f"format {suffix or '(none)'!r} not allowed; use one of {config.allowed_suffixes}",
        )
    if suffix in ARRAY_SET_SUFFIXES:
        _check_npz(p, config)
        return
    if size > config.max_file_bytes:
        raise UnreadableImageError(
            where, f"file is {size} bytes, above the limit of {config.max_file_bytes} bytes"
        )
    shape = _header_shape(p, suffix)
    _check_shape(where, shape, config)


def _header_shape(path: Path, suffix: str) -> tuple[int, ...]:
    """Spatial dimensions declared by the file header (no pixel decoding)."""
    where = str(path)
    try:
        if suffix in (".png", ".jpg", ".jpeg"):
            return _pil_shape(path)
        if suffix == ".dcm":
            return _dicom_shape(path)
        return _nifti_shape(path)
    except UnreadableImageError:
        raise
    except Exception as exc:  # every decoder has its own exception zoo; all mean "unreadable"
        raise UnreadableImageError(
            where, f"header unreadable as {suffix}: {type(exc).__name__}: {exc}"
        ) from exc


def _pil_shape(path: Path) -> tuple[int, ...]:
    from PIL import Image

    with warnings.catch_warnings():
        # We apply our own (lower) pixel cap below; PIL's bomb warning would only duplicate it.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                width, height = img.size
                if img.format == "PNG":
                    img.verify()  # walks the chunks and their CRCs: catches truncation, no decode
        except Image.DecompressionBombError as exc:
            raise UnreadableImageError(str(path), f"declares too many pixels ({exc})") from exc
    return (height, width)


def _dicom_shape(path: Path) -> tuple[int, ...]:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise UnreadableImageError(str(path), "DICOM header has no Rows/Columns (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return (int(rows), int(cols)) if frames == 1 else (int(rows), int(cols), frames)


def _nifti_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    img: Any = nib.load(path)  # lazy: reads the header only
    shape = tuple(int(s) for s in img.shape)
    if path.suffix.lower() == ".nii":
        header = img.header
        expected = int(header["vox_offset"]) + math.prod(shape) * header.get_data_dtype().itemsize
        if path.stat().st_size < expected:
            raise UnreadableImageError(
                str(path), f"truncated: header declares {expected} bytes, file has fewer"
            )
    return shape


def _check_shape(where: str, shape: tuple[int, ...], config: GuardConfig) -> None:
    if len(shape) < 2:
        raise UnreadableImageError(where, f"declares shape {shape}: not an image")
    pixels = math.prod(shape)
    if pixels > config.max_pixels:
        raise UnreadableImageError(
            where,
            f"declares {shape} = {pixels} pixels, above the limit of {config.max_pixels} "
            "(possible decompression bomb)",
        )
    if min(shape[:2]) < config.min_side:
        raise UnreadableImageError(
            where, f"image is {shape[0]}x{shape[1]}, below the minimum side of {config.min_side}"
        )


def _check_npz(path: Path, config: GuardConfig) -> None:
    """Read each member's .npy header (not its data) and cap the declared bytes."""
    where = str(path)
    if not zipfile.is_zipfile(path):
        raise UnreadableImageError(where, "not a valid .npz (zip) archive")
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read(fh)
                total += math.prod(shape) * dtype.itemsize
    except Exception as exc:  # zipfile/np.lib.format raise many types; all mean "unreadable"
        raise UnreadableImageError(where, f"unreadable .npz: {type(exc).__name__}: {exc}") from exc
    if total > config.max_array_set_bytes:
        raise UnreadableImageError(
            where,
            f"arrays declare {total} bytes, above the limit of {config.max_array_set_bytes}",
        )


def check_array(array: np.ndarray, *, source: str, config: GuardConfig = GuardConfig()) -> None:
    """Check a decoded image array before it enters the pipeline.

    Accepts ``(H, W)``, channel-last ``(H, W, C)`` or channel-first ``(C, H, W)`` with 1 to 4
    channels (the layout is inferred from which end holds a dimension of at most 4).

    Args:
        array: the image.
        source: what the array came from (a file name or "images[12] of set.npz"), for the message.
        config: the limits to apply.

    Raises:
        UnreadableImageError: wrong number of dimensions, a side below ``config.min_side``,
            NaN/Inf values, or a constant image (no information; scaling would divide by 0).
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        spatial = arr.shape
    elif arr.ndim == 3 and arr.shape[-1] <= 4:
        spatial = arr.shape[:2]
    elif arr.ndim == 3 and arr.shape[0] <= 4:
        spatial = arr.shape[1:]
    else:
        raise UnreadableImageError(
            source,
            f"array of shape {arr.shape} is not a 2-D image (H, W), (H, W, C) or (C, H, W), C<=4",
        )
    if min(spatial) < config.min_side:
        raise UnreadableImageError(
            source,
            f"image is {spatial[0]}x{spatial[1]}, below the minimum side of {config.min_side}",
        )
    if arr.dtype.kind not in "biuf":
        raise UnreadableImageError(source, f"array dtype {arr.dtype} is not numeric")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise UnreadableImageError(source, f"{bad} NaN/Inf values in the image")
    if arr.min() == arr.max():
        raise UnreadableImageError(source, f"constant image (every value is {arr.flat[0]})")
