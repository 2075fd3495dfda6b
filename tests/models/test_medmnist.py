"""MedMNIST downloader, offline: a fabricated file in MedMNIST's layout served from file://."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from models.errors import ChecksumError, DataError
from models.medmnist import MEDMNIST_MD5, download_medmnist, medmnist_filename
from models.readers import load_npz


@pytest.fixture
def served(tmp_path: Path) -> tuple[str, str]:
    """A tiny MedMNIST-layout npz in a 'remote' folder; returns (file:// url, md5)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in {"train": 6, "val": 2, "test": 2}.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
    remote = tmp_path / "remote" / "bloodmnist_64.npz"
    remote.parent.mkdir()
    np.savez_compressed(remote, **arrays)
    return remote.as_uri(), hashlib.md5(remote.read_bytes(), usedforsecurity=False).hexdigest()


def test_download_verify_and_load(tmp_path: Path, served: tuple[str, str]) -> None:
    url, md5 = served
    path = download_medmnist("bloodmnist", root=tmp_path / "cache", url=url, md5=md5)
    assert path == tmp_path / "cache" / "bloodmnist_64.npz" and path.is_file()
    data = load_npz(path, split="train")
    assert len(data) == 6 and data.images.shape == (6, 3, 64, 64)
    assert list((tmp_path / "cache").iterdir()) == [path]  # no temp file left


def test_cached_file_is_reused(tmp_path: Path, served: tuple[str, str]) -> None:
    url, md5 = served
    first = download_medmnist("bloodmnist", root=tmp_path, url=url, md5=md5)
    Path(url.removeprefix("file://")).unlink()  # the source is gone: only the cache can answer
    assert download_medmnist("bloodmnist", root=tmp_path, url=url, md5=md5) == first


def test_wrong_md5_raises_and_leaves_no_file(tmp_path: Path, served: tuple[str, str]) -> None:
    url, _ = served
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="does not match"):
        download_medmnist("bloodmnist", root=cache, url=url, md5="0" * 32)
    assert list(cache.iterdir()) == []


def test_unreachable_source_is_a_data_error(tmp_path: Path) -> None:
    url = (tmp_path / "absent.npz").as_uri()
    with pytest.raises(DataError, match="failed"):
        download_medmnist("bloodmnist", root=tmp_path / "c", url=url, md5="0" * 32)
    assert list((tmp_path / "c").iterdir()) == []


def test_unknown_flag_needs_md5(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass md5"):
        download_medmnist("nodulemnist3d", root=tmp_path)
    with pytest.raises(DataError, match="pass md5"):
        download_medmnist("bloodmnist", root=tmp_path, size=128)


def test_official_table_and_names() -> None:
    assert MEDMNIST_MD5["bloodmnist"] == (
        "7053d0359d879ad8a5505303e11de1dc",
        "2b94928a2ae4916078ca51e05b6b800b",
    )
    assert all(len(m) == 32 for pair in MEDMNIST_MD5.values() for m in pair)
    assert medmnist_filename("pathmnist", 28) == "pathmnist.npz"
    assert medmnist_filename("pathmnist", 64) == "pathmnist_64.npz"
