"""The DP plan of one round, as the server sends it and a node checks it against its policy.

The plan nests the component configs (the mechanism's DP config, ``MetaConfig``,
``BackboneConfig``) as they are; they are built once from the run config
(``ServerConfig.round_plan``). Its flat form, the one place that spells it, is what a Flower
ConfigRecord carries: top-level fields as kebab-case keys (``local-lr``) and component fields
behind the component's prefix (``dp.noise-multiplier``, ``meta.learner``, ``backbone.width``).
Every field is public configuration: none is derived from any site's data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from federation.errors import PlanRefusedError
from federation.node_config import NodeConfig
from federation.secure_aggregation import SecureAggregationConfig, check_secure_policy
from models.meta import MetaConfig
from models.networks import BackboneConfig
from models.run_config import flatten, read_fields
from privacy.dp_config import MechanismConfig
from privacy.errors import UnknownMechanismError
from privacy.mechanisms import Mechanism, get_mechanism


@dataclass(frozen=True)
class RoundPlan:
    """What a node is asked to run in one round."""

    federation: str  # federation (run) name; with ``round`` it keys the ledger charge
    round: int
    mechanism: str  # a name in privacy.mechanisms; the node's policy must allow it
    steps: int  # local DP steps, the number the ledger is charged for
    local_lr: float  # Adam learning rate of the local steps
    dp: MechanismConfig  # noise, clip, sampling: the mechanism's own config type
    meta: MetaConfig  # the meta-learner (used by meta-learning mechanisms)
    backbone: BackboneConfig  # the network every node and the server build
    # Secure aggregation (SecAgg+): off unless the server's run config turns it on.
    secagg: SecureAggregationConfig = dataclasses.field(default_factory=SecureAggregationConfig)

    def __post_init__(self) -> None:
        if self.round < 1 or self.steps < 1:
            raise ValueError(
                f"RoundPlan: round and steps must be >= 1, got {self.round}, {self.steps}"
            )
        if not self.local_lr > 0:
            raise ValueError(f"RoundPlan.local_lr must be > 0, got {self.local_lr!r}")
        try:
            self.dp_mechanism.check_config(self.dp)
        except TypeError as exc:
            raise ValueError(f"RoundPlan.dp: {exc}") from exc
        problems = self.dp_mechanism.plan_problems(steps=self.steps, secure=self.secagg.enabled)
        if problems:
            raise ValueError("RoundPlan: " + "; ".join(problems))

    @property
    def dp_mechanism(self) -> Mechanism:
        """The registered mechanism the plan names."""
        return get_mechanism(self.mechanism)

    @property
    def sensitivity_factor(self) -> float:
        """The ledger charge's sensitivity factor (the mechanism's, over sqrt(min sites) for
        distributed noise: privacy/distributed_noise.py)."""
        return self.dp_mechanism.charge_sensitivity(shares=self.secagg.min_sites)

    @property
    def accounted_noise_multiplier(self) -> float:
        """Sigma as the accountant sees it (over the charge's sensitivity factor)."""
        return self.dp.noise_multiplier / self.sensitivity_factor

    def secure_ranges(self, *, contributors: int, values: int) -> tuple[float, float | None]:
        """SecAgg+'s clipping range for one update of ``values`` values, and the bound on the
        sum of ``contributors`` of them (``None``: the gate's own, from the clip to
        ``secagg.norm_bound``); the mechanism says which (:meth:`Mechanism.secure_ranges`)."""
        return self.dp_mechanism.secure_ranges(
            lr=self.local_lr,
            dp=self.dp,
            norm_bound=self.secagg.norm_bound,
            quantization_range=self.secagg.quantization_range,
            contributors=contributors,
            values=values,
        )

    def to_config(self) -> dict[str, Any]:
        """Flat mapping of scalars, the form a Flower ConfigRecord carries."""
        return flatten(self)

    @classmethod
    def from_config(cls, values: dict[str, Any]) -> RoundPlan:
        """Inverse of :meth:`to_config`; every key must be present and known.

        Raises:
            PlanRefusedError: a key is missing or unknown, a value has a wrong type or is out
                of range, or the mechanism is not one this node knows (a malformed plan).
        """
        try:
            mechanism = get_mechanism(str(values.get("mechanism", "")))
            fields = read_fields(
                cls, values, owner="plan", complete=True,
                components={"dp": mechanism.config_type},
            )  # fmt: skip
            return cls(**fields)
        except UnknownMechanismError as exc:
            raise PlanRefusedError(f"plan names an unknown mechanism: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise PlanRefusedError(f"plan is malformed: {exc}") from exc

    def digest(self) -> str:
        """Stable hash of the plan's flat form (part of a reply's replay key)."""
        return hashlib.sha256(json.dumps(self.to_config(), sort_keys=True).encode()).hexdigest()


def check_policy(plan: RoundPlan, config: NodeConfig) -> None:
    """Refuse a plan that the node's own policy does not allow (before anything is charged).

    Raises:
        PlanRefusedError: naming the field, the asked value and the node's limit.
    """
    check_secure_policy(
        plan.secagg.enabled, config.secure_aggregation, site=config.site_id, round=plan.round
    )
    problems = []
    if plan.mechanism not in config.allowed_mechanisms:
        problems.append(
            f"mechanism {plan.mechanism} is not in this node's allowed-mechanisms "
            f"({', '.join(config.allowed_mechanisms)})"
        )
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
    # A one-shot mechanism has q = 1 by construction (one step over every patient): allowing it
    # accepts that; min-noise and the cap bound its spend, as for every charge.
    if plan.dp.sample_rate > config.max_sample_rate and not plan.dp_mechanism.one_shot:
        problems.append(
            f"sample rate {plan.dp.sample_rate:.3g} exceeds this node's maximum "
            f"{config.max_sample_rate:.3g}"
        )
    if problems:
        raise PlanRefusedError(
            f"site {config.site_id} refuses round {plan.round}: " + "; ".join(problems)
        )
