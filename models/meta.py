"""Meta-learners behind one functional interface: ProtoNet, MAML and first-order MAML.

Every learner exposes ``episode_loss(model, params, buffers, episode_batch)``: a pure function of
the parameter dict, so the same code serves plain training (autograd), per-episode gradients for
DP (``torch.func.vmap(torch.func.grad(...))``) and adaptation without touching the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, grad

from models.catalogue import Catalogue

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MetaConfig:
    """Which meta-learner, and its inner loop."""

    learner: str = "protonet"  # chosen by the cross-domain benchmark (bench/results), not by taste
    inner_steps: int = 2  # MAML inner steps in meta-training: 2 keeps 2nd order affordable
    inner_lr: float = 0.1  # inner SGD step of the zero head: x HEAD_SCALE^2 on the logits
    inner_body_lr: float = 0.002  # inner step of the backbone: larger collapses Conv-4 features
    adapt_steps: int = 5  # MAML inner steps at adaptation time (only inference runs then)

    def __post_init__(self) -> None:
        if self.learner not in META_LEARNERS:
            raise ValueError(
                f"MetaConfig.learner must be one of {sorted(META_LEARNERS)}, got {self.learner!r}"
            )
        if self.inner_steps < 1 or self.adapt_steps < 1:
            raise ValueError(
                f"MetaConfig.inner_steps and adapt_steps must be >= 1, got "
                f"{self.inner_steps}, {self.adapt_steps}"
            )
        if not self.inner_lr > 0 or self.inner_body_lr < 0:
            raise ValueError(
                f"MetaConfig.inner_lr must be > 0 and inner_body_lr >= 0, got "
                f"{self.inner_lr}, {self.inner_body_lr}"
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with every model."""
        return asdict(self)


class EpisodeBatch(NamedTuple):
    """Tensors of one episode (labels episode-local, 0..ways-1).

    The optional masks (1 = real record, 0 = padding) let episodes of different sizes share one
    shape, as per-episode DP gradients under ``vmap`` need; ``None`` means every record is real.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    support_mask: torch.Tensor | None = None
    query_mask: torch.Tensor | None = None


def label_mask(y: torch.Tensor, ways: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot float mask ``(n, ways)``; written as a comparison so it works under ``vmap``."""
    return (y[..., None] == torch.arange(ways, device=y.device)).to(dtype)


def cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy with integer targets, ``vmap``-safe; ``weight`` masks records out
    (the mean is over weighted records, 0 when there are none)."""
    onehot = label_mask(y, logits.shape[-1], logits.dtype)
    per_record = -(torch.log_softmax(logits, dim=-1) * onehot).sum(-1)
    if weight is None:
        return per_record.mean()
    return (per_record * weight).sum() / weight.sum().clamp_min(1.0)


def _ones(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.ones(like.shape[0], dtype=dtype, device=like.device)


def _mask_absent(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Remove classes with no support record from the softmax (vmap-safe ``where``)."""
    return torch.where(present > 0, logits, torch.full_like(logits, -1e9))


