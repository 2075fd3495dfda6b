"""The DP plan of one round, as the server sends it and a node checks it against its policy.

Every field is public configuration: none is derived from any site's data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from federation.errors import PlanRefusedError
from federation.node_config import NodeConfig
from models.meta import MetaConfig
from models.networks import BackboneConfig
from privacy.dp_meta import EPISODIC_SENSITIVITY, DPConfig


@dataclass(frozen=True)
class RoundPlan:
    """What a node is asked to run in one round."""

    federation: str  # federation (run) name; with ``round`` it keys the ledger charge
    round: int
    noise_multiplier: float  # sigma applied to the clip C; the accountant sees sigma / 2
    max_grad_norm: float  # C
    sample_rate: float  # q, per-patient Poisson sampling
    steps: int  # local DP steps
    episodes: int  # episodes per step
    ways: int
    max_shots: int
    max_queries: int
    local_lr: float  # Adam learning rate of the local steps
    meta_learner: str
    backbone: str
    width: int
    image_size: int

    def __post_init__(self) -> None:
        if self.round < 1 or self.steps < 1:
            raise ValueError(
                f"RoundPlan: round and steps must be >= 1, got {self.round}, {self.steps}"
            )
        self.dp()  # validates the DP fields
        self.backbone_config()

    def dp(self) -> DPConfig:
        """The DP config the node trains with."""
        return DPConfig(
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            sample_rate=self.sample_rate,
            episodes=self.episodes,
            ways=self.ways,
            max_shots=self.max_shots,
            max_queries=self.max_queries,
        )

    def meta(self) -> MetaConfig:
        """The meta-learner the node trains with."""
        return MetaConfig(learner=self.meta_learner)

    def backbone_config(self) -> BackboneConfig:
        """The network every node and the server build."""
        return BackboneConfig(name=self.backbone, width=self.width, image_size=self.image_size)

    @property
    def accounted_noise_multiplier(self) -> float:
        """Sigma as the accountant sees it (over the episodic sensitivity factor)."""
        return self.noise_multiplier / EPISODIC_SENSITIVITY

    def to_config(self) -> dict[str, Any]:
        """Flat kebab-case mapping, the form a Flower ConfigRecord carries."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> RoundPlan:
        """Inverse of :meth:`to_config`.

        Raises:
            PlanRefusedError: a field is missing or has a wrong type (a malformed plan).
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in values:
                raise PlanRefusedError(f"plan is missing {key}")
            kwargs[f.name] = values[key]
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise PlanRefusedError(f"plan is malformed: {exc}") from exc

    def digest(self) -> str:
        """Stable hash of the plan (part of a reply's replay key)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def check_policy(plan: RoundPlan, config: NodeConfig) -> None:
    """Refuse a plan that the node's own policy does not allow.

    Raises:
        PlanRefusedError: naming the field, the asked value and the node's limit.
    """
    problems = []
    if plan.accounted_noise_multiplier < config.min_noise:
        problems.append(
            f"noise {plan.accounted_noise_multiplier:.3g} (accounted sigma) is below this node's "
            f"minimum {config.min_noise:.3g}"
        )
    if plan.steps > config.max_steps_per_round:
        problems.append(
            f"{plan.steps} steps exceed this node's maximum of "
            f"{config.max_steps_per_round} per round"
        )
    if plan.sample_rate > config.max_sample_rate:
        problems.append(
            f"sample rate {plan.sample_rate:.3g} exceeds this node's maximum "
            f"{config.max_sample_rate:.3g}"
        )
    if problems:
        raise PlanRefusedError(
            f"site {config.site_id} refuses round {plan.round}: " + "; ".join(problems)
        )
