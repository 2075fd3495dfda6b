"""The DP configs of fedfew's mechanisms: plain frozen dataclasses, importable without torch.

Every field is public configuration, never derived from the private data (DESIGN.md section 4,
egress rule). ``noise_multiplier`` is always sigma as applied to the clip C; what the accountant is
stepped with is sigma over the mechanism's sensitivity factor (``privacy.mechanisms``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

# L2 sensitivity of each mechanism's clipped sum, in units of the clip C (proofs: docs/privacy.md).
EPISODIC_SENSITIVITY = 2.0  # one patient moves one episode's clipped gradient: ||a - b|| <= 2C
SUPERVISED_SENSITIVITY = 1.0  # one patient adds or removes one clipped per-patient gradient
# One patient adds or removes one (K, d+1) contribution of Frobenius norm <= sqrt(2) C.
PROTOTYPE_SENSITIVITY = math.sqrt(2.0)
# dp-within-class (privacy/within_class_release.py): a patient's moments have Frobenius norm
# <= C and its class sums, weighted by WITHIN_CLASS_SUMS_WEIGHT, <= sqrt(2) w C; its centre
# contribution is scaled to the same bound.
WITHIN_CLASS_SUMS_WEIGHT = 0.25
WITHIN_CLASS_SENSITIVITY = math.sqrt(1.0 + 2.0 * WITHIN_CLASS_SUMS_WEIGHT**2)
CLASS_SEPARATOR = ","  # between class names in a run config's vocabulary string
# q, each patient's chance to join a step, wherever a sampled mechanism is configured (a
# mechanism's config, the server's run config): small enough for a good amplification by
# subsampling, large enough for a signal at a few hundred patients per site.
DEFAULT_SAMPLE_RATE = 0.1


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
    sample_rate: float = DEFAULT_SAMPLE_RATE  # q: each patient joins a step with this probability
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
    sample_rate: float = DEFAULT_SAMPLE_RATE  # q per patient
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


@dataclass(frozen=True)
class DPPrototypeConfig:
    """Noise, clip and class vocabulary of the one-shot DP prototype release (``dp-prototypes``).

    The vocabulary is public: the federation names the conditions it releases prototypes for, and
    its order is the row order of the release. Sampling is not part of this mechanism: every
    patient is in its single step, so ``sample_rate`` must be 1.
    """

    noise_multiplier: float  # sigma as applied to C; the accountant sees sigma / sqrt(2)
    max_grad_norm: float = 1.0  # C: a patient's contribution has Frobenius norm <= sqrt(2) C
    sample_rate: float = 1.0  # q: one step over every patient (no subsampling); must be 1
    classes: tuple[str, ...] = ()  # the public class vocabulary, one release row per class

    def __post_init__(self) -> None:
        checks = {
            "noise_multiplier": self.noise_multiplier > 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "sample_rate": self.sample_rate == 1.0,
        }
        _check(type(self).__name__, checks, self)
        names = [str(c) for c in self.classes]
        bad = [c for c in names if not c.strip() or c.strip() != c or CLASS_SEPARATOR in c]
        if not names or bad or len(set(names)) != len(names):
            raise ValueError(
                f"{type(self).__name__}.classes must name one or more distinct classes (no empty "
                f"names, no {CLASS_SEPARATOR!r}), got {self.classes!r}"
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return {**asdict(self), "classes": list(self.classes)}


@dataclass(frozen=True)
class DPWithinClassConfig(DPPrototypeConfig):
    """Noise, clip and class vocabulary of the within-class covariance release
    (``dp-within-class``): one release per round over every patient (``sample_rate`` 1), the
    domain's centre in the first round, within-class moments around it in the next ones. The
    accountant sees sigma / WITHIN_CLASS_SENSITIVITY."""


@dataclass(frozen=True)
class DPSettings:
    """A run's DP values, whichever registered mechanism it names (run-config keys ``dp.*``).

    The fields carry the names of the mechanisms' own config fields, so a mechanism takes its
    config from them by name (:meth:`privacy.mechanisms.Mechanism.dp_config`); the server adds
    only the per-site noise and, for a one-shot release, ``sample_rate`` 1.
    """

    noise_multiplier: float = 2.0  # sigma applied to C (dp-episodic accounts sigma / 2)
    max_grad_norm: float = 1.0  # C, the per-episode (or per-patient) clip
    sample_rate: float = DEFAULT_SAMPLE_RATE  # q, per-patient Poisson rate at every site
    episodes: int = 8  # dp-episodic: episodes per DP step
    ways: int = 3  # dp-episodic: classes per training episode
    max_shots: int = 5
    max_queries: int = 5
    expected_patients: int = 64  # dp-supervised: the public normaliser B (about q x site size)
    augmentations: int = 1  # dp-supervised: augmented copies averaged per record before clipping
    # dp-prototypes, dp-within-class: the public class vocabulary, comma-separated
    # ("nevus,melanoma"; a run config holds scalars only); its order is every release's rows.
    classes: str = ""
    # dp-prototypes: the federation's public upper bound on one site's patients; a release
    # longer than it allows (sqrt(2) C per patient plus noise) is rejected by the server's gate.
    max_site_patients: int = 100_000

    def __post_init__(self) -> None:
        checks = {
            "noise_multiplier": math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0,
            "max_grad_norm": math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            "sample_rate": 0 < self.sample_rate <= 1,
            "episodes": self.episodes >= 1,
            "max_site_patients": self.max_site_patients >= 1,
        }
        _check("DPSettings", checks, self)

    def mechanism_values(self) -> dict[str, object]:
        """The values a mechanism's config may take, by field name (the server's own bound
        ``max_site_patients`` left out, the vocabulary as a tuple)."""
        values: dict[str, object] = asdict(self)
        del values["max_site_patients"]
        values["classes"] = parse_classes(self.classes)
        return values


def parse_classes(text: str) -> tuple[str, ...]:
    """A vocabulary written as one string, ``"nevus,melanoma"``, as a tuple of names."""
    return tuple(c.strip() for c in text.split(CLASS_SEPARATOR) if c.strip())
