"""Adapting a base model to a new condition from a few labelled cases; never mutates the base."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call

from models.meta import (
    MetaConfig,
    Params,
    cross_entropy,
    head_features,
    maml_adapt,
    prototypes,
    split_params,
)

ADAPT_MODES = ("prototype", "finetune", "maml")


@dataclass(frozen=True)
class AdaptConfig:
    """How to adapt at test time."""

    mode: str = "prototype"  # instant and the most robust across modalities (bench/results)
    finetune_steps: int = 25  # enough to move a prototype-initialised head; <1 s for 25 images
    finetune_lr: float = 1e-3  # Adam step for head and backbone; larger forgets the meta-features
    batch_limit: int = 256  # images per forward pass when predicting, bounds memory

    def __post_init__(self) -> None:
        if self.mode not in ADAPT_MODES:
            raise ValueError(f"AdaptConfig.mode must be one of {ADAPT_MODES}, got {self.mode!r}")
        if self.finetune_steps < 0 or not self.finetune_lr > 0 or self.batch_limit < 1:
            raise ValueError(
                "AdaptConfig.finetune_steps must be >= 0, finetune_lr > 0 and batch_limit >= 1, "
                f"got {self.finetune_steps}, {self.finetune_lr}, {self.batch_limit}"
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


class AdaptedClassifier:
    """A classifier for one support set: a frozen backbone copy (or fast weights) plus a head."""

    def __init__(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        *,
        ways: int,
        batch_limit: int,
        normalized_head: bool = False,
    ) -> None:
        self._model = model
        self._params = params
        self._buffers = buffers
        self.ways = ways
        self._batch_limit = batch_limit
        self._normalized_head = normalized_head  # MAML heads act on normalised features

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``images`` under the adapted weights."""
        body = {k: v for k, v in self._params.items() if not k.startswith("head.")}
        chunks = [
            functional_call(
                self._model, (body, self._buffers), (images[i : i + self._batch_limit],)
            )
            for i in range(0, len(images), self._batch_limit)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores ``(n, ways)``."""
        features = self.embed(images)
        if self._normalized_head:
            features = head_features(features)
        return features @ self._params["head.weight"].T + self._params["head.bias"]

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(n, ways)``."""
        return torch.softmax(self.logits(images), dim=-1)


def prototype_head(embeddings: torch.Tensor, y: torch.Tensor, ways: int) -> Params:
    """The linear head equal to ProtoNet's squared-distance classifier (Snell et al. 2017, 2.3):
    ``w_c = 2 p_c``, ``b_c = -|p_c|^2`` (the query norm term is shared by all classes)."""
    protos = prototypes(embeddings, y, ways)
    return {"head.weight": 2 * protos, "head.bias": -(protos**2).sum(-1)}


def adapt(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig = AdaptConfig(),
    meta: MetaConfig = MetaConfig(),
) -> AdaptedClassifier:
    """Adapt ``model`` to a support set.

    Args:
        model: the base (meta-trained) backbone; it is never modified.
        support_x: pipeline output ``(n, C, S, S)``.
        support_y: labels ``0..ways-1``.
        ways: number of classes.
        config: adaptation mode and its steps.
        meta: the meta-learner's config (MAML inner learning rate and steps).
    """
    was_training = model.training
    model.eval()
    try:
        if config.mode == "maml":
            params, buffers = split_params(model)
            fast = maml_adapt(
                model,
                params,
                buffers,
                support_x,
                support_y,
                ways=ways,
                steps=meta.adapt_steps,
                lr=meta.inner_lr,
                body_lr=meta.inner_body_lr,
                first_order=True,
            )
            fast = {k: v.detach() for k, v in fast.items()}
            return AdaptedClassifier(
                model,
                fast,
                buffers,
                ways=ways,
                batch_limit=config.batch_limit,
                normalized_head=True,
            )
        work = copy.deepcopy(model) if config.mode == "finetune" else model
        params, buffers = split_params(work)
        with torch.no_grad():
            head = prototype_head(
                functional_call(work, (params, buffers), (support_x,)), support_y, ways
            )
        if config.mode == "finetune" and config.finetune_steps:
            head, params = _finetune(work, head, support_x, support_y, config)
        return AdaptedClassifier(
            work, {**params, **head}, buffers, ways=ways, batch_limit=config.batch_limit
        )
    finally:
        model.train(was_training)


def _finetune(
    work: nn.Module,
    head: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    config: AdaptConfig,
) -> tuple[Params, Params]:
    """A few Adam steps on the support loss over head and a private backbone copy."""
    head = {k: v.clone().requires_grad_(True) for k, v in head.items()}
    # Distances of raw embeddings are large; normalising the prototype head keeps the
    # softmax away from saturation so the first steps have useful gradients.
    scale = head["head.weight"].norm(dim=1).mean().clamp_min(1e-6).detach()
    optimizer = torch.optim.Adam([*work.parameters(), *head.values()], lr=config.finetune_lr)
    work.train()
    for _ in range(config.finetune_steps):
        optimizer.zero_grad()
        logits = (work(support_x) @ head["head.weight"].T + head["head.bias"]) / scale
        cross_entropy(logits, support_y).backward()
        optimizer.step()
    work.eval()
    params, _ = split_params(work)
    return {k: v.detach() / scale for k, v in head.items()}, params
