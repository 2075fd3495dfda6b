"""The registry of fedfew's DP mechanisms: ``{name: Mechanism}``.

A mechanism is everything a site needs to charge its ledger for a run and then run it: the L2
sensitivity of its clipped sum in units of C (the accountant is stepped with ``sigma /
sensitivity``, docs/privacy.md "History"), the type of its DP config, and a builder that makes
its trainer from a model, the site's data and the config. The ledger entry's ``mechanism`` field
is the registry name, so every charge says which proof it relies on.

A new mechanism is one :func:`register_mechanism` call with its proof in docs/privacy.md and a
property test of its sensitivity. Importing this module does not import torch: builders import
their trainers when called.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from privacy.dp_config import (
    EPISODIC_SENSITIVITY,
    PROTOTYPE_SENSITIVITY,
    SUPERVISED_SENSITIVITY,
    WITHIN_CLASS_SENSITIVITY,
    DPConfig,
    DPPretrainConfig,
    DPPrototypeConfig,
    DPWithinClassConfig,
    MechanismConfig,
)
from privacy.errors import UnknownMechanismError

if TYPE_CHECKING:
    from torch import nn

    from models.imageset import ImageSet
    from models.meta import MetaConfig

EPISODIC = "dp-episodic"
SUPERVISED = "dp-supervised"
DISTRIBUTED = "dp-episodic-distributed"  # privacy/distributed_noise.py: its share and bounds
PROTOTYPES = "dp-prototypes"  # one-shot release of noisy class sums (privacy/dp_prototypes.py)
# a release per round: the domain's centre, then its within-class moments
# (privacy/within_class_release.py)
WITHIN_CLASS = "dp-within-class"
DEFAULT_MECHANISM = EPISODIC  # the mechanism the accuracy-vs-epsilon benchmarks chose
# What leaves a node, by a mechanism's kind of output (also the reply's record key):
OUTPUT_DELTA = "delta"  # theta_local - theta_global: post-processing of the DP steps
OUTPUT_RELEASE = "release"  # the arrays the trainer returns (a one-shot release)


class Trainer(Protocol):
    """Trains the model it was built with, in place, for exactly the charged steps."""

    def train(self, steps: int, *, on_step: Callable[[int], None] | None = None) -> object:
        """Run ``steps`` DP steps."""


class TrainerBuilder(Protocol):
    """Makes a mechanism's trainer. Call it only after the ledger accepted the charge."""

    def __call__(
        self,
        model: nn.Module,
        sets: Sequence[ImageSet],
        *,
        dp: Any,
        meta: MetaConfig,
        lr: float,
        seed: int | None,
    ) -> Trainer:
        """``seed=None`` (production) draws keys and noise from the OS; a seed is for tests."""


