"""DP prototype (class-mean) release, one shot: registered as ``dp-prototypes``.

Mechanism (docs/privacy.md, "DP prototype release"; after DPPL, Wahdany et al., AAAI 2025, with
the patient, not the image, as the unit): embed every image with the frozen global encoder in
eval mode and L2-normalise its feature, ``f_hat = f / ||f||``. A patient i with ``n_i`` images
of the plan's classes contributes the (K, d+1) matrix

    M_i[c] = [C * sum_{j of i, class c} f_hat_j / n_i,  C * n_ic / n_i]

and the node releases ``S = sum_i M_i + N(0, sigma^2 C^2)`` on every entry, once (one step,
every patient: q = 1). Since ``||sum f_hat|| <= n_ic`` and ``sum_c n_ic^2 <= n_i^2``,
``||M_i||_F^2 <= 2 C^2``: adding or removing one patient moves S by at most sqrt(2) C, so the
accountant is stepped with ``sigma / sqrt(2)``. Images of classes outside the vocabulary are
dropped; nothing but S leaves the node (no counts, no class presence).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.imageset import ImageSet
from privacy.dp_config import PROTOTYPE_SENSITIVITY, DPPrototypeConfig
from privacy.prototype_release import SUMS

__all__ = [
    "PROTOTYPE_SENSITIVITY",
    "DPPrototypeConfig",
    "DPPrototypeRelease",
    "class_sums",
    "embed_normalised",
    "noisy_class_sums",
    "vocabulary_labels",
]

EMBED_BATCH = 256  # images per forward pass: bounds memory, changes nothing else


def vocabulary_labels(data: ImageSet, classes: Sequence[str]) -> np.ndarray:
    """Each record's row in the vocabulary ``classes`` (by class name), -1 for a class outside
    it (such records are dropped: removing data cannot raise the sensitivity)."""
    row = {name: i for i, name in enumerate(classes)}
    lookup = np.array([row.get(name, -1) for name in data.classes], dtype=np.int64)
    return lookup[np.asarray(data.labels, dtype=np.int64)]


@torch.no_grad()
def embed_normalised(model: nn.Module, images: np.ndarray, *, batch: int = EMBED_BATCH):
    """L2-normalised features ``(n, d)`` of ``images`` under ``model`` in eval mode (no
    cross-example layer acts, so each feature depends on its own image only)."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(torch.from_numpy(images[s : s + batch]).to(device)).double().cpu()
        for s in range(0, len(images), batch)
    ]
    if not out:
        return torch.zeros(0, int(model.out_features), dtype=torch.float64)  # type: ignore[arg-type]
    # normalised in float64, so ||f_hat|| <= 1 up to 1e-15 (the bound needs it)
    return nn.functional.normalize(torch.cat(out), dim=1, eps=1e-12)


def class_sums(
    features: torch.Tensor,
    labels: torch.Tensor,
    owners: torch.Tensor,
    *,
    n_classes: int,
    clip: float,
) -> torch.Tensor:
    """The noiseless sum ``sum_i M_i`` (K, d+1) of every patient's contribution.

    Args:
        features: ``(n, d)`` image features with norm at most 1 (:func:`embed_normalised`).
        labels: ``(n,)`` vocabulary rows; -1 drops the record before ``n_i`` is counted.
        owners: ``(n,)`` patient index of each record (any non-negative integers).
        n_classes: K, the vocabulary's size.
        clip: C.
    """
    keep = labels >= 0
    features, labels, owners = features[keep], labels[keep], owners[keep]
    sums = torch.zeros(n_classes, features.shape[1] + 1, dtype=torch.float64)
    if len(labels) == 0:
        return sums
    norms = features.double().norm(dim=1)
    if float(norms.max()) > 1 + 1e-9:  # the bound needs ||f_hat|| <= 1: refuse, never rescale
        raise ValueError(f"features must have L2 norm <= 1, got up to {float(norms.max()):.4g}")
    _, owner, per_patient = torch.unique(owners, return_inverse=True, return_counts=True)
    weight = clip / per_patient[owner].double()  # C / n_i for each of patient i's records
    row = torch.cat([features.double().cpu(), torch.ones(len(labels), 1, dtype=torch.float64)], 1)
    sums.index_add_(0, labels.cpu(), row * weight.cpu()[:, None])
    return sums


def noisy_class_sums(
    sums: torch.Tensor, *, noise_multiplier: float, clip: float, generator: torch.Generator
) -> torch.Tensor:
    """``sums + N(0, (sigma C)^2)`` on every entry."""
    noise = torch.normal(
        0.0, noise_multiplier * clip, size=tuple(sums.shape), generator=generator,
        dtype=torch.float64,
    )  # fmt: skip
    return sums + noise


class DPPrototypeRelease:
    """The one-shot release at one site, as a registered mechanism's trainer: ``train(1)``
    computes S and returns it; the model is only read. Charge the ledger first."""

    def __init__(
        self,
        model: nn.Module,
        sets: Sequence[ImageSet],
        *,
        dp: DPPrototypeConfig,
        seed: int | None = None,
    ) -> None:
        """``seed=None`` (production) draws the noise from the OS; a seed is for tests."""
        if dp.sample_rate != 1.0:
            raise ValueError(f"dp-prototypes releases over every patient: q must be 1, got "
                             f"{dp.sample_rate!r}")  # fmt: skip
        self.model = model
        self.sets = list(sets)
        self.dp = dp
        self._generator = torch.Generator()
        self._generator.manual_seed(seed if seed is not None else secrets.randbits(63))

    def noiseless_sums(self) -> torch.Tensor:
        """``sum_i M_i`` over the sites' sets; a patient id seen in several sets is one patient
        (its records are pooled: conservative when two people share an id)."""
        rows_of = [vocabulary_labels(s, self.dp.classes) for s in self.sets]
        kept = [(s, rows, rows >= 0) for s, rows in zip(self.sets, rows_of, strict=True)]
        images = [s.images[k] for s, _, k in kept]
        features = [embed_normalised(self.model, x) for x in images if len(x)]
        width = int(self.model.out_features)  # type: ignore[arg-type]
        patients = np.concatenate([np.asarray(s.patients)[k].astype(str) for s, _, k in kept])
        _, owners = np.unique(patients, return_inverse=True)
        return class_sums(
            torch.cat(features) if features else torch.zeros(0, width, dtype=torch.float64),
            torch.from_numpy(np.concatenate([rows[k] for _, rows, k in kept])),
            torch.from_numpy(owners.astype(np.int64)),
            n_classes=len(self.dp.classes),
            clip=self.dp.max_grad_norm,
        )

    def release(self) -> np.ndarray:
        """S: the noisy sums, (K, d+1) float32."""
        noisy = noisy_class_sums(
            self.noiseless_sums(),
            noise_multiplier=self.dp.noise_multiplier,
            clip=self.dp.max_grad_norm,
            generator=self._generator,
        )
        return noisy.numpy().astype(np.float32)

    def train(
        self, steps: int, *, on_step: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """The release, ``{SUMS: S}``; one shot, so ``steps`` must be the 1 step charged.

        Raises:
            ValueError: ``steps`` is not 1 (a second release would need a second charge).
        """
        if steps != 1:
            raise ValueError(f"dp-prototypes is a one-shot release: steps must be 1, got {steps}")
        released = {SUMS: self.release()}
        if on_step is not None:
            on_step(0)
        return released
