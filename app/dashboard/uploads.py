"""Uploaded files to model-ready arrays, through the same guard and MONAI readers as training.

Uploads are written to a private temporary folder only for as long as the readers need them
(MONAI's readers take paths), then deleted; the arrays stay in the browser session's memory.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.errors import UnreadableImageError
from models.guard import GuardConfig, file_suffix
from models.pipeline import PipelineConfig
from models.readers import load_files

ACCEPTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")  # what the page says
# A case reduced by more than this per side loses detail a reader would see: the page says so.
HUGE_FACTOR = 4


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the user's browser gave and its bytes."""

    name: str
    data: bytes


@dataclass(frozen=True)
class CaseIdentity:
    """Whose study a DICOM case is, as the archive names it (empty for other files). Shown on
    the screen and written to the CSV; never logged."""

    accession: str = ""
    patient: str = ""  # the patient's name, parts separated by spaces
    patient_id: str = ""
    modality: str = ""  # the DICOM Modality (CR, US, ...): a case of another is not compared


@dataclass(frozen=True)
class LoadedCase:
    """One readable case: its pipeline output ``(C, S, S)`` and what the file was before it."""

    name: str
    image: np.ndarray
    original_shape: tuple[int, ...]  # (H, W) or (H, W, C) as stored in the file
    identity: CaseIdentity = CaseIdentity()


@dataclass
class LoadedCases:
    """The readable cases of a batch of uploads and one error per unreadable file."""

    cases: list[LoadedCase] = field(default_factory=list)
    errors: list[UnreadableImageError] = field(default_factory=list)

    @property
    def images(self) -> np.ndarray:
        """Stacked pipeline outputs ``(n, C, S, S)``."""
        return np.stack([c.image for c in self.cases]) if self.cases else np.zeros((0, 0, 0, 0))

    @property
    def names(self) -> list[str]:
        """File names of the readable cases."""
        return [c.name for c in self.cases]

    @property
    def modalities(self) -> list[str]:
        """Each readable case's DICOM modality ("" for other files)."""
        return [c.identity.modality for c in self.cases]


def _cache_key(upload: Upload, pipeline: PipelineConfig, guard: GuardConfig) -> str:
    digest = hashlib.sha256(upload.data).hexdigest()
    return f"{digest}:{upload.name}:{sorted(pipeline.to_dict().items())}:{guard.max_file_bytes}"


def _header(path: Path) -> tuple[tuple[int, ...], CaseIdentity]:
    """Height, width (and channels) as stored, and whose study it is (DICOM only), read from
    the header only."""
    suffix = file_suffix(path)
    if suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as img:
            width, height = img.size
            bands = len(img.getbands())
        return ((height, width) if bands == 1 else (height, width, bands)), CaseIdentity()
    if suffix == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
        identity = CaseIdentity(
            accession=str(ds.get("AccessionNumber", "") or "").strip(),
            patient=" ".join(str(ds.get("PatientName", "") or "").replace("^", " ").split()),
            patient_id=str(ds.get("PatientID", "") or "").strip(),
            modality=str(ds.get("Modality", "") or "").strip().upper(),
        )
        return ((rows, cols) if samples == 1 else (rows, cols, samples)), identity
    import nibabel as nib

    shape = tuple(int(s) for s in nib.load(path).shape)  # type: ignore[attr-defined]
    return shape, CaseIdentity()


def load_uploads(
    uploads: Sequence[Upload],
    *,
    pipeline: PipelineConfig,
    guard: GuardConfig = GuardConfig(),
    cache: MutableMapping[str, LoadedCase | UnreadableImageError] | None = None,
) -> LoadedCases:
    """Guard, read and preprocess uploaded files; a bad file is reported, never fatal.

    Args:
        uploads: the files, in the order they were given.
        pipeline: the base model's preprocessing (every case is resized to its input side).
        guard: size, format and pixel limits checked before decoding.
        cache: results of earlier calls (keyed by content, name and pipeline), so a page rerun
            does not decode the same files again.

    Returns:
        The readable cases in input order and an error naming each unreadable file.
    """
    cache = {} if cache is None else cache
    todo = [(i, u) for i, u in enumerate(uploads) if _cache_key(u, pipeline, guard) not in cache]
    if todo:
        with tempfile.TemporaryDirectory(prefix="fedfew-upload-") as folder:
            paths = []
            for i, upload in todo:
                # The browser's file name is only kept for messages; on disk a fixed name with
                # the original suffix (the readers pick a decoder by suffix).
                path = Path(folder) / f"case_{i}{file_suffix(upload.name)}"
                path.write_bytes(upload.data)
                paths.append(path)
            result = load_files(paths, pipeline, guard)
            loaded = dict(zip(result.paths, result.images, strict=True))
            failed = {e.path: e for e in result.errors}
            for (_, upload), path in zip(todo, paths, strict=True):
                key = _cache_key(upload, pipeline, guard)
                if str(path) in loaded:
                    shape, identity = _header(path)
                    cache[key] = LoadedCase(
                        name=upload.name,
                        image=loaded[str(path)],
                        original_shape=shape,
                        identity=identity,
                    )
                else:
                    # Decoder messages quote the temporary path: name the user's file instead.
                    reason = failed[str(path)].reason.replace(str(path), upload.name)
                    cache[key] = UnreadableImageError(upload.name, reason)
    out = LoadedCases()
    for upload in uploads:
        item = cache[_cache_key(upload, pipeline, guard)]
        if isinstance(item, UnreadableImageError):
            out.errors.append(item)
        else:
            out.cases.append(item)
    return out


