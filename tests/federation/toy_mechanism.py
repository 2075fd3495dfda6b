"""A toy DP mechanism, written as a new mechanism would be: its config and its trainer, in one file.

Registering it is the one other line (tests/federation/test_toy_mechanism.py):
``register_mechanism(TOY)``. Its update is Gaussian noise alone, ``lr * N(0, (sigma C)^2)`` per
parameter and step: it reads no data, so it is private for any sigma, and its sensitivity is
declared as C so that the ledger charges it like a per-patient mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from models.imageset import ImageSet
from models.meta import MetaConfig
from privacy.dp_config import DEFAULT_SAMPLE_RATE
from privacy.mechanisms import Mechanism

NAME = "dp-toy-noise"


@dataclass(frozen=True)
class ToyConfig:
    """The three numbers every mechanism's config has (privacy.dp_config.MechanismConfig)."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    sample_rate: float = DEFAULT_SAMPLE_RATE

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


class ToyTrainer:
    """Moves every parameter by ``lr`` times Gaussian noise of standard deviation sigma C."""

    def __init__(self, model: nn.Module, *, dp: ToyConfig, lr: float, seed: int | None) -> None:
        self.model, self.dp, self.lr = model, dp, lr
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)

    def train(self, steps: int, *, on_step: Callable[[int], None] | None = None) -> None:
        """Run ``steps`` noise steps."""
        std = self.dp.noise_multiplier * self.dp.max_grad_norm
        with torch.no_grad():
            for step in range(steps):
                for p in self.model.parameters():
                    p.add_(self.lr * std * torch.randn(p.shape, generator=self.generator))
                if on_step is not None:
                    on_step(step + 1)


def build_toy(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    dp: Any,
    meta: MetaConfig,
    lr: float,
    seed: int | None,
) -> ToyTrainer:
    """The toy's trainer (``sets`` and ``meta`` unused: it reads no data)."""
    del sets, meta
    return ToyTrainer(model, dp=dp, lr=lr, seed=seed)


TOY = Mechanism(
    name=NAME,
    sensitivity=1.0,
    config_type=ToyConfig,
    build_trainer=build_toy,
    description="toy: Gaussian noise alone, reads no data (a test of the extension point)",
)
