"""Input guard: every bad file is refused with a typed error naming it and the reason."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from models.errors import UnreadableImageError
from models.guard import GuardConfig, check_array, check_file
from tests.models.image_files import gradient, write_dicom, write_nifti, write_png


def patch_png_size(path: Path, width: int, height: int) -> None:
    """Rewrite the IHDR width/height of a PNG (and its CRC): a decompression-bomb header."""
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def reason_of(path: Path, config: GuardConfig = GuardConfig()) -> str:
    with pytest.raises(UnreadableImageError) as info:
        check_file(path, config)
    assert info.value.path == str(path)
    return info.value.reason


def test_good_files_of_every_format_pass(tmp_path: Path) -> None:
    check_file(write_png(tmp_path / "a.png", gradient()))
    Image.fromarray(np.stack([gradient()] * 3, -1)).save(tmp_path / "b.jpg")
    check_file(tmp_path / "b.jpg")
    check_file(write_dicom(tmp_path / "c.dcm", gradient().astype(np.uint16) * 10))
    check_file(write_nifti(tmp_path / "d.nii.gz", np.random.default_rng(0).random((20, 20, 5))))
    check_file(write_nifti(tmp_path / "e.nii", np.random.default_rng(0).random((20, 20, 5))))


def test_missing_and_empty(tmp_path: Path) -> None:
    assert "does not exist" in reason_of(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in reason_of(tmp_path / "empty.png")


def test_suffix_not_allowed_and_png_named_dcm(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert "not allowed" in reason_of(tmp_path / "notes.txt")
    png = write_png(tmp_path / "a.png", gradient())
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(png.read_bytes())
    assert "header unreadable as .dcm" in reason_of(fake)


def test_truncated_png(tmp_path: Path) -> None:
    png = write_png(
        tmp_path / "a.png", np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    )
    png.write_bytes(png.read_bytes()[:200])
    assert "header unreadable" in reason_of(png)


def test_truncated_nifti(tmp_path: Path) -> None:
    nii = write_nifti(tmp_path / "v.nii", np.random.default_rng(0).random((20, 20, 5)))
    nii.write_bytes(nii.read_bytes()[:-500])
    assert "truncated" in reason_of(nii)


def test_too_big_file_and_too_many_pixels(tmp_path: Path) -> None:
    png = write_png(tmp_path / "a.png", gradient())
    assert "above the limit" in reason_of(png, GuardConfig(max_file_bytes=10))
    assert "decompression bomb" in reason_of(png, GuardConfig(max_pixels=100))


def test_png_declaring_huge_dimensions_is_refused(tmp_path: Path) -> None:
    png = write_png(tmp_path / "bomb.png", gradient(16, 16))
    patch_png_size(png, 100_000, 100_000)
    assert "pixels" in reason_of(png)


def test_too_small_image(tmp_path: Path) -> None:
    tiny = write_png(tmp_path / "tiny.png", np.array([[7]], dtype=np.uint8))
    assert "below the minimum side" in reason_of(tiny)


def test_dicom_without_pixels_is_refused(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "c.dcm", gradient().astype(np.uint16))
    ds = pydicom.dcmread(path)
    del ds.Rows
    ds.save_as(path)
    assert "Rows/Columns" in reason_of(path)


def test_npz_is_checked_by_declared_size(tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    np.savez(path, images=np.zeros((10, 8, 8), np.uint8))
    check_file(path)
    assert "declare" in reason_of(path, GuardConfig(max_array_set_bytes=100))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert "zip" in reason_of(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (np.full((20, 20), 3.0), "constant"),
        (np.where(np.eye(20) > 0, np.nan, 1.0), "NaN/Inf"),
        (np.where(np.eye(20) > 0, np.inf, 1.0), "NaN/Inf"),
        (gradient(4, 30), "minimum side"),
        (np.arange(30.0), "not a 2-D image"),
        (np.zeros((2, 2, 20, 20)), "not a 2-D image"),
    ],
)
def test_check_array_refuses(array: np.ndarray, words: str) -> None:
    with pytest.raises(UnreadableImageError, match=words) as info:
        check_array(array, source="upload.png")
    assert info.value.path == "upload.png"


def test_check_array_accepts_both_layouts() -> None:
    check_array(gradient(), source="a")
    check_array(np.stack([gradient()] * 3, -1), source="a")
    check_array(np.stack([gradient()] * 3, 0).astype(np.float32), source="a")


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_file_bytes", 0), ("max_pixels", -1), ("min_side", 1.5), ("allowed_suffixes", ("png",))],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        GuardConfig(**{field: value})
