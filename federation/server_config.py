"""The federation's configuration as the ServerApp reads it from Flower's run config.

One config tree: the round and quorum scalars at the top, and one component per concern, each
behind its prefix in the flat run config (a TOML table in ``run.toml``): ``dp`` (every DP value a
registered mechanism's config takes, by the same names), ``backbone`` (``BackboneConfig``),
``meta`` (``MetaConfig``), ``aggregation``, ``secagg`` and ``eval``. ``models/run_config.py``
reads and writes it strictly: a misspelt or mistyped key is an error naming it. The round
plan's components are built from it in one place (:meth:`ServerConfig.round_plan`). Every value
is public configuration.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.aggregation import DEFENCES
from federation.plan import RoundPlan
from federation.secure_aggregation import SecureAggregationConfig
from federation.validation import NORM_POLICIES
from models.meta import MetaConfig
from models.networks import BackboneConfig
from models.run_config import flatten, read_fields
from privacy.dp_config import DPSettings
from privacy.mechanisms import DEFAULT_MECHANISM, MECHANISMS, get_mechanism

OWNER = "run config"  # what the server's configuration is called in its error messages


def _positive(owner: str, config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{owner}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class AggregationConfig:
    """How the server combines accepted deltas (run-config keys ``aggregation.*``)."""

    server_lr: float = 1.0  # outer learning rate on the averaged delta (1: plain FedAvg)
    update_norm_bound: float = 0.0  # 0: local_lr * steps * sqrt(#params) * 3 (Adam's reach)
    norm_policy: str = "clip"  # clip or reject deltas over the bound
    defence: str = "none"  # a key of federation.aggregation.DEFENCES
    trim: int = 1  # values dropped per end by trimmed-mean
    byzantine: int = 1  # f assumed by Krum

    def __post_init__(self) -> None:
        _positive("AggregationConfig", self, ("server_lr",))
        if self.update_norm_bound < 0:
            raise ValueError("AggregationConfig.update_norm_bound must be >= 0")
        if self.norm_policy not in NORM_POLICIES:
            raise ValueError(f"AggregationConfig.norm_policy must be one of {NORM_POLICIES}")
        if self.defence not in DEFENCES:
            raise ValueError(
                f"AggregationConfig.defence must be one of {sorted(DEFENCES)}, got {self.defence!r}"
            )

    @property
    def rule(self) -> str:
        """The aggregation rule the defence implies."""
        return DEFENCES[self.defence].name


@dataclass(frozen=True)
class SecureRoundsConfig:
    """Whether rounds run SecAgg+ (run-config keys ``secagg.*``)."""

    # The server learns only the sum of the deltas (federation.secure_aggregation); off by
    # default because every node must allow it and it excludes robust aggregation.
    enabled: bool = False
    # Each site adds the noise multiplier / sqrt(min sites) in ONE plain-SGD step, so the
    # unmasked sum carries the whole multiplier (privacy/distributed_noise.py).
    distributed_noise: bool = False


@dataclass(frozen=True)
class EvalConfig:
    """The server's few-shot evaluation each round (run-config keys ``eval.*``)."""

    data: str = "synthetic"  # public evaluation set: "synthetic" or an .npz path
    episodes: int = 100  # episodes per evaluation
    ways: int = 5

    def __post_init__(self) -> None:
        _positive("EvalConfig", self, ("episodes", "ways"))


