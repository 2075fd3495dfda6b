"""The DP configs of fedfew's mechanisms: plain frozen dataclasses, importable without torch.

Every field is public configuration, never derived from the private data (DESIGN.md section 4,
egress rule). ``noise_multiplier`` is always sigma as applied to the clip C; what the accountant is
stepped with is sigma over the mechanism's sensitivity factor (``privacy.mechanisms``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

# L2 sensitivity of each mechanism's clipped sum, in units of the clip C (proofs: docs/privacy.md).
EPISODIC_SENSITIVITY = 2.0  # one patient moves one episode's clipped gradient: ||a - b|| <= 2C
SUPERVISED_SENSITIVITY = 1.0  # one patient adds or removes one clipped per-patient gradient


class MechanismConfig(Protocol):
    """What every mechanism's DP config has: the three numbers a node's policy checks."""

    @property
    def noise_multiplier(self) -> float:
        """Sigma as applied to C."""

    @property
    def max_grad_norm(self) -> float:
        """C."""

    @property
    def sample_rate(self) -> float:
        """q: each patient joins a step with this probability."""

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""


def _check(owner: str, checks: dict[str, bool], config: object) -> None:
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{owner}.{name} is out of range: {getattr(config, name)!r}")


@dataclass(frozen=True)
class DPConfig:
    """Noise, clipping, sampling and episode shapes of DP episodic meta-training."""

    noise_multiplier: float  # sigma as applied to C; the accountant sees sigma / 2
    max_grad_norm: float = 1.0  # C; with Adam only the signal-to-noise ratio matters
    sample_rate: float = 0.1  # q: each patient joins a step with this probability
    episodes: int = 8  # E: constant normaliser and vmap width; 8 fits CPU memory at 64x64
    ways: int = 3  # N: classes per planned episode (the shared sets have 3-8 classes)
    max_shots: int = 5  # support records kept per class per episode (fixed tensor shapes)
    max_queries: int = 5  # query records kept per class per episode
    support_fraction: float = 0.5  # probability a sampled patient plays support

    def __post_init__(self) -> None:
        checks = {
            "noise_multiplier": self.noise_multiplier > 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "sample_rate": 0 < self.sample_rate <= 1,
            "episodes": self.episodes >= 1,
            "ways": self.ways >= 2,
            "max_shots": self.max_shots >= 1,
            "max_queries": self.max_queries >= 1,
            "support_fraction": 0 < self.support_fraction < 1,
        }
        _check("DPConfig", checks, self)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with the model."""
        return asdict(self)


@dataclass(frozen=True)
class DPPretrainConfig:
    """Noise, clipping and sampling of DP supervised training with per-patient clipping."""

    noise_multiplier: float  # sigma as applied to C (= the accounted multiplier: sensitivity C)
    max_grad_norm: float = 1.0  # C
    sample_rate: float = 0.05  # q per patient
    expected_patients: int = 64  # B: the constant normaliser, q x (configured site size)
    chunk: int = 128  # records per vmap call: bounds memory, changes nothing else
    augmentations: int = 1  # K: a record's gradient is the mean over K augmented copies

    def __post_init__(self) -> None:
        checks = {
            "noise_multiplier": self.noise_multiplier > 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "sample_rate": 0 < self.sample_rate <= 1,
            "expected_patients": self.expected_patients >= 1,
            "chunk": self.chunk >= 1,
            "augmentations": self.augmentations >= 1,
        }
        _check("DPPretrainConfig", checks, self)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)
