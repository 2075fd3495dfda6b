"""A site's features of its own data under a frozen encoder, embedded once and kept on its disk.

A node whose plan trains an adapter on a frozen encoder (models/feature_adapter.py) needs the
encoder's features of its patients' images in every round, and they change only when the encoder
or the data does. The store keys each embedding by a digest of the encoder's tensors, of the
pipeline that prepared the images and of the data's bytes, so a new encoder version or changed
data is embedded afresh and anything else is read back. It lives in the node's state folder and
is never sent: it is the site's data in another form.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.adaptation import embed
from models.feature_cache import module_digest
from models.imageset import ImageSet
from models.pipeline import PipelineConfig

KEEP = 4  # embeddings kept per store (one per encoder version and data version in use)


def data_digest(path: Path) -> str:
    """A SHA-256 of a data file's bytes, or of every file under a data folder (names and
    bytes, in sorted order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def as_feature_set(features: torch.Tensor | np.ndarray, like: ImageSet) -> ImageSet:
    """Features ``(n, d)`` as an image set of ``(n, d, 1, 1)`` "images", with ``like``'s labels,
    classes, patients and name (what the trainers take)."""
    array = np.asarray(features, dtype=np.float32)
    return ImageSet(
        images=array.reshape(len(array), -1, 1, 1),
        labels=like.labels,
        classes=like.classes,
        patients=like.patients,
        name=like.name,
    )


class FeatureStore:
    """Embeddings of one site's data, one ``.npz`` per key, the newest :data:`KEEP` kept."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def key(self, encoder: nn.Module, source: Path, pipeline: PipelineConfig) -> str:
        """The key of ``source``'s embedding under ``encoder`` after ``pipeline``."""
        parts = {
            "encoder": module_digest(encoder),
            "pipeline": pipeline.to_dict(),
            "data": data_digest(source),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def features(
        self,
        encoder: nn.Module,
        source: Path,
        pipeline: PipelineConfig,
        load: Callable[[], ImageSet],
    ) -> ImageSet:
        """``source``'s features under ``encoder`` as a feature set (:func:`as_feature_set`):
        read back when this encoder, pipeline and data were embedded before, else embedded from
        ``load()`` (the images) and kept."""
        path = self.root / f"{self.key(encoder, Path(source), pipeline)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as kept:
                return ImageSet(
                    images=kept["images"],
                    labels=kept["labels"],
                    classes=tuple(str(c) for c in kept["classes"]),
                    patients=kept["patients"],
                    name=str(kept["name"]),
                )
        data = load()
        features = as_feature_set(embed(encoder, torch.from_numpy(data.images)).numpy(), data)
        self._write(path, features)
        return features

    def _write(self, path: Path, features: ImageSet) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=self.root)
        with os.fdopen(fd, "wb") as handle:
            np.savez(
                handle,
                images=features.images,
                labels=features.labels,
                classes=np.array(features.classes, dtype=str),
                patients=features.patients.astype(str),
                name=np.array(features.name),
            )
        os.replace(tmp, path)
        kept = sorted(self.root.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