def resize_note(cases: Sequence[LoadedCase], pipeline: PipelineConfig) -> str | None:
    """Sentences for the user when cases are much larger than the model's input (how much was
    lost in the reduction) or differ in size or channels; None when there is nothing to say."""
    side = pipeline.image_size
    notes = []
    huge = [c for c in cases if max(c.original_shape[:2]) > HUGE_FACTOR * side]
    if huge:
        largest = max(huge, key=lambda c: c.original_shape[0] * c.original_shape[1])
        height, width = largest.original_shape[:2]
        notes.append(
            f"{len(huge)} case(s) are much larger than the model's input (the largest, "
            f"{largest.name}, is {height}x{width} pixels): each was reduced to {side}x{side} "
            f"pixels, so detail smaller than about {math.ceil(max(height, width) / side)} of "
            "its pixels is not seen by the model. Crop to the region of interest if fine "
            "detail matters."
        )
    sizes = {c.original_shape[:2] for c in cases}
    channels = {c.original_shape[2] if len(c.original_shape) > 2 else 1 for c in cases}
    if len(sizes) > 1 or len(channels) > 1:
        parts = []
        if len(sizes) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:4])
            parts.append(f"sizes differ ({shown}{', ...' if len(sizes) > 4 else ''})")
        if len(channels) > 1:
            parts.append(f"channel counts differ ({', '.join(str(c) for c in sorted(channels))})")
        notes.append(
            f"The cases' {' and '.join(parts)}: that is fine. Every case is resized to "
            f"{side}x{side} pixels and given {pipeline.channels} channels before the model sees it."
        )
    return " ".join(notes) or None


def thumbnail(image: np.ndarray) -> np.ndarray:
    """A pipeline output ``(C, S, S)`` in [0, 1] as an 8-bit picture ``(S, S, 3)`` or ``(S, S)``."""
    picture = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    picture = picture[0] if picture.shape[0] == 1 else np.moveaxis(picture, 0, -1)
    return np.round(picture * 255).astype(np.uint8)


def _identity(upload: Upload) -> tuple[str, str]:
    return upload.name, hashlib.sha256(upload.data).hexdigest()


def _unique(uploads: Sequence[Upload]) -> list[Upload]:
    """First occurrence of each (name, content), in order."""
    seen: set[tuple[str, str]] = set()
    out = []
    for upload in uploads:
        if _identity(upload) not in seen:
            seen.add(_identity(upload))
            out.append(upload)
    return out


@dataclass
class CaseShelf:
    """The uploads of each slot (one file uploader per class), kept beyond the uploader's life.

    Streamlit forgets a file uploader's files when its page is not rendered (a switch to another
    page), and the browser cannot be asked to fill it again. So every run records what the slot's
    uploader holds; when a slot's uploader comes back empty after it was reset, what it held is
    moved to ``kept``, and the slot's cases are the kept uploads plus the uploader's current ones.
    Uploads are kept as bytes, decoded through :func:`load_uploads` with the current base model's
    pipeline, so a change of base model prepares them again.
    """

    kept: dict[str, list[Upload]] = field(default_factory=dict)  # from earlier uploaders
    shown: dict[str, list[Upload]] = field(default_factory=dict)  # in the uploader last run

    def uploads(
        self, slot: str, current: Sequence[Upload], *, uploader_reset: bool
    ) -> list[Upload]:
        """The slot's uploads this run: kept ones first, then the uploader's (no duplicates).

        Args:
            slot: the uploader's key.
            current: the files the uploader holds in this run.
            uploader_reset: the uploader had no state at the start of this run (first render,
                or rendered again after a page switch).
        """
        if uploader_reset:
            self.kept[slot] = _unique([*self.kept.get(slot, []), *self.shown.pop(slot, [])])
        self.shown[slot] = list(current)
        return _unique([*self.kept.get(slot, []), *current])

    def all_uploads(self) -> dict[str, list[Upload]]:
        """Every slot's uploads, kept and in the uploader (what a draft saves)."""
        slots = sorted({*self.kept, *self.shown})
        return {s: _unique([*self.kept.get(s, []), *self.shown.get(s, [])]) for s in slots}

    def restore(self, uploads: dict[str, list[Upload]]) -> None:
        """Keep ``uploads`` per slot (a draft taken back after a reload)."""
        for slot, files in uploads.items():
            self.kept[slot] = _unique([*self.kept.get(slot, []), *files])

    def clear_prefix(self, prefix: str) -> None:
        """Forget everything (kept and last seen) of the slots whose key starts with ``prefix``."""
        for table in (self.kept, self.shown):
            for slot in [s for s in table if s.startswith(prefix)]:
                del table[slot]

    def kept_count(self, slot: str) -> int:
        """Uploads of ``slot`` kept from an earlier uploader."""
        return len(self.kept.get(slot, []))

    def clear(self, slot: str | None = None) -> None:
        """Forget the kept uploads of ``slot``, or everything (kept and last seen) when None."""
        if slot is None:
            self.kept.clear()
            self.shown.clear()
        else:
            self.kept.pop(slot, None)
