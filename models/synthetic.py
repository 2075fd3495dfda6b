"""Synthetic medical-looking images (lesions on an organ-like background) for tests and the demo.

Everything here is synthetic and named so: class names start with ``synthetic_`` and provenance
with ``synthetic/``. A class is a lesion shape x a lesion texture (8 x 4 = 32 classes). Nuisance
factors vary within a class: organ shape and tint (per patient), lesion position, size, rotation,
contrast and noise (per image), so a few-shot learner must learn shape and texture, not pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.imageset import ImageSet
from models.pipeline import PipelineConfig, preprocess_arrays
from models.readers import patient_id_from_provenance

SHAPES = (
    "disc",
    "ring",
    "ellipse",
    "spiculated",
    "multifocal",
    "crescent",
    "lobulated",
    "streak",
)
TEXTURES = ("bright", "dark", "speckled", "rim")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
# Per-patient acquisition tints (RGB gains): grey scanner, H&E-like pink, fundus-like orange, cool.
_TINTS = np.array([[1.0, 1.0, 1.0], [0.95, 0.7, 0.85], [1.0, 0.75, 0.5], [0.75, 0.9, 1.0]])


def class_names(n_classes: int) -> list[str]:
    """Names of the first ``n_classes`` classes; consecutive classes differ in shape and texture."""
    names = []
    for i in range(n_classes):
        shape, texture = i % len(SHAPES), (i // len(SHAPES) + i) % len(TEXTURES)  # a bijection
        names.append(f"synthetic_{SHAPES[shape]}_{TEXTURES[texture]}")
    return names


@functools.lru_cache(maxsize=16)
def _basis(size: int, cells: int) -> np.ndarray:
    """Gaussian bumps ``(size, cells)`` centred on a coarse grid, rows normalised to unit energy."""
    pos = np.linspace(0.0, 1.0, size)[:, None]
    centres = np.linspace(0.0, 1.0, cells)[None, :]
    basis = np.exp(-(((pos - centres) * (cells - 1)) ** 2))
    return basis / np.sqrt((basis**2).sum(axis=1, keepdims=True))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise with unit variance: a ``cells`` x ``cells`` grid smoothly upsampled."""
    b = _basis(size, cells)
    return b @ rng.standard_normal((cells, cells)) @ b.T


def _soft(signed: np.ndarray, sharpness: float = 25.0) -> np.ndarray:
    """Soft inside-mask from a signed distance (negative inside): partial-volume edges."""
    return 1.0 / (1.0 + np.exp(np.clip(signed * sharpness, -30, 30)))