def prototypes(embeddings: torch.Tensor, y: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means of support embeddings (Snell et al. 2017, eq. 1)."""
    mask = label_mask(y, ways, embeddings.dtype)
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


HEAD_SCALE = 10.0  # cosine-classifier temperature (Chen et al. 2019, Baseline++): a fixed scale


def head_features(features: torch.Tensor) -> torch.Tensor:
    """What the MAML head sees: L2-normalised features times ``HEAD_SCALE``. Raw Conv-4 features
    have norms in the hundreds, so one inner SGD step on a zero head would saturate the softmax
    and collapse every prediction to one class; normalised, one inner learning rate fits every
    backbone and modality."""
    return HEAD_SCALE * features / features.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _head_logits(model: nn.Module, fast: Params, buffers: Params, x: torch.Tensor) -> torch.Tensor:
    body = {k: v for k, v in fast.items() if not k.startswith("head.")}
    features = head_features(functional_call(model, (body, buffers), (x,)))
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
    body_lr: float,
    first_order: bool,
    support_mask: torch.Tensor | None = None,
) -> Params:
    """Inner loop of MAML (Finn et al. 2017, eq. 1): SGD on the support loss from ``params`` plus a
    zero head, with a per-group step (head ``lr``, backbone ``body_lr``, as per-layer rates in
    Meta-SGD / MAML++). Second order unless ``first_order`` (inner gradients then constants)."""

    dtype = support_x.dtype
    weight = _ones(support_y, dtype) if support_mask is None else support_mask.to(dtype)
    present = label_mask(support_y, ways, dtype).mul(weight[:, None]).sum(0)

    def support_loss(fast: Params) -> torch.Tensor:
        logits = _mask_absent(_head_logits(model, fast, buffers, support_x), present)
        return cross_entropy(logits, support_y, weight)

    fast = {**params, **zero_head(model, ways, support_x)}
    for _ in range(steps):
        grads = grad(support_loss)(fast)
        if first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        fast = {k: fast[k] - (lr if k.startswith("head.") else body_lr) * grads[k] for k in fast}
    return fast


def protonet_query_logits(
    model: nn.Module,
    params: Params,
    buffers: Params,
    batch: EpisodeBatch,
    *,
    ways: int,
    support_weight: torch.Tensor,
    present: torch.Tensor,
    config: MetaConfig,
) -> torch.Tensor:
    """ProtoNet (Snell et al. 2017): distances of query embeddings to weighted class means."""
    both = torch.cat([batch.support_x, batch.query_x])
    emb = functional_call(model, (params, buffers), (both,))
    n_support = batch.support_x.shape[0]
    s_onehot = label_mask(batch.support_y, ways, emb.dtype) * support_weight[:, None]
    protos = s_onehot.T @ emb[:n_support] / present.clamp_min(1.0)[:, None]
    return prototype_logits(emb[n_support:], protos)


def maml_query_logits(
    model: nn.Module,
    params: Params,
    buffers: Params,
    batch: EpisodeBatch,
    *,
    ways: int,
    support_weight: torch.Tensor,
    present: torch.Tensor,
    config: MetaConfig,
    first_order: bool,
) -> torch.Tensor:
    """MAML (Finn et al. 2017): query logits of the fast weights after the inner loop;
    ``first_order`` drops the inner loop's second derivatives (FOMAML)."""
    fast = maml_adapt(
        model,
        params,
        buffers,
        batch.support_x,
        batch.support_y,
        ways=ways,
        steps=config.inner_steps,
        lr=config.inner_lr,
        body_lr=config.inner_body_lr,
        first_order=first_order,
        support_mask=batch.support_mask,
    )
    return _head_logits(model, fast, buffers, batch.query_x)


QueryLogits = Callable[..., torch.Tensor]

# name -> query logits of one episode (signature of ``protonet_query_logits``); a new
# meta-learner is one new entry.
META_LEARNERS: Catalogue[QueryLogits] = Catalogue(
    "meta-learner",
    {
        "protonet": protonet_query_logits,
        "maml": partial(maml_query_logits, first_order=False),
        "fomaml": partial(maml_query_logits, first_order=True),
    },
)


class MetaLearner:
    """Episode loss of one meta-learning algorithm, as a pure function of parameters."""

    def __init__(self, config: MetaConfig) -> None:
        self.config = config

    def episode_loss(
        self, model: nn.Module, params: Params, buffers: Params, batch: EpisodeBatch, ways: int
    ) -> torch.Tensor:
        """Query loss after adapting to the support set of one episode.

        With masks, classes without a support record leave the softmax, padded records count for
        nothing, and an episode with fewer than two present classes has loss 0 (so gradient 0).
        """
        dtype = batch.support_x.dtype
        s_onehot = label_mask(batch.support_y, ways, dtype)
        s_weight = (
            _ones(batch.support_y, dtype) if batch.support_mask is None else batch.support_mask
        )
        q_weight = _ones(batch.query_y, dtype) if batch.query_mask is None else batch.query_mask
        present = (s_onehot * s_weight.to(dtype)[:, None]).sum(0)
        q_weight = q_weight.to(dtype) * (
            label_mask(batch.query_y, ways, dtype) @ (present > 0).to(dtype)
        )
        usable = ((present > 0).sum() >= 2).to(dtype)
        logits = META_LEARNERS[self.config.learner](
            model,
            params,
            buffers,
            batch,
            ways=ways,
            support_weight=s_weight.to(dtype),
            present=present,
            config=self.config,
        )
        return usable * cross_entropy(_mask_absent(logits, present), batch.query_y, q_weight)
