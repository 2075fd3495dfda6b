"""MedMNIST+ downloader: the official ``.npz`` files, md5-verified, cached, atomically written.

Checksums are MedMNIST's own (``medmnist/info.py`` of github.com/MedMNIST/MedMNIST, v3.0.2,
zenodo record 10519652), 2-D sets only. Load the result with :func:`models.readers.load_npz`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from models.errors import ChecksumError, DataError

logger = logging.getLogger(__name__)

ZENODO_RECORD = "https://zenodo.org/records/10519652/files"
DOWNLOAD_TIMEOUT_S = 60  # per socket operation; zenodo can be slow but never silent this long
_CHUNK = 1 << 20

# flag -> (md5 of "<flag>.npz" (28 px), md5 of "<flag>_64.npz")
MEDMNIST_MD5: dict[str, tuple[str, str]] = {
    "pathmnist": ("a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616"),
    "chestmnist": ("02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16"),
    "dermamnist": ("0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f"),
    "octmnist": ("c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf"),
    "pneumoniamnist": ("28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6"),
    "retinamnist": ("bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc"),
    "breastmnist": ("750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364"),
    "bloodmnist": ("7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b"),
    "tissuemnist": ("ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344"),
    "organamnist": ("68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288"),
    "organcmnist": ("b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9"),
    "organsmnist": ("9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3"),
}


def medmnist_filename(flag: str, size: int) -> str:
    """The official file name: ``<flag>.npz`` for 28 px, ``<flag>_<size>.npz`` otherwise."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_medmnist(
    flag: str,
    *,
    root: Path,
    size: int = 64,
    url: str | None = None,
    md5: str | None = None,
) -> Path:
    """Download (or reuse) an official MedMNIST+ ``.npz`` and verify its md5.

    Args:
        flag: dataset flag, e.g. ``"bloodmnist"``.
        root: cache folder; the file lands at ``root / medmnist_filename(flag, size)``.
        size: 28 or 64 (the sizes this project checks sums for; others need ``md5``).
        url: source URL (default: the zenodo record); ``file://`` works for offline mirrors.
        md5: expected checksum; required when the table has none for ``flag``/``size``.

    Returns:
        Path of the verified file.

    Raises:
        DataError: unknown flag/size with no ``md5`` given, or the download failed.
        ChecksumError: the downloaded file does not match; it is deleted.
    """
    if md5 is None:
        if flag not in MEDMNIST_MD5 or size not in (28, 64):
            raise DataError(
                f"no official md5 known for MedMNIST flag {flag!r} at size {size}; pass md5= "
                f"(known 2-D flags: {sorted(MEDMNIST_MD5)}, sizes 28 and 64)"
            )
        md5 = MEDMNIST_MD5[flag][0 if size == 28 else 1]
    md5 = md5.lower()
    root = Path(root)
    target = root / medmnist_filename(flag, size)
    if target.is_file():
        if _md5(target) == md5:
            return target
        logger.warning("cached %s fails its md5; downloading it again", target.name)
    source = url or f"{ZENODO_RECORD}/{medmnist_filename(flag, size)}?download=1"
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=root)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        got = digest.hexdigest()
        if got != md5:
            raise ChecksumError(
                f"{target.name} from {source}: md5 {got} does not match the expected {md5}; "
                "the file was deleted, retry or check the URL"
            )
        os.replace(tmp, target)  # atomic on one filesystem: readers never see a partial file
    except ChecksumError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:  # URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {target.name} from {source} failed: {exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("downloaded %s (md5 ok)", target.name)
    return target