def _lesion(
    shape: str, yy: np.ndarray, xx: np.ndarray, r: float, theta: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return (mask, rim) in [0, 1] of a lesion centred at the origin of ``yy``/``xx``."""
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    if shape == "disc":
        d = rho - r
    elif shape == "ring":
        d = np.abs(rho - r) - 0.28 * r
    elif shape == "ellipse":
        d = np.hypot(u / 1.8, v * 1.4) - r
    elif shape == "spiculated":
        d = rho - r * (1.0 + 0.45 * np.cos(rng.integers(5, 8) * phi) ** 3)
    elif shape == "multifocal":
        pts = rng.uniform(-1.3 * r, 1.3 * r, size=(rng.integers(3, 6), 2))
        d = np.min([np.hypot(u - py, v - px) for py, px in pts], axis=0) - 0.4 * r
    elif shape == "crescent":
        d = np.maximum(rho - r, 1.15 * r - np.hypot(u - 0.55 * r, v))
    elif shape == "lobulated":
        d = rho - r * (1.0 + 0.18 * np.cos(3 * phi) + 0.1 * np.cos(5 * phi + 1.0))
    else:  # streak: a thin elongated bar
        d = np.maximum(np.abs(v) - 0.22 * r, np.abs(u) - 2.0 * r)
    mask = _soft(d)
    rim = np.exp(-((d / 0.035) ** 2))
    return mask, rim


def _image(
    rng: np.random.Generator, shape: str, texture: str, size: int, patient: dict[str, Any]
) -> np.ndarray:
    """One grey image in [0, 1] of the given class on the patient's organ."""
    ax = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    oy, ox, ry, rx, rot = patient["organ"]
    c, s = np.cos(rot), np.sin(rot)
    u, v = c * (xx - ox) + s * (yy - oy), -s * (xx - ox) + c * (yy - oy)
    organ = _soft(np.hypot(u / rx, v / ry) - 1.0, 12.0)
    tissue = patient["level"] + 0.06 * _smooth_noise(rng, size, 6) + 0.04 * patient["texture"]
    img = 0.08 + organ * (tissue - 0.08)
    # Lesion inside the organ, with per-image position, size, rotation and contrast.
    cy, cx = oy + rng.uniform(-0.35, 0.35) * ry, ox + rng.uniform(-0.35, 0.35) * rx
    r = rng.uniform(0.13, 0.22)
    mask, rim = _lesion(shape, yy - cy, xx - cx, r, rng.uniform(0, 2 * np.pi), rng)
    contrast = rng.uniform(0.22, 0.4)
    if texture == "bright":
        img = img + contrast * mask
    elif texture == "dark":
        img = img - contrast * mask
    elif texture == "speckled":
        speckle = (rng.random((size, size)) < 0.35) * rng.uniform(0.6, 1.0)
        img = img + contrast * mask * (0.3 + speckle)
    else:  # rim-enhanced: bright boundary, slightly dark core
        img = img + contrast * 1.4 * rim * (mask > 0.05) - 0.4 * contrast * mask
    img = img + rng.uniform(0.015, 0.05) * rng.standard_normal((size, size))
    return np.clip(img, 0.0, 1.0)


def synthetic_arrays(
    *,
    n_classes: int = 24,
    per_class: int = 40,
    size: int = 64,
    seed: int = 0,
    images_per_patient: int = 2,
) -> dict[str, np.ndarray]:
    """Generate a synthetic set in the layout of the shared ``.npz`` files.

    Args:
        n_classes: number of classes, 2 to 32.
        per_class: images per class.
        size: image side in pixels (>= 16).
        seed: seed of every random draw; the same arguments give the same arrays.
        images_per_patient: images drawn from each synthetic patient (same class and organ).

    Returns:
        ``images`` uint8 ``(N, size, size, 3)``, ``labels`` int64, ``classes`` str array,
        ``provenance`` str array ``synthetic/patient_<id>.png#img_<j>`` (patient id before ``#``).
    """
    if not 2 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"n_classes must be in [2, {MAX_CLASSES}], got {n_classes}")
    if per_class < 1 or size < 16 or images_per_patient < 1:
        raise ValueError(
            f"need per_class >= 1, size >= 16, images_per_patient >= 1; got {per_class}, {size}, "
            f"{images_per_patient}"
        )
    rng = np.random.default_rng(seed)
    names = class_names(n_classes)
    images = np.empty((n_classes * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), per_class)
    provenance: list[str] = []
    patient_no = 0
    for k, name in enumerate(names):
        _, shape, texture = name.split("_")
        for j in range(per_class):
            if j % images_per_patient == 0:
                patient_no += 1
                patient = {
                    "organ": (
                        rng.uniform(-0.1, 0.1),
                        rng.uniform(-0.1, 0.1),
                        rng.uniform(0.6, 0.85),
                        rng.uniform(0.6, 0.85),
                        rng.uniform(0, np.pi),
                    ),
                    "level": rng.uniform(0.35, 0.55),
                    "texture": _smooth_noise(rng, size, 12),
                    "tint": _TINTS[rng.integers(len(_TINTS))] * rng.uniform(0.9, 1.1, 3),
                }
            grey = _image(rng, shape, texture, size, patient)
            rgb = np.clip(grey[..., None] * patient["tint"], 0.0, 1.0)
            images[k * per_class + j] = np.round(rgb * 255).astype(np.uint8)
            # "#" separates the image within the patient, as in the shared sets' BCCD provenance.
            provenance.append(
                f"synthetic/patient_{patient_no:05d}.png#img_{j % images_per_patient}"
            )
    return {
        "images": images,
        "labels": labels,
        "classes": np.array(names, dtype=str),
        "provenance": np.array(provenance, dtype=str),
    }