@dataclass(frozen=True)
class ServerConfig:
    """Rounds, quorum, the DP plan sent to nodes, aggregation and where results go."""

    federation: str = "fedfew"  # names ledger charges and the checkpoint; keep it across restarts
    num_rounds: int = 3  # the demo's length; real federations run more
    min_replies: int = 2  # quorum of valid replies for a round to count
    min_nodes: int = 2  # nodes that must be connected before round 1 starts
    node_wait: float = 120.0  # seconds to wait for them
    round_timeout: float = 600.0  # deadline for replies in one attempt
    max_retries: int = 2  # attempts after the first before the run stops
    mechanism: str = DEFAULT_MECHANISM  # a privacy.mechanisms name; each node must allow it
    steps: int = 10  # DP steps per node per round (what each ledger is charged for)
    local_lr: float = 1e-3  # Adam on the nodes
    initial_model: str = ""  # a model directory to start from (`fedfew pretrain`); "": random
    workdir: str = "fedfew-server"  # checkpoint/, registry/ and status.json live here
    seed: int = -1  # -1: OS randomness (production); >= 0 for tests
    dp: DPSettings = dataclasses.field(default_factory=DPSettings)
    backbone: BackboneConfig = dataclasses.field(default_factory=BackboneConfig)
    meta: MetaConfig = dataclasses.field(default_factory=MetaConfig)
    aggregation: AggregationConfig = dataclasses.field(default_factory=AggregationConfig)
    secagg: SecureRoundsConfig = dataclasses.field(default_factory=SecureRoundsConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _positive(
            "ServerConfig", self,
            ("num_rounds", "min_replies", "min_nodes", "node_wait", "round_timeout", "steps",
             "local_lr"),
        )  # fmt: skip
        if self.max_retries < 0:
            raise ValueError("ServerConfig.max_retries must be >= 0")
        if self.secagg.enabled and self.aggregation.defence != "none":
            raise ValueError(
                f"run config secagg.enabled hides each delta, so aggregation.defence "
                f"{self.aggregation.defence!r} (which compares deltas) cannot run with it: set "
                'aggregation.defence = "none" or secagg.enabled = false'
            )
        variants = sorted(n for n, m in MECHANISMS.items() if m.distributed_variant)
        if self.secagg.distributed_noise and not (
            self.secagg.enabled and self.steps == 1 and self.mechanism in variants
        ):
            raise ValueError(
                "run config secagg.distributed-noise needs secagg.enabled = true, steps = 1 "
                f"and mechanism = {' or '.join(map(repr, variants))} (its sum is private only "
                f"then), got {self.secagg.enabled}, {self.steps}, {self.mechanism!r}"
            )
        if self.secagg.enabled and self.min_replies < 2:
            raise ValueError("run config secagg.enabled needs min-replies >= 2")
        if self.min_replies > self.min_nodes:
            raise ValueError("run config min-replies cannot exceed min-nodes")
        try:
            self.round_plan(1)  # the plan's components validate what the nodes will get
        except ValueError as exc:
            raise ValueError(f"run config does not make a valid round plan: {exc}") from exc

    def round_plan(self, server_round: int, *, norm_bound: float | None = None) -> RoundPlan:
        """The DP plan every node is asked to run in ``server_round``.

        ``norm_bound`` is the delta bound each node clips to before masking (secure rounds
        only; the strategy knows it, since its default depends on the model's size).

        Raises:
            ValueError: a component rejects its value (UnknownMechanismError is one).
        """
        shares = max(2, self.min_replies)  # every accepted sum has at least this many sites
        mechanism = get_mechanism(self.mechanism)
        if self.secagg.distributed_noise:  # each site adds its share; >= shares sum to sigma
            mechanism = get_mechanism(mechanism.distributed_variant)
        # A one-shot release runs one step over every patient, whatever the iterated settings.
        one_shot = mechanism.one_shot
        dp = mechanism.dp_config(
            {
                **self.dp.mechanism_values(),
                "noise_multiplier": mechanism.site_noise(self.dp.noise_multiplier, shares=shares),
                "sample_rate": 1.0 if one_shot else self.dp.sample_rate,
            }
        )
        return RoundPlan(
            federation=self.federation,
            round=server_round,
            mechanism=mechanism.name,
            steps=1 if one_shot else self.steps,
            local_lr=self.local_lr,
            dp=dp,
            meta=self.meta,
            backbone=self.backbone,
            secagg=SecureAggregationConfig(
                enabled=self.secagg.enabled,
                min_sites=shares,
                norm_bound=SecureAggregationConfig.norm_bound if norm_bound is None else norm_bound,
            ),
        )

    @property
    def root(self) -> Path:
        """The server's work directory (absolute)."""
        return Path(self.workdir).expanduser().resolve()

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping (what `--run-config` takes), saved with every published model."""
        return flatten(self)

    def with_values(self, values: Mapping[str, Any]) -> ServerConfig:
        """This config with the flat run-config keys ``values`` changed (read as strictly as a
        run config: ``{"dp.noise-multiplier": 3.0, "backbone.width": 16}``)."""
        return ServerConfig.from_run_config({**self.to_dict(), **values})

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerConfig:
        """Read the kebab-case run config (Flower's: the app's keys with their overrides).

        Raises:
            ValueError: an unknown key, a value of the wrong type (``num-rounds = 2.7``, the
                string ``"5"``) or out of range, naming the key.
        """
        return cls(**read_fields(cls, run_config, owner=OWNER))
