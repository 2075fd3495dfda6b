"""DP supervised training with per-patient clipping, on Opacus's ``DPOptimizer``.

Registered as ``dp-supervised`` (``privacy.mechanisms``): supervised pre-training or fine-tuning
of a backbone. Mechanism (docs/privacy.md, "DP supervised training"): Poisson-sample patients at
rate q; per-record gradients of the cross-entropy of a classifier over the union of the site's
classes (``torch.func.vmap(grad)``), summed per patient, each patient's sum clipped to C; update
``(sum_p clip(g_p) + N(0, sigma^2 C^2 I)) / B`` with B the configured (public) expected number of
patients per step. One patient changes one clipped term: sensitivity C, accountant sigma.

Two choices raise the signal without touching the proof. The head starts at zero, so the first
steps move only the head and the encoder is not pushed towards a random head's classes (linear
probing, then fine-tuning, in one run). With ``augmentations`` K > 1, each record's gradient is
the mean over K augmented copies before the patient's sum is clipped (augmentation multiplicity,
De et al. 2022): it still depends on that patient's records only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import functional_call, grad, vmap

from models.augment import augment_batch
from models.imageset import ImageSet
from models.meta import cross_entropy
from privacy.dp_config import SUPERVISED_SENSITIVITY, DPPretrainConfig
from privacy.dp_meta import augment_seed_of, merge_sets
from privacy.sampling import fresh_key, poisson_sample

__all__ = [
    "SUPERVISED_SENSITIVITY",
    "Classifier",
    "DPPretrainConfig",
    "DPPretrainer",
    "per_patient_grads",
]


class Classifier(nn.Module):
    """Backbone plus a zero-initialised linear head over the union of classes (the head is
    discarded after; at zero, the encoder's first gradients vanish until the head has learnt)."""

    def __init__(self, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.out_features), n_classes)  # type: ignore[arg-type]
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores."""
        return self.head(self.backbone(x))


def per_patient_grads(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    owner: torch.Tensor,
    n_patients: int,
    *,
    chunk: int,
) -> dict[str, torch.Tensor]:
    """Per-record gradients (``vmap(grad)``) summed per patient: ``{name: (patients, *shape)}``,
    for the trainable parameters only (frozen ones stay the module's own, as constants)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_record = vmap(grad(loss), in_dims=(None, 0, 0))
    out = {k: torch.zeros(n_patients, *v.shape, device=v.device) for k, v in params.items()}
    for start in range(0, len(x), chunk):
        grads = per_record(params, x[start : start + chunk], y[start : start + chunk])
        for k, g in grads.items():
            out[k].index_add_(0, owner[start : start + chunk], g)
    return out


class DPPretrainer:
    """DP supervised pre-training of a backbone on one site's sets. Charge the ledger first."""

    def __init__(
        self,
        backbone: nn.Module,
        sets: Sequence[ImageSet],
        *,
        dp: DPPretrainConfig,
        lr: float = 1e-3,
        augment: bool = True,
        seed: int | None = None,
    ) -> None:
        """``seed=None`` (production) draws keys and noise from the OS; a seed is for tests."""
        self.data, _ = merge_sets(sets)
        device = next(backbone.parameters()).device
        self.model = Classifier(backbone, len(self.data.classes)).to(device)
        self.dp = dp
        self.augment = augment
        self._rng = np.random.default_rng(seed) if seed is not None else None
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.optimizer = DPOptimizer(
            torch.optim.Adam(self.model.parameters(), lr=lr),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=dp.expected_patients,
            generator=generator,
        )
        self._unique = np.unique(self.data.patients)

    def clipped_inputs(self, key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Records of the patients sampled under ``key``: images, labels, patient index, count."""
        chosen = self._unique[
            poisson_sample(self._unique, sample_rate=self.dp.sample_rate, key=key)
        ]
        records = np.flatnonzero(np.isin(self.data.patients, chosen))
        _, owner = np.unique(self.data.patients[records], return_inverse=True)
        device = next(self.model.parameters()).device
        x = torch.from_numpy(self.data.images[records])
        copies = self.dp.augmentations if self.augment else 1
        if self.augment and len(records):
            seed = augment_seed_of(key)
            x = torch.cat([augment_batch(x, seed=(seed + k) % (2**31 - 1)) for k in range(copies)])
        return (
            x.to(device),
            torch.from_numpy(np.tile(self.data.labels[records], copies)).to(device),
            torch.from_numpy(np.tile(owner.astype(np.int64), copies)).to(device),
            len(chosen),
        )

    def patient_gradients(self, key: int) -> dict[str, torch.Tensor]:
        """Unclipped per-patient gradients of the step drawn under ``key``:
        ``{name: (patients, *shape)}``, each record's term averaged over its augmented copies."""
        x, y, owner, n = self.clipped_inputs(key)
        grads = per_patient_grads(self.model, x, y, owner, n, chunk=self.dp.chunk)
        copies = self.dp.augmentations if self.augment else 1
        return {k: g / copies for k, g in grads.items()} if copies > 1 else grads

    def step(self) -> None:
        """One DP step: sample patients, per-patient gradients, clip, noise, update."""
        key = fresh_key() if self._rng is None else int(self._rng.integers(2**63))
        grads = self.patient_gradients(key)
        for name, p in self.model.named_parameters():
            if p.requires_grad:  # frozen parameters are neither differentiated nor noised
                p.grad_sample = grads[name]  # type: ignore[attr-defined]  # Opacus reads it
        self.optimizer.step()
        self.optimizer.zero_grad()

    def train(self, steps: int, *, on_step: Callable[[int], None] | None = None) -> nn.Module:
        """Run ``steps`` steps (as charged) and return the trained backbone."""
        self.model.train()
        for i in range(steps):
            self.step()
            if on_step is not None:
                on_step(i)
        return self.model.backbone
