"""The federation's configuration as the ServerApp reads it from Flower's run config.

Kebab-case run-config keys are read here and nowhere else, and the round plan's component configs
(the mechanism's DP config, ``MetaConfig``, ``BackboneConfig``) are built from them here, once
(:meth:`ServerConfig.round_plan`). Every value is public configuration.
"""

from __future__ import annotations

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
from models.run_config import flatten, key_of, read_fields
from privacy.dp_config import DEFAULT_SAMPLE_RATE, parse_classes
from privacy.mechanisms import DEFAULT_MECHANISM, MECHANISMS, get_mechanism

OWNER = "run config"  # what the server's configuration is called in its error messages


def backbone_fields(backbone: BackboneConfig) -> dict[str, Any]:
    """The run config's fields that name ``backbone`` (``ServerConfig(**backbone_fields(b))``
    plans exactly ``b``)."""
    return {
        "backbone": backbone.name,
        "width": backbone.width,
        "image_size": backbone.image_size,
        "norm": backbone.norm,
        "trainable": backbone.trainable,
        "features": backbone.features,
        "adapter": backbone.adapter,
    }


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
    server_lr: float = 1.0  # outer learning rate on the averaged delta (1: plain FedAvg)
    mechanism: str = DEFAULT_MECHANISM  # a privacy.mechanisms name; each node must allow it
    noise_multiplier: float = 2.0  # sigma applied to C (accounted sigma 1.0 at sensitivity 2C)
    clip: float = 1.0  # C, per-episode (or per-patient) gradient clip
    sample_rate: float = DEFAULT_SAMPLE_RATE  # q, per-patient Poisson rate at every site
    local_steps: int = 10  # DP steps per node per round
    episodes: int = 8  # episodes per DP step
    ways: int = 3  # classes per training episode
    max_shots: int = 5
    max_queries: int = 5
    expected_patients: int = 64  # dp-supervised: the public normaliser B (about q x site size)
    augmentations: int = 1  # dp-supervised: augmented copies averaged per record before clipping
    # dp-prototypes: the public class vocabulary, comma-separated ("nevus,melanoma"); its
    # order is the row order of every release. local-steps and sample-rate are then 1.
    prototype_classes: str = ""
    # dp-prototypes: the federation's public upper bound on one site's patients; a release
    # longer than it allows (sqrt(2) C per patient plus noise) is rejected by the gate.
    max_site_patients: int = 100_000
    local_lr: float = 1e-3  # Adam on the nodes
    meta_learner: str = "protonet"  # fastest per step under DP; see bench results
    backbone: str = "conv4"
    width: int = 64
    image_size: int = 64
    norm: str = "group"  # "batch" only for a public start whose BatchNorm statistics stay frozen
    trainable: str = "all"  # the parameters DP touches (models.freezing.PARAMETER_SUBSETS)
    features: str = "head"  # the embedding: "multi-scale" for the public EfficientNet-Lite0
    # A trainable adapter on a frozen encoder ("none", or models.feature_adapter.ADAPTERS): DP
    # then trains it alone, on features each node embeds once (models/feature_store.py).
    adapter: str = "none"
    initial_model: str = ""  # a model directory to start from (`fedfew pretrain`); "": random
    update_norm_bound: float = 0.0  # 0: local_lr * local_steps * sqrt(#params) * 3 (Adam's reach)
    norm_policy: str = "clip"  # clip or reject deltas over the bound
    defence: str = "none"  # a key of federation.aggregation.DEFENCES
    # SecAgg+: the server learns only the sum of the deltas (federation.secure_aggregation);
    # off by default because every node must allow it and it excludes robust aggregation.
    secure_aggregation: bool = False
    # With secure-aggregation: each site adds noise-multiplier / sqrt(min sites) in ONE plain-SGD
    # step, so the unmasked sum carries noise-multiplier (privacy/distributed_noise.py).
    distributed_noise: bool = False
    trim: int = 1  # values dropped per end by trimmed-mean
    byzantine: int = 1  # f assumed by Krum
    eval_data: str = "synthetic"  # public evaluation set: "synthetic" or an .npz path
    eval_episodes: int = 100  # episodes per few-shot evaluation each round
    eval_ways: int = 5
    workdir: str = "fedfew-server"  # checkpoint/, registry/ and status.json live here
    seed: int = -1  # -1: OS randomness (production); >= 0 for tests

    def __post_init__(self) -> None:
        positive = [
            "num_rounds", "min_replies", "min_nodes", "node_wait", "round_timeout", "server_lr",
            "noise_multiplier", "clip", "local_steps", "episodes", "local_lr", "eval_episodes",
            "max_site_patients",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"run config {key_of(name)} must be > 0, got {value!r}")
        if self.max_retries < 0 or self.update_norm_bound < 0:
            raise ValueError("run config max-retries and update-norm-bound must be >= 0")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"run config sample-rate must be in (0, 1], got {self.sample_rate!r}")
        if self.norm_policy not in NORM_POLICIES:
            raise ValueError(f"run config norm-policy must be one of {NORM_POLICIES}")
        if self.defence not in DEFENCES:
            raise ValueError(
                f"run config defence must be one of {sorted(DEFENCES)}, got {self.defence!r}"
            )
        if self.secure_aggregation and self.defence != "none":
            raise ValueError(
                f"run config secure-aggregation hides each delta, so defence {self.defence!r} "
                '(which compares deltas) cannot run with it: set defence = "none" or turn '
                "secure-aggregation off"
            )
        variants = sorted(n for n, m in MECHANISMS.items() if m.distributed_variant)
        if self.distributed_noise and not (
            self.secure_aggregation and self.local_steps == 1 and self.mechanism in variants
        ):
            raise ValueError(
                "run config distributed-noise needs secure-aggregation = true, local-steps = 1 "
                f"and mechanism = {' or '.join(map(repr, variants))} (its sum is private only "
                f"then), got {self.secure_aggregation}, {self.local_steps}, {self.mechanism!r}"
            )
        if self.secure_aggregation and self.min_replies < 2:
            raise ValueError("run config secure-aggregation needs min-replies >= 2")
        if self.min_replies > self.min_nodes:
            raise ValueError("run config min-replies cannot exceed min-nodes")
        try:
            self.round_plan(1)  # the plan's components validate what the nodes will get
        except ValueError as exc:
            raise ValueError(f"run config does not make a valid round plan: {exc}") from exc

    @property
    def aggregation(self) -> str:
        """The aggregation rule the defence implies."""
        return DEFENCES[self.defence].name

    def round_plan(self, server_round: int, *, norm_bound: float | None = None) -> RoundPlan:
        """The DP plan every node is asked to run in ``server_round``.

        ``norm_bound`` is the delta bound each node clips to before masking (secure rounds
        only; the strategy knows it, since its default depends on the model's size).

        Raises:
            ValueError: a component rejects its value (UnknownMechanismError is one).
        """
        shares = max(2, self.min_replies)  # every accepted sum has at least this many sites
        mechanism = get_mechanism(self.mechanism)
        if self.distributed_noise:  # each site adds its share; the sum of >= shares has sigma
            mechanism = get_mechanism(mechanism.distributed_variant)
        # A one-shot release runs one step over every patient, whatever the iterated settings.
        one_shot = mechanism.one_shot
        dp = mechanism.dp_config(
            {
                "noise_multiplier": mechanism.site_noise(self.noise_multiplier, shares=shares),
                "max_grad_norm": self.clip,
                "sample_rate": 1.0 if one_shot else self.sample_rate,
                "classes": parse_classes(self.prototype_classes),
                "episodes": self.episodes,
                "ways": self.ways,
                "max_shots": self.max_shots,
                "max_queries": self.max_queries,
                "expected_patients": self.expected_patients,
                "augmentations": self.augmentations,
            }
        )
        return RoundPlan(
            federation=self.federation,
            round=server_round,
            mechanism=mechanism.name,
            steps=1 if one_shot else self.local_steps,
            local_lr=self.local_lr,
            dp=dp,
            meta=MetaConfig(learner=self.meta_learner),
            backbone=BackboneConfig(
                name=self.backbone,
                width=self.width,
                image_size=self.image_size,
                norm=self.norm,
                trainable=self.trainable,
                features=self.features,
                adapter=self.adapter,
            ),
            secagg=SecureAggregationConfig(
                enabled=self.secure_aggregation,
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

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerConfig:
        """Read the kebab-case run config (Flower's: the app's keys with their overrides).

        Raises:
            ValueError: an unknown key, a value of the wrong type (``num-rounds = 2.7``, the
                string ``"5"``) or out of range, naming the key.
        """
        return cls(**read_fields(cls, run_config, owner=OWNER))