def write_synthetic_npz(path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`synthetic_arrays` (same keyword arguments) to a compressed ``.npz``.

    Returns:
        The path written.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = synthetic_arrays(**kwargs)
    np.savez_compressed(p, **arrays)
    return p


def synthetic_imageset(*, config: PipelineConfig = PipelineConfig(), **kwargs: Any) -> ImageSet:
    """Generate a synthetic set and run it through the shared pipeline.

    Args:
        config: preprocessing parameters.
        **kwargs: passed to :func:`synthetic_arrays`.
    """
    return _imageset(synthetic_arrays(**kwargs), config)


def _imageset(arrays: dict[str, np.ndarray], config: PipelineConfig) -> ImageSet:
    return ImageSet(
        images=preprocess_arrays(arrays["images"], config),
        labels=arrays["labels"],
        classes=tuple(str(c) for c in arrays["classes"]),
        patients=np.array([patient_id_from_provenance(s) for s in arrays["provenance"]], dtype=str),
        name="synthetic",
    )


DEMO_CLASSES = 24  # the embedded demo's synthetic set
DEMO_TRAIN_CLASSES = 16  # classes 0-15 train; 16-23 are never seen in training
# Classes 24-31 stand for public data: the operator pre-trains on them, no hospital holds them,
# and they are drawn with their own seed, so they share no patient with the demo's hospitals.
PUBLIC_CLASSES = range(DEMO_CLASSES, MAX_CLASSES)
PUBLIC_SEED = 1
# How the public classes are imaged. "same": like the hospitals' images. "inverted": another
# modality, contrast inverted (as T2- against T1-weighted MRI), the usual situation of a public
# start, which comes from other modalities (bench/federated_real.py): it then has something to
# learn from the hospitals' images.
PUBLIC_MODALITIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda images: images,
    "inverted": lambda images: 255 - images,
}


def demo_sets(
    *, config: PipelineConfig = PipelineConfig(), per_class: int = 40, seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """The demo's synthetic training classes and its unseen evaluation classes."""
    data = synthetic_imageset(config=config, n_classes=DEMO_CLASSES, per_class=per_class, seed=seed)
    train = data.subset_classes(np.arange(DEMO_TRAIN_CLASSES), name="synthetic-train")
    unseen = data.subset_classes(
        np.arange(DEMO_TRAIN_CLASSES, DEMO_CLASSES), name="synthetic-unseen"
    )
    return train, unseen


def public_set(
    *, config: PipelineConfig = PipelineConfig(), per_class: int = 40, modality: str = "same"
) -> ImageSet:
    """The demo's stand-in for public data: synthetic classes that no hospital holds and that the
    demo never evaluates on (:data:`PUBLIC_CLASSES`), imaged as :data:`PUBLIC_MODALITIES` says.

    Raises:
        ValueError: an unknown ``modality``.
    """
    if modality not in PUBLIC_MODALITIES:
        raise ValueError(
            f"public modality must be one of {sorted(PUBLIC_MODALITIES)}, got {modality!r}"
        )
    arrays = synthetic_arrays(n_classes=MAX_CLASSES, per_class=per_class, seed=PUBLIC_SEED)
    arrays["images"] = PUBLIC_MODALITIES[modality](arrays["images"])
    data = _imageset(arrays, config)
    return data.subset_classes(np.array(PUBLIC_CLASSES), name="synthetic-public")
