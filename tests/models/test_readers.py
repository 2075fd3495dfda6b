"""Readers on real small files of every format, npz layouts, manifests and bad-file batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import DataError, UnreadableImageError
from models.pipeline import IMAGE_KEY, PipelineConfig, build_transforms, preprocess_arrays
from models.readers import (
    LoadResult,
    load_dataset,
    load_files,
    load_manifest,
    load_npz,
    patient_id_from_provenance,
)
from tests.models.image_files import gradient, write_dicom, write_nifti, write_png

CONFIG = PipelineConfig()


@pytest.mark.parametrize(
    ("provenance", "patient"),
    [
        ("BCCD/JPEGImages/BloodImage_00001.jpg#18:RBC:[464, 209, 566, 319]", "BloodImage_00001"),
        ("dataset/cataract/103_left.jpg", "103"),
        ("dataset/normal/2210_Right.jpg", "2210"),
        ("Training/glioma/Tr-gl_0014.jpg", "Tr-gl_0014"),
        ("scans/case7.nii.gz", "case7"),
        ("synthetic/patient_00012.png#img_1", "patient_00012"),
    ],
)
def test_patient_id_from_provenance(provenance: str, patient: str) -> None:
    assert patient_id_from_provenance(provenance) == patient


def test_every_file_format_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.jpg", quality=95)
    volume = rng.random((30, 20, 7)).astype(np.float32)
    paths = [
        write_png(tmp_path / "g.png", gradient()),
        tmp_path / "c.jpg",
        write_dicom(tmp_path / "d.dcm", gradient().astype(np.uint16) * 16),
        write_nifti(tmp_path / "v.nii.gz", volume),
    ]
    result = load_files(paths, CONFIG)
    assert result.errors == []
    assert result.paths == [str(p) for p in paths]
    assert result.images.shape == (4, 3, 64, 64) and result.images.dtype == np.float32
    assert result.images.min() >= 0.0 and result.images.max() <= 1.0
    # DICOM keeps rows first: same tensor as the PNG of the same pixels.
    np.testing.assert_allclose(result.images[2], result.images[0], atol=1e-5)
    # NIfTI 3-D: the middle slice (index 3 of 7).
    middle = build_transforms(CONFIG, train=False)({IMAGE_KEY: volume[:, :, 3]})[IMAGE_KEY]
    np.testing.assert_allclose(result.images[3], middle.numpy(), atol=1e-5)


def test_batch_with_bad_files_loads_the_good_ones_and_reports_each_bad_one(tmp_path: Path) -> None:
    good = [write_png(tmp_path / f"ok{i}.png", gradient() + i) for i in range(2)]
    truncated = write_png(
        tmp_path / "cut.png", np.random.default_rng(1).integers(0, 255, (64, 64), np.uint8)
    )
    truncated.write_bytes(truncated.read_bytes()[:150])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    constant = write_png(tmp_path / "flat.png", np.full((32, 32), 9, np.uint8))
    nan_volume = np.random.default_rng(0).random((16, 16, 5)).astype(np.float32)
    nan_volume[3, 3, 2] = np.nan
    nan_nii = write_nifti(tmp_path / "nan.nii.gz", nan_volume)
    tiny = write_png(tmp_path / "tiny.png", np.array([[1]], np.uint8))
    bad = [truncated, tmp_path / "empty.png", tmp_path / "notes.txt", constant, nan_nii, tiny]
    result = load_files([good[0], *bad, good[1]], CONFIG)
    assert isinstance(result, LoadResult)
    assert result.paths == [str(good[0]), str(good[1])]
    assert result.images.shape == (2, 3, 64, 64)
    assert [e.path for e in result.errors] == [str(p) for p in bad]
    assert all(isinstance(e, UnreadableImageError) for e in result.errors)
    reasons = {Path(e.path).name: e.reason for e in result.errors}
    assert "constant" in reasons["flat.png"] and "NaN" in reasons["nan.nii.gz"]
    assert "minimum side" in reasons["tiny.png"] and "empty" in reasons["empty.png"]


def test_all_bad_batch_gives_empty_images(tmp_path: Path) -> None:
    result = load_files([tmp_path / "missing.png"], CONFIG)
    assert result.images.shape == (0, 3, 64, 64) and len(result.errors) == 1


def write_shared_layout(path: Path, *, colour: bool = True, n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    shape = (n, 64, 64, 3) if colour else (n, 64, 64)
    arrays = {
        "images": rng.integers(0, 256, shape, dtype=np.uint8),
        "labels": np.arange(n, dtype=np.int64) % 3,
        "classes": np.array(["a", "b", "c"]),
        "source": np.array("test fixture"),
        "provenance": np.array(
            [f"x/{i // 2}_{'left' if i % 2 else 'right'}.jpg" for i in range(n)]
        ),
    }
    np.savez_compressed(path, **arrays)
    return arrays


@pytest.mark.parametrize("colour", [True, False])
def test_load_npz_shared_layout(tmp_path: Path, colour: bool) -> None:
    arrays = write_shared_layout(tmp_path / "set.npz", colour=colour)
    data = load_npz(tmp_path / "set.npz", CONFIG)
    assert data.name == "set" and data.classes == ("a", "b", "c") and len(data) == 12
    np.testing.assert_array_equal(data.labels, arrays["labels"])
    assert list(data.patients[:4]) == ["0", "0", "1", "1"]
    np.testing.assert_allclose(data.images, preprocess_arrays(arrays["images"], CONFIG))


def write_medmnist_layout(path: Path) -> None:
    rng = np.random.default_rng(4)
    parts = {"train": 6, "val": 2, "test": 3}
    arrays = {}
    for split, n in parts.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 4).reshape(n, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)


def test_load_npz_medmnist_layout_and_splits(tmp_path: Path) -> None:
    write_medmnist_layout(tmp_path / "m.npz")
    everything = load_npz(tmp_path / "m.npz", CONFIG)
    assert len(everything) == 11 and everything.images.shape == (11, 3, 64, 64)
    assert everything.classes == ("class_0", "class_1", "class_2", "class_3")
    assert len(load_npz(tmp_path / "m.npz", CONFIG, split="val")) == 2
    assert load_npz(tmp_path / "m.npz", CONFIG, split="test", name="t").name == "t"
    with pytest.raises(DataError, match="split"):
        load_npz(tmp_path / "m.npz", CONFIG, split="holdout")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"labels": None}, "missing key 'labels'"),
        ({"labels": np.array([0, 1, 5, 0])}, "'labels' values must lie in"),
        ({"labels": np.array([0, 1, 2])}, "'labels' has shape"),
        ({"images": np.zeros((4, 64), np.uint8)}, "'images' must be"),
        ({"images": np.full((4, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"provenance": np.array(["a", "b"])}, "'provenance' has 2 entries"),
    ],
)
def test_load_npz_validation_names_file_and_key(tmp_path: Path, change: dict, words: str) -> None:
    arrays = {
        "images": np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8),
        "labels": np.array([0, 1, 2, 0]),
        "classes": np.array(["a", "b", "c"]),
    }
    for key, value in change.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=words) as info:
        load_npz(path, CONFIG)
    assert str(path) in str(info.value)


def test_multilabel_medmnist_is_refused(tmp_path: Path) -> None:
    arrays = {f"{s}_images": np.zeros((2, 28, 28), np.uint8) for s in ("train", "val", "test")}
    arrays |= {f"{s}_labels": np.zeros((2, 14), np.uint8) for s in ("train", "val", "test")}
    np.savez(tmp_path / "chest.npz", **arrays)
    with pytest.raises(DataError, match="multi-label"):
        load_npz(tmp_path / "chest.npz", CONFIG)


def make_folder_manifest(root: Path) -> Path:
    for k, cls in enumerate(["benign", "malignant"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            write_png(root / cls / f"{i}.png", gradient() + 40 * k + i)
    return root


def test_folder_manifest(tmp_path: Path) -> None:
    root = make_folder_manifest(tmp_path / "site")
    data, errors = load_manifest(root, CONFIG)
    assert errors == [] and data.classes == ("benign", "malignant")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.images.shape == (6, 3, 64, 64)
    assert len(set(data.patients)) == 6  # no ids: one image = one patient
    assert load_dataset(root, CONFIG).classes == data.classes


def test_csv_manifest_with_patient_ids_and_bad_file(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", gradient() + i)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG broken")
    lines = ["path,label,patient_id"]
    lines += [f"img/{i}.png,{'x' if i < 2 else 'y'},p{i // 2}" for i in range(4)]
    lines.append("img/broken.png,x,p9")
    manifest = tmp_path / "train.csv"
    manifest.write_text("\n".join(lines) + "\n")
    data, errors = load_manifest(manifest, CONFIG)
    assert data.classes == ("x", "y") and data.patients.tolist() == ["p0", "p0", "p1", "p1"]
    assert [Path(e.path).name for e in errors] == ["broken.png"]
    with pytest.raises(DataError, match="1 of 5 images are unreadable"):
        load_dataset(manifest, CONFIG)


def test_csv_manifest_header_is_checked(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="header"):
        load_manifest(tmp_path / "m.csv", CONFIG)


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    write_shared_layout(tmp_path / "s.npz")
    assert len(load_dataset(tmp_path / "s.npz")) == 12
    with pytest.raises(DataError, match="manifest"):
        load_dataset(tmp_path / "nothing.json")


def test_pipeline_output_is_a_plain_tensor(tmp_path: Path) -> None:
    out = build_transforms(CONFIG, train=False)(
        {IMAGE_KEY: str(write_png(tmp_path / "a.png", gradient()))}
    )
    assert type(out[IMAGE_KEY]) is torch.Tensor
