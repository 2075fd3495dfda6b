"""Meta-learners behind one functional interface: ProtoNet, MAML and first-order MAML.

Every learner exposes ``episode_loss(model, params, buffers, episode_batch)``: a pure function of
the parameter dict, so the same code serves plain training (autograd), per-episode gradients for
DP (``torch.func.vmap(torch.func.grad(...))``) and adaptation without touching the base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad

META_LEARNERS = ("protonet", "maml", "fomaml")

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MetaConfig:
    """Which meta-learner, and its inner loop."""

    learner: str = "protonet"  # chosen by the cross-domain benchmark (bench/results), not by taste
    inner_steps: int = 2  # MAML inner steps while meta-training: 2 keeps 2nd order affordable on CPU
    inner_lr: float = 0.05  # MAML inner SGD step on all weights; the zero-initialised head learns fastest
    adapt_steps: int = 5  # MAML inner steps at adaptation time: more steps help when only inference runs

    def __post_init__(self) -> None:
        if self.learner not in META_LEARNERS:
            raise ValueError(f"MetaConfig.learner must be one of {META_LEARNERS}, got {self.learner!r}")
        if self.inner_steps < 1 or self.adapt_steps < 1:
            raise ValueError(
                f"MetaConfig.inner_steps and adapt_steps must be >= 1, got "
                f"{self.inner_steps}, {self.adapt_steps}"
            )
        if not self.inner_lr > 0:
            raise ValueError(f"MetaConfig.inner_lr must be > 0, got {self.inner_lr}")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with every model."""
        return asdict(self)


class EpisodeBatch(NamedTuple):
    """Tensors of one episode (labels episode-local, 0..ways-1)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def label_mask(y: torch.Tensor, ways: int) -> torch.Tensor:
    """One-hot float mask ``(n, ways)``; written as a comparison so it works under ``vmap``."""
    return (y[..., None] == torch.arange(ways, device=y.device)).to(torch.float32)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with integer targets, ``vmap``-safe."""
    return -(torch.log_softmax(logits, dim=-1) * label_mask(y, logits.shape[-1])).sum(-1).mean()


def prototypes(embeddings: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of support embeddings (Snell et al. 2017, eq. 1)."""
    mask = label_mask(y, ways)
    return (mask.T @ embeddings) / mask.sum(0).clamp_min(1.0)[:, None]


def prototype_logits(embeddings: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distance to each prototype (Snell et al. 2017, eq. 2)."""
    return -(
        (embeddings**2).sum(-1, keepdim=True)
        - 2 * embeddings @ protos.T
        + (protos**2).sum(-1)[None, :]
    )


def split_params(model: nn.Module) -> tuple[Params, Params]:
    """Detached copies of a model's parameters and buffers, for functional use."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return params, buffers


def zero_head(model: nn.Module, ways: int, like: torch.Tensor) -> Params:
    """A zero linear head: label-permutation invariant (Kao et al. 2022, "MAML is a noisy
    contrastive learner"), so MAML needs no learned head and adapts to any number of ways."""
    dim = int(model.out_features)  # type: ignore[arg-type]
    return {
        "head.weight": torch.zeros(ways, dim, dtype=like.dtype, device=like.device),
        "head.bias": torch.zeros(ways, dtype=like.dtype, device=like.device),
    }


def _head_logits(model: nn.Module, fast: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    body = {k: v for k, v in fast.items() if not k.startswith("head.")}
    features = functional_call(model, (body, buffers), (x,))
    return features @ fast["head.weight"].T + fast["head.bias"]


def maml_adapt(
    model: nn.Module,
    params: Params,
    buffers: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    steps: int,
    lr: float,
    first_order: bool,
) -> Params:
    """Inner loop of MAML (Finn et al. 2017, eq. 1): SGD on the support loss from ``params`` plus a
    zero head. Second order unless ``first_order`` (then inner gradients are constants, FOMAML)."""

    def support_loss(fast: Params) -> torch.Tensor:
        return cross_entropy(_head_logits(model, fast, buffers, support_x), support_y)

    fast = {**params, **zero_head(model, ways, support_x)}
    for _ in range(steps):
        grads = grad(support_loss)(fast)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = {k: fast[k] - lr * grads[k] for k in fast}
    return fast


class MetaLearner:
    """Episode loss of one meta-learning algorithm, as a pure function of parameters."""

    def __init__(self, config: MetaConfig) -> None:
        self.config = config

    def episode_loss(
        self, model: nn.Module, params: Params, buffers: Params, batch: EpisodeBatch, ways: int
    ) -> torch.Tensor:
        """Query loss after adapting to the support set of one episode."""
        if self.config.learner == "protonet":
            both = torch.cat([batch.support_x, batch.query_x])
            emb = functional_call(model, (params, buffers), (both,))
            n_support = batch.support_x.shape[0]
            protos = prototypes(emb[:n_support], batch.support_y, ways)
            return cross_entropy(prototype_logits(emb[n_support:], protos), batch.query_y)
        fast = maml_adapt(
            model,
            params,
            buffers,
            batch.support_x,
            batch.support_y,
            ways=ways,
            steps=self.config.inner_steps,
            lr=self.config.inner_lr,
            first_order=self.config.learner == "fomaml",
        )
        return cross_entropy(_head_logits(model, fast, buffers, batch.query_x), batch.query_y)
