"""What a DP prototype release is once it has left the nodes: the noisy class sums, and the class
prototypes computed from them (pure numpy, no torch).

A node's release (``privacy/dp_prototypes.py``) is one array ``S`` of shape ``(K, d+1)``: row c
holds the noisy sum of the patients' normalised feature sums of class c (first d columns) and
the noisy sum of their class fractions (last column), both scaled by the clip C. The sites'
releases add up to the federation's ``S`` (independent Gaussian noise: variances add).
Everything here is post-processing of released sums (docs/privacy.md, "DP prototype release").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SUMS = "class-sums"  # the one array name of a node's release, shape (K, d+1)
PROTOTYPES = "prototypes"  # in a prototypes file: the (K, d) prototypes
PROTOTYPES_FILE = "prototypes.safetensors"  # kept beside a global version's weights
MIN_MASS = 1.0  # floor of a class's noisy patient mass when dividing (see prototypes_from_sums)


def prototypes_from_sums(sums: np.ndarray, *, clip: float) -> np.ndarray:
    """Class prototypes ``S[c, :d] / max(S[c, d] / C, 1)`` from a release ``S`` (K, d+1).

    ``S[c, d] / C`` is a noisy count of the patient mass of class c (each patient adds its
    fraction of images in c). The floor of 1 keeps a class that few patients (or only noise)
    fill from being divided by a tiny or negative number; the prototype's direction is
    ``S[c, :d]``'s either way, and callers L2-normalise or centre it as adaptation does.
    """
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2 or sums.shape[1] < 2:
        raise ValueError(f"a prototype release has shape (K, d+1), got {sums.shape}")
    mass = np.maximum(sums[:, -1] / clip, MIN_MASS)
    return sums[:, :-1] / mass[:, None]


@dataclass(frozen=True)
class PrototypeRelease:
    """The federation's summed release for one round, and where it came from."""

    classes: tuple[str, ...]  # the plan's vocabulary: row order of ``sums``
    sums: np.ndarray  # (K, d+1), the sum of the accepted sites' releases
    clip: float  # C of the plan
    noise_multiplier: float  # sigma of each site's release (as applied to C)
    sites: tuple[str, ...]  # the sites whose releases were summed

    def __post_init__(self) -> None:
        if self.sums.shape != (len(self.classes), self.sums.shape[1]) or self.sums.shape[1] < 2:
            raise ValueError(
                f"PrototypeRelease.sums has shape {self.sums.shape}, expected "
                f"({len(self.classes)}, d+1)"
            )

    @classmethod
    def summed(
        cls,
        releases: Sequence[np.ndarray],
        *,
        classes: Sequence[str],
        clip: float,
        noise_multiplier: float,
        sites: Sequence[str],
    ) -> PrototypeRelease:
        """The sum of the sites' releases (float64 accumulation)."""
        if not releases:
            raise ValueError("no release to sum")
        total = np.sum([np.asarray(r, dtype=np.float64) for r in releases], axis=0)
        return cls(tuple(classes), total, float(clip), float(noise_multiplier), tuple(sites))

    def prototypes(self) -> np.ndarray:
        """(K, d) class prototypes (:func:`prototypes_from_sums`)."""
        return prototypes_from_sums(self.sums, clip=self.clip)

    def metadata(self) -> dict[str, str]:
        """What the file keeps beside the arrays (public: plan and site names)."""
        return {
            "classes": json.dumps(list(self.classes)),
            "clip": repr(self.clip),
            "noise-multiplier": repr(self.noise_multiplier),
            "sites": json.dumps(list(self.sites)),
        }

    def digest(self) -> str:
        """SHA-256 over the sums and the metadata (tells two releases apart)."""
        h = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.sums, dtype=np.float64).tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> Path:
        """Write sums, prototypes and metadata to ``path`` (safetensors, atomic replace)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        arrays: dict[str, np.ndarray] = {
            SUMS: np.ascontiguousarray(self.sums, dtype=np.float64),
            PROTOTYPES: np.ascontiguousarray(self.prototypes(), dtype=np.float32),
        }
        save_file(arrays, tmp, metadata=self.metadata())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> PrototypeRelease:
        """Read a file written by :meth:`save`."""
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            sums = f.get_tensor(SUMS)
        return cls.from_metadata(sums, meta)

    @classmethod
    def from_metadata(cls, sums: np.ndarray, meta: dict[str, str]) -> PrototypeRelease:
        """The release from its sums and :meth:`metadata` (as a file or a message carries them)."""
        return cls(
            classes=tuple(json.loads(meta["classes"])),
            sums=np.asarray(sums, dtype=np.float64),
            clip=float(meta["clip"]),
            noise_multiplier=float(meta["noise-multiplier"]),
            sites=tuple(json.loads(meta["sites"])),
        )
