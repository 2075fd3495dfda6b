"""The trainer of ``dp-episodic-distributed``: DP episodic steps with a plain-SGD update.

Everything but the update rule is ``privacy.dp_meta.DPMetaTrainer`` (sampling, per-episode
gradients, clipping at C, Gaussian noise from its own OS-seeded generator, with the plan's
noise multiplier: under distributed noise, the site's share). Plain SGD makes one step's delta
``-lr (sum_e clip(g_e) + noise) / E``, linear in the noisy sum, so deltas summed over sites are
the sum of their noisy sums (federation/distributed_noise.py); Adam's first step, about
``lr sign(g)``, is not.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from models.imageset import ImageSet
from models.meta import MetaConfig
from privacy.dp_meta import DPMetaTrainer


class LinearDPMetaTrainer(DPMetaTrainer):
    """``DPMetaTrainer`` whose optimiser is plain SGD (same clip, noise and batch size)."""

    def __init__(
        self,
        model: nn.Module,
        sets: Sequence[ImageSet],
        *,
        dp: Any,
        meta: MetaConfig,
        lr: float,
        seed: int | None = None,
    ) -> None:
        super().__init__(model, sets, dp=dp, meta=meta, lr=lr, seed=seed)
        noise_gen = torch.Generator(device=next(model.parameters()).device)
        noise_gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.optimizer = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=lr),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=dp.episodes,
            generator=noise_gen,
        )