@dataclass(frozen=True)
class Mechanism:
    """One registered DP mechanism."""

    name: str  # what the ledger's ``mechanism`` field and the round plan say
    sensitivity: float  # L2 sensitivity of the clipped sum in units of C
    config_type: type  # its DP config dataclass (a MechanismConfig)
    build_trainer: TrainerBuilder
    description: str  # one line for ledgers, reports and dashboards
    # One step over every patient (q = 1): a plan for it asks exactly 1 step, and the sampling
    # limit of a node's policy does not apply (listing it in allowed-mechanisms accepts q = 1).
    one_shot: bool = False
    # What leaves the node: False, the model delta; True, the arrays ``train`` returns (a
    # release the server sums; the global model's weights are left as they are).
    releases_arrays: bool = False
    # Distributed noise (privacy/distributed_noise.py): each site adds a 1/sqrt(k) share of the
    # noise and only the SecAgg+ sum of >= k sites carries all of it. Such a mechanism runs only
    # under secure aggregation, one linear step per round, and its update is not clipped before
    # masking (the sum must stay the sum of the noisy sums).
    distributed: bool = False
    # The registered mechanism that runs this one with distributed noise ("": none), what a run
    # config's distributed-noise = true switches to.
    distributed_variant: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name.strip() != self.name:
            raise ValueError(f"Mechanism.name must be a non-empty word, got {self.name!r}")
        if not self.sensitivity > 0:
            raise ValueError(f"Mechanism.sensitivity must be > 0, got {self.sensitivity!r}")

    def accounted_noise_multiplier(self, noise_multiplier: float) -> float:
        """Sigma as the accountant sees it: noise over this mechanism's sensitivity."""
        return noise_multiplier / self.sensitivity

    def noise_for(self, accounted_noise_multiplier: float) -> float:
        """The sigma (as applied to C) that gives ``accounted_noise_multiplier``."""
        return accounted_noise_multiplier * self.sensitivity

    @property
    def output(self) -> str:
        """What leaves the node: :data:`OUTPUT_RELEASE` or :data:`OUTPUT_DELTA`."""
        return OUTPUT_RELEASE if self.releases_arrays else OUTPUT_DELTA

    def reply_arrays(
        self,
        trained: object,
        *,
        model: Mapping[str, np.ndarray],
        start: Mapping[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """What leaves the node after the trainer ran: the arrays ``train`` returned (a
        release), or the delta ``model - start`` in ``start``'s dtypes.

        Raises:
            TypeError: a releasing trainer returned something other than numpy arrays (a bug).
        """
        if not self.releases_arrays:
            # np.asarray: a 0-d tensor's difference is a numpy scalar (BatchNorm's counter)
            return {k: np.asarray(model[k] - start[k], dtype=start[k].dtype) for k in model}
        if not isinstance(trained, dict) or not all(
            isinstance(v, np.ndarray) for v in trained.values()
        ):
            raise TypeError(f"{self.name}'s trainer must return its release as numpy arrays")
        return {str(k): np.ascontiguousarray(v) for k, v in trained.items()}

    @property
    def clips_before_masking(self) -> bool:
        """Whether a site clips its update to the plan's bound before SecAgg+ masks it (every
        mechanism but a distributed-noise one, whose sum must stay the sum of noisy sums)."""
        return not self.distributed

    def charge_sensitivity(self, *, shares: int) -> float:
        """The ledger's ``sensitivity_factor`` of a charge: the sensitivity, over
        ``sqrt(shares)`` for distributed noise (the sum carries ``shares`` noise shares)."""
        return self.sensitivity / math.sqrt(shares) if self.distributed else self.sensitivity

    def site_noise(self, noise_multiplier: float, *, shares: int) -> float:
        """The sigma each site adds for a sum that carries ``noise_multiplier``: all of it, or
        its ``1/sqrt(shares)`` share under distributed noise."""
        return noise_multiplier / math.sqrt(shares) if self.distributed else noise_multiplier

    def plan_problems(self, *, steps: int, secure: bool) -> list[str]:
        """What is wrong with running this mechanism ``steps`` steps a round, with or without
        secure aggregation (an empty list: nothing)."""
        problems = []
        if self.one_shot and steps != 1:
            problems.append(f"{self.name} is a one-shot release: steps must be 1, got {steps}")
        if self.releases_arrays and secure:
            problems.append(
                f"{self.name} releases its own arrays, which secure aggregation does not carry "
                "yet: turn secure-aggregation off"
            )
        if self.distributed and (not secure or steps != 1):
            problems.append(
                f"{self.name} needs secure aggregation and exactly 1 step per round (its sum is "
                f"private only then), got secagg.enabled={secure} and steps={steps}"
            )
        return problems

    def secure_ranges(
        self,
        *,
        lr: float,
        dp: MechanismConfig,
        norm_bound: float,
        quantization_range: int,
        contributors: int,
        values: int,
    ) -> tuple[float, float | None]:
        """SecAgg+'s clipping range for one update, and the bound on the sum of
        ``contributors`` updates of ``values`` values: ``(norm_bound, None)`` (each site clips
        its update to the plan's bound, the gate bounds the sum by it), or under distributed
        noise the ranges of :func:`privacy.distributed_noise.secure_ranges`."""
        if not self.distributed:
            return norm_bound, None
        from privacy.distributed_noise import secure_ranges

        return secure_ranges(
            lr=lr,
            clip=dp.max_grad_norm,
            share=dp.noise_multiplier,
            episodes=int(getattr(dp, "episodes", 1)),
            quantization_range=quantization_range,
            contributors=contributors,
            values=values,
        )

    def dp_config(self, values: Mapping[str, Any]) -> MechanismConfig:
        """This mechanism's DP config from a run's DP values.

        ``values`` may hold the fields of other registered mechanisms' configs too (one run
        config serves whichever mechanism it names): those are left to them. A key that no
        registered mechanism's config has is a mistake, and an error.

        Raises:
            ValueError: a key no DP config has, or a value out of range (naming the field).
        """
        known = {f.name for f in dataclasses.fields(self.config_type)}
        everyone = {f.name for m in _REGISTRY.values() for f in dataclasses.fields(m.config_type)}
        unknown = sorted(set(values) - everyone - known)
        if unknown:
            raise ValueError(
                f"DP config: unknown key(s) {', '.join(unknown)}; the registered mechanisms' "
                f"configs have {', '.join(sorted(everyone | known))}"
            )
        config: MechanismConfig = self.config_type(
            **{k: v for k, v in values.items() if k in known}
        )
        return config

    def check_config(self, dp: object) -> None:
        """Raise ``TypeError`` unless ``dp`` is this mechanism's config type."""
        if not isinstance(dp, self.config_type):
            raise TypeError(
                f"mechanism {self.name} takes a {self.config_type.__name__}, "
                f"got {type(dp).__name__}"
            )


_REGISTRY: dict[str, Mechanism] = {}
MECHANISMS: Mapping[str, Mechanism] = MappingProxyType(_REGISTRY)  # read-only view


def register_mechanism(mechanism: Mechanism) -> Mechanism:
    """Add a mechanism to the registry.

    Raises:
        ValueError: the name is already registered.
    """
    if mechanism.name in _REGISTRY:
        raise ValueError(f"DP mechanism {mechanism.name!r} is already registered")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def get_mechanism(name: str) -> Mechanism:
    """The registered mechanism called ``name``.

    Raises:
        UnknownMechanismError: no such mechanism (the message lists the registered ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMechanismError(name, sorted(_REGISTRY)) from None


def describe(name: str) -> str:
    """A mechanism's one-line description; for a name no longer registered (an old ledger
    row), says so instead of failing."""
    mechanism = _REGISTRY.get(name)
    return mechanism.description if mechanism else f"{name} (not a mechanism of this version)"


def _episodic_trainer(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    dp: Any,
    meta: MetaConfig,
    lr: float,
    seed: int | None,
    linear: bool = False,
) -> Trainer:
    import torch

    from privacy.dp_meta import DPMetaTrainer

    # linear=True (distributed noise): plain SGD, so one step's delta -lr (sum_e clip(g_e) +
    # noise) / E is linear in the noisy sum and deltas summed over sites are the sum of their
    # noisy sums; Adam's first step, about lr sign(g), is not.
    base = torch.optim.SGD if linear else torch.optim.Adam
    return DPMetaTrainer(model, sets, dp=dp, meta=meta, lr=lr, seed=seed, base_optimizer=base)


def _supervised_trainer(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    dp: Any,
    meta: MetaConfig,
    lr: float,
    seed: int | None,
) -> Trainer:
    from privacy.dp_supervised import DPPretrainer

    del meta  # supervised training has no meta-learner: the head is a linear classifier
    return DPPretrainer(model, sets, dp=dp, lr=lr, seed=seed)


def _prototype_release(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    dp: Any,
    meta: MetaConfig,
    lr: float,
    seed: int | None,
) -> Trainer:
    from privacy.dp_prototypes import DPPrototypeRelease

    del meta, lr  # nothing is trained: the frozen encoder only embeds
    return DPPrototypeRelease(model, sets, dp=dp, seed=seed)


def _within_class_release(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    dp: Any,
    meta: MetaConfig,
    lr: float,
    seed: int | None,
) -> Trainer:
    from privacy.within_class_release import WithinClassRelease

    del meta, lr  # nothing is trained: the frozen encoder's features are summed
    return WithinClassRelease(model, sets, dp=dp, seed=seed)


register_mechanism(
    Mechanism(
        name=EPISODIC,
        sensitivity=EPISODIC_SENSITIVITY,
        config_type=DPConfig,
        build_trainer=_episodic_trainer,
        description="DP episodic meta-training: per-episode clipping, one patient in one "
        "episode, sensitivity 2C",
        distributed_variant=DISTRIBUTED,
    )
)
register_mechanism(
    Mechanism(
        name=SUPERVISED,
        sensitivity=SUPERVISED_SENSITIVITY,
        config_type=DPPretrainConfig,
        build_trainer=_supervised_trainer,
        description="DP supervised training: per-patient clipping of a classifier's "
        "gradients, sensitivity C",
    )
)
register_mechanism(
    Mechanism(
        name=DISTRIBUTED,
        sensitivity=EPISODIC_SENSITIVITY,
        config_type=DPConfig,
        build_trainer=functools.partial(_episodic_trainer, linear=True),
        description="DP episodic meta-training with distributed noise under SecAgg+: one "
        "plain-SGD step per round, each site adds sigma/sqrt(k) of the noise, the sum of "
        ">= k sites carries sigma (sensitivity 2C)",
        distributed=True,
    )
)
register_mechanism(
    Mechanism(
        name=PROTOTYPES,
        sensitivity=PROTOTYPE_SENSITIVITY,
        config_type=DPPrototypeConfig,
        build_trainer=_prototype_release,
        description="DP prototype release, one shot: per-patient normalised class sums of "
        "frozen-encoder features, sensitivity sqrt(2)C",
        one_shot=True,
        releases_arrays=True,
    )
)
register_mechanism(
    Mechanism(
        name=WITHIN_CLASS,
        sensitivity=WITHIN_CLASS_SENSITIVITY,
        config_type=DPWithinClassConfig,
        build_trainer=_within_class_release,
        description="DP within-class covariance release, one per round over every patient: the "
        "domain's centre, then within-class moments in a public basis, sensitivity "
        "sqrt(1.125)C",
        one_shot=True,
        releases_arrays=True,
    )
)
