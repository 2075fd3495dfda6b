"""Adapting a base model to a new condition from a few labelled cases; never mutates the base.

An adapted classifier is three stages, each a lever measured in ``bench/new_modality.py``:

1. **embedding**: the backbone's features, optionally averaged over flips of the image
   (test-time augmentation);
2. **feature map**: optionally centred on the domain's mean feature and L2-normalised
   (SimpleShot, Wang et al. 2019): the mean comes from the model's domain statistics
   (``fedfew adapt-domain``) or, without them, from the images at hand (support and the cases to
   classify);
3. **head**, fitted by the adaptation mode (registry ``ADAPT_MODES``): prototypes, a linear head,
   fine-tuning of head and backbone, or MAML's inner loop; prototype heads can be refined
   transductively with the unlabelled cases (soft k-means, Ren et al. 2018).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call

from models.catalogue import Catalogue
from models.feature_adapter import feature_transform
from models.feature_cache import cache_for
from models.freezing import is_fully_frozen
from models.meta import (
    HEAD_SCALE,
    MetaConfig,
    Params,
    cross_entropy,
    head_features,
    label_mask,
    maml_adapt,
    prototypes,
    split_params,
)

# Images per forward pass when embedding. Small batches are faster on CPU: Lite0 at 224 px on
# 2 threads took 60 ms per image at batch 64 and 17-33 at 2-8; the dashboard's arrival embedding
# and occlusion map took half the time at 8 as at 256 (bench/results/dashboard_latency_batch*.json).
EMBED_BATCH = 8


@dataclass(frozen=True)
class AdaptConfig:
    """How to adapt at test time (levers measured in bench/results/new_modality.json and
    new_condition.json)."""

    # Least squares on the features: instant, and the best head on the public encoder's features
    # on unseen modalities (74.6% 3-way 5-shot against 73.9% for centred prototypes, same
    # episodes: bench/results/new_modality_encoder.json)
    mode: str = "ridge"
    centre: bool = True  # centring + L2 (SimpleShot): -0.6 to +2.9 points, up in 28 of 32 pairs
    tta: bool = False  # flip averaging: -0.4 to +4.5 points, but 4x the forward passes
    transductive_steps: int = 0  # soft k-means refinement: -1.4 to +1.2, up in 5 of 16 pairs
    finetune_steps: int = 25  # enough to move a prototype-initialised head; <1 s for 25 images
    finetune_lr: float = 1e-3  # Adam step for head and backbone; larger forgets the features
    linear_steps: int = 100  # logistic-regression steps of the linear head on cached features
    linear_lr: float = 0.01  # Adam step of the linear head (features are unit length)
    ridge_penalty: float = 1.0  # ridge's lambda on unit-length features; support-size scale
    batch_limit: int = EMBED_BATCH  # images per forward pass when embedding

    def __post_init__(self) -> None:
        if self.mode not in ADAPT_MODES:
            raise ValueError(
                f"AdaptConfig.mode must be one of {sorted(ADAPT_MODES)}, got {self.mode!r}"
            )
        counts = ("transductive_steps", "finetune_steps", "linear_steps")
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"AdaptConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("finetune_lr", "linear_lr", "ridge_penalty"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AdaptConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.batch_limit < 1:
            raise ValueError(f"AdaptConfig.batch_limit must be >= 1, got {self.batch_limit}")

    @property
    def frozen_backbone(self) -> bool:
        """Whether the mode leaves the backbone as it is (its embeddings can be cached)."""
        return ADAPT_MODES[self.mode].frozen_backbone

    @property
    def centres(self) -> bool:
        """Whether features are centred (on the domain mean when the model has one)."""
        return self.centre and ADAPT_MODES[self.mode].uses_feature_map

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


# Called with (steps done, steps in all) after each optimisation step of an adaptation.
StepHook = Callable[[int, int], None]


# A hook for every adaptation started inside :func:`step_hook`'s block, in this thread or task.
_BLOCK_HOOK: ContextVar[StepHook | None] = ContextVar("adaptation_step_hook", default=None)


@contextlib.contextmanager
def step_hook(hook: StepHook) -> Iterator[None]:
    """Report the steps of every adaptation run inside the block to ``hook`` (also those started
    by other functions, such as the leave-one-out folds of ``models.calibration``), so a caller
    can show progress and stop them; an exception the hook raises propagates."""
    token = _BLOCK_HOOK.set(hook)
    try:
        yield
    finally:
        _BLOCK_HOOK.reset(token)


def _step(hook: StepHook | None, done: int, total: int) -> None:
    for h in (hook, _BLOCK_HOOK.get()):
        if h is not None:
            h(done, total)


# Mapped features have this norm, so squared distances between them are HEAD_SCALE times those of
# unit vectors: the cosine-classifier temperature (Chen et al. 2019) for prototype logits.
FEATURE_NORM = HEAD_SCALE**0.5


@dataclass(frozen=True)
class FeatureMap:
    """What happens to backbone features before the head: centring, then L2 normalisation of
    each part (a multi-scale embedding concatenates parts of different scales; each is normalised
    on its own, so no depth dominates, and the whole has norm :data:`FEATURE_NORM`), then the
    model's metric ``transform`` when it has one (a within-class metric adapter,
    models/feature_adapter.py :func:`~models.feature_adapter.feature_transform`).

    ``transform`` acts on the normalised features only: it is applied when ``normalise`` is on
    (:func:`feature_map` turns normalisation on exactly when centring is), and never to raw
    features. It keeps each row's norm. Two maps compare equal only if they hold the same
    ``transform`` (a bound method compares by its object's identity)."""

    mean: torch.Tensor | None = None  # the domain's mean feature; None: no centring
    normalise: bool = False
    parts: tuple[int, ...] = ()  # sizes of the concatenated parts; (): one part
    # the metric applied last, to the normalised features; None: none
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """Map features ``(n, d)``."""
        if self.mean is not None:
            features = features - self.mean
        if self.normalise:
            pieces = features.split(list(self.parts), dim=-1) if self.parts else (features,)
            scale = FEATURE_NORM / len(pieces) ** 0.5
            features = torch.cat(
                [scale * p / p.norm(dim=-1, keepdim=True).clamp_min(1e-6) for p in pieces], dim=-1
            )
            if self.transform is not None:
                features = self.transform(features)
        return features


def feature_parts(model: nn.Module) -> tuple[int, ...]:
    """The sizes of the parts of ``model``'s embedding (multi-scale backbones declare
    ``feature_parts``; any other embedding is one part)."""
    parts = getattr(model, "feature_parts", ())
    return tuple(int(p) for p in parts) if len(parts) > 1 else ()


def flip_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The image and its horizontal, vertical and double flips: medical crops have no canonical
    orientation, so a class's features should not depend on it."""
    return [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]


@torch.no_grad()
def embed(
    model: nn.Module,
    images: torch.Tensor,
    *,
    params: Params | None = None,
    buffers: Params | None = None,
    tta: bool = False,
    batch_limit: int = EMBED_BATCH,
) -> torch.Tensor:
    """Backbone features ``(n, d)`` of ``images``, in chunks, averaged over flips when ``tta``.

    A frozen backbone run on its own weights embeds each image once: its features are kept in
    the model's :mod:`models.feature_cache` and served again to later calls. Weights that are
    the model's own tensors (an adapted classifier's unchanged backbone) run the module as it is,
    so a frozen encoder inside it (models/feature_adapter.py) keeps its cache too.
    """
    if _own_weights(model, params, buffers):
        if not is_fully_frozen(model):
            return _embed(model, images, None, tta=tta, batch_limit=batch_limit)
        return cache_for(model).features(
            model,
            images,
            lambda missing: _embed(model, missing, None, tta=tta, batch_limit=batch_limit),
            variant="tta" if tta else "",
        )
    weights = None if params is None else (params, buffers or {})
    return _embed(model, images, weights, tta=tta, batch_limit=batch_limit)


def _own_weights(model: nn.Module, params: Params | None, buffers: Params | None) -> bool:
    """Whether ``params`` and ``buffers`` (if any) are ``model``'s own tensors (the same storage
    and shape): running the module itself then computes what a functional call would, without
    swapping its tensors (which would make a feature cache inside it start afresh)."""

    def same(given: Params | None, own: dict[str, torch.Tensor]) -> bool:
        return given is None or all(
            k in own and v.data_ptr() == own[k].data_ptr() and v.shape == own[k].shape
            for k, v in given.items()
        )

    return same(params, dict(model.named_parameters())) and same(
        buffers, dict(model.named_buffers())
    )


def _embed(
    model: nn.Module,
    images: torch.Tensor,
    weights: tuple[Params, Params] | None,
    *,
    tta: bool,
    batch_limit: int,
) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for i in range(0, len(images), batch_limit):
            batch = images[i : i + batch_limit]
            views = flip_views(batch) if tta else [batch]
            outs = [
                model(v) if weights is None else functional_call(model, weights, (v,))
                for v in views
            ]
            chunks.append(torch.stack(outs).mean(0))
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def feature_map(
    config: AdaptConfig,
    *,
    domain_mean: torch.Tensor | None,
    features: torch.Tensor,
    parts: tuple[int, ...] = (),
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> FeatureMap:
    """The feature map of ``config``: centred on ``domain_mean`` when known, else on the mean of
    ``features`` (the images at hand), then each of ``parts`` normalised, then ``transform``
    (the model's metric: :func:`models.feature_adapter.feature_transform`); identity when
    centring is off (no transform then either)."""
    if not config.centre:
        return FeatureMap()
    mean = domain_mean if domain_mean is not None else features.mean(0)
    return FeatureMap(
        mean=mean.to(features.dtype), normalise=True, parts=parts, transform=transform
    )


def model_feature_map(
    config: AdaptConfig,
    model: nn.Module,
    *,
    domain_mean: torch.Tensor | None,
    features: torch.Tensor,
) -> FeatureMap:
    """:func:`feature_map` of ``model``'s own features: its embedding's parts and the metric its
    adapter applies after the map (:func:`models.feature_adapter.feature_transform`)."""
    return feature_map(
        config,
        domain_mean=domain_mean,
        features=features,
        parts=feature_parts(model),
        transform=feature_transform(model),
    )


def prototype_head(embeddings: torch.Tensor, y: torch.Tensor, ways: int) -> Params:
    """The linear head equal to ProtoNet's squared-distance classifier (Snell et al. 2017, 2.3):
    ``w_c = 2 p_c``, ``b_c = -|p_c|^2`` (the query norm term is shared by all classes)."""
    return _head_of(prototypes(embeddings, y, ways))


def _head_of(protos: torch.Tensor) -> Params:
    return {"head.weight": 2 * protos, "head.bias": -(protos**2).sum(-1)}


def refine_prototypes(
    support: torch.Tensor,
    support_y: torch.Tensor,
    unlabeled: torch.Tensor,
    *,
    ways: int,
    steps: int,
) -> torch.Tensor:
    """Soft k-means refinement of class prototypes with unlabelled features (Ren et al. 2018,
    "Meta-learning for semi-supervised few-shot classification", eq. 4): each step assigns the
    unlabelled features softly to the classes and recomputes each class mean with them."""
    onehot = label_mask(support_y, ways, support.dtype)
    protos = prototypes(support, support_y, ways)
    for _ in range(steps):
        distance = torch.cdist(unlabeled, protos) ** 2
        soft = torch.softmax(-distance / distance.mean().clamp_min(1e-6), dim=-1)
        total = onehot.T @ support + soft.T @ unlabeled
        protos = total / (onehot.sum(0) + soft.sum(0)).clamp_min(1e-6)[:, None]
    return protos


def fit_head(
    features: torch.Tensor,
    y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    unlabeled: torch.Tensor | None = None,
    on_step: StepHook | None = None,
) -> Params:
    """The head of a frozen-backbone mode over mapped features: the mode's ``head`` fitter
    (:class:`AdaptMode`) from the prototype head (refined with the unlabelled features when
    configured); iterative fitters report each step to ``on_step``."""
    if config.transductive_steps and unlabeled is not None and len(unlabeled):
        head = _head_of(
            refine_prototypes(features, y, unlabeled, ways=ways, steps=config.transductive_steps)
        )
    else:
        head = prototype_head(features, y, ways)
    fit = ADAPT_MODES[config.mode].head
    if fit is None:
        raise ValueError(f"adaptation mode {config.mode!r} adapts the backbone: it has no head")
    return fit(features, y, head, config, on_step)


# Fits a frozen-backbone mode's head: (features, labels, prototype head, config, step hook).
HeadFit = Callable[[torch.Tensor, torch.Tensor, Params, AdaptConfig, StepHook | None], Params]


def _prototype_fit(
    features: torch.Tensor,
    y: torch.Tensor,
    init: Params,
    config: AdaptConfig,
    on_step: StepHook | None,
) -> Params:
    return init


def _linear_fit(
    features: torch.Tensor,
    y: torch.Tensor,
    init: Params,
    config: AdaptConfig,
    on_step: StepHook | None,
) -> Params:
    if not config.linear_steps:
        return init
    return _logistic_regression(features, y, init, config, on_step)


def _ridge_fit(
    features: torch.Tensor,
    y: torch.Tensor,
    init: Params,
    config: AdaptConfig,
    on_step: StepHook | None,
) -> Params:
    return ridge_head(features, y, ways=len(init["head.bias"]), penalty=config.ridge_penalty)


def ridge_head(features: torch.Tensor, y: torch.Tensor, *, ways: int, penalty: float) -> Params:
    """Ridge regression of one-hot labels on the features, in closed form (the dual: an
    ``n x n`` solve, instant for a support set): ``W = Y^T (X X^T + lambda I)^-1 X`` on unit-scale
    features, logits scaled by :data:`HEAD_SCALE` to the prototype head's range. Least squares
    is the linear probe that needs no step size or step count to tune (Mehta et al. 2023 find it
    also the better one under DP at small epsilon)."""
    x = features.double() / FEATURE_NORM
    onehot = label_mask(y, ways, x.dtype)
    gram = x @ x.T + penalty * torch.eye(len(x), dtype=x.dtype, device=x.device)
    weight = torch.linalg.solve(gram, onehot).T @ x  # (ways, d)
    scale = HEAD_SCALE / FEATURE_NORM  # logits of unit-scale features, times HEAD_SCALE
    return {
        "head.weight": (scale * weight).to(features.dtype),
        "head.bias": torch.zeros(ways, dtype=features.dtype, device=features.device),
    }


def ridge_held_out(
    features: torch.Tensor, y: torch.Tensor, *, ways: int, penalty: float
) -> torch.Tensor:
    """Leave-one-out logits ``(n, ways)`` of :func:`ridge_head`: row i scores ``features[i]``
    with the ridge head fitted on every other row, in closed form (one ``n x n`` solve instead of
    n): with the hat matrix ``H = K (K + lambda I)^-1`` of the Gram matrix K and the fitted
    scores ``F = H Y``, the held-out score is ``(F_i - H_ii Y_i) / (1 - H_ii)`` (exact for ridge
    without an intercept; Hastie, Tibshirani & Friedman 2009, ex. 7.3)."""
    x = features.double() / FEATURE_NORM
    onehot = label_mask(y, ways, x.dtype)
    gram = x @ x.T
    eye = torch.eye(len(x), dtype=x.dtype, device=x.device)
    hat = torch.linalg.solve(gram + penalty * eye, gram).T  # K (K + lambda I)^-1
    diag = hat.diagonal()[:, None]
    held = (hat @ onehot - diag * onehot) / (1 - diag)
    return (HEAD_SCALE * held).to(features.dtype)  # ridge_head's logit scale


def prototype_held_out(features: torch.Tensor, y: torch.Tensor, *, ways: int) -> torch.Tensor:
    """Leave-one-out logits ``(n, ways)`` of :func:`prototype_head`: row i against its own
    class's mean without it and every other class's mean, in one pass (each class needs 2+
    rows)."""
    onehot = label_mask(y, ways, features.dtype)
    sums, counts = onehot.T @ features, onehot.sum(0)
    protos = sums / counts.clamp_min(1.0)[:, None]
    logits = 2 * features @ protos.T - (protos**2).sum(-1)
    own = (sums[y] - features) / (counts[y] - 1).clamp_min(1.0)[:, None]
    rows = torch.arange(len(y), device=y.device)
    logits[rows, y] = 2 * (features * own).sum(-1) - (own**2).sum(-1)
    return logits


def linear_held_out(
    features: torch.Tensor,
    y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    rows: Sequence[int] | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Leave-one-out logits ``(len(rows), ways)`` of the linear head (:func:`_linear_fit`): row
    j scores ``features[rows[j]]`` with the head fitted on every other row, every fold at once.

    One Adam optimisation over stacked heads (weights ``(folds, ways, d)``), each fold's loss the
    mean cross-entropy of its kept rows: the folds' gradients are apart and Adam acts element by
    element, so each fold takes the steps :func:`_logistic_regression` takes on its rows (same
    initialisation from the fold's prototype head, learning rate and step count), the same
    numbers to float rounding, in one optimisation instead of one per fold. ``on_step`` hears
    each step of it; the block's :func:`step_hook` does not (its steps are every fold's, not one
    fold's), so a caller reports them as folds."""
    n = len(y)
    held = torch.arange(n, device=y.device) if rows is None else torch.as_tensor(rows).to(y.device)
    keep = (torch.arange(n, device=y.device)[None, :] != held[:, None]).to(features.dtype)
    onehot = label_mask(y, ways, features.dtype)  # (n, ways)
    # each fold's prototype head (prototype_head on its kept rows)
    counts = keep @ onehot  # (folds, ways)
    sums = torch.einsum("fn,nk,nd->fkd", keep, onehot, features)
    protos = sums / counts.clamp_min(1.0)[..., None]
    weight, bias = 2 * protos, -(protos**2).sum(-1)
    if config.linear_steps:
        scale = weight.norm(dim=-1).mean(-1).clamp_min(1e-6)  # (folds,), as one fit's scale
        weight = (weight / scale[:, None, None]).clone().requires_grad_(True)
        bias = (bias / scale[:, None]).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight, bias], lr=config.linear_lr)
        kept = keep.sum(-1).clamp_min(1.0)
        with torch.enable_grad():
            for i in range(config.linear_steps):
                optimizer.zero_grad()
                logits = torch.einsum("nd,fkd->fnk", features, weight) + bias[:, None, :]
                per_record = -(torch.log_softmax(logits, dim=-1) * onehot).sum(-1)  # (folds, n)
                ((per_record * keep).sum(-1) / kept).sum().backward()  # each fold: its mean
                optimizer.step()
                if on_step is not None:
                    on_step(i + 1, config.linear_steps)
    with torch.no_grad():
        return torch.einsum("fd,fkd->fk", features[held], weight) + bias


class HeldOutFit(Protocol):
    """Leave-one-out logits of a head over mapped features without refitting it per case:
    ``(features, labels, ways, config, rows=..., on_step=...) -> (len(rows), ways)``, row j
    scoring ``features[rows[j]]`` (every row when ``rows`` is None) with the head fitted on the
    other rows; ``on_step`` hears the steps of an iterative one. A mode without one refits its
    head per held-out case."""

    def __call__(
        self,
        features: torch.Tensor,
        y: torch.Tensor,
        ways: int,
        config: AdaptConfig,
        *,
        rows: Sequence[int] | None = None,
        on_step: StepHook | None = None,
    ) -> torch.Tensor: ...


def _ridge_held_out(
    features: torch.Tensor,
    y: torch.Tensor,
    ways: int,
    config: AdaptConfig,
    *,
    rows: Sequence[int] | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    every = ridge_held_out(features, y, ways=ways, penalty=config.ridge_penalty)
    return every if rows is None else every[list(rows)]


def _prototype_held_out(
    features: torch.Tensor,
    y: torch.Tensor,
    ways: int,
    config: AdaptConfig,
    *,
    rows: Sequence[int] | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    every = prototype_held_out(features, y, ways=ways)
    return every if rows is None else every[list(rows)]


def _linear_held_out(
    features: torch.Tensor,
    y: torch.Tensor,
    ways: int,
    config: AdaptConfig,
    *,
    rows: Sequence[int] | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    return linear_held_out(features, y, ways=ways, config=config, rows=rows, on_step=on_step)


def _logistic_regression(
    features: torch.Tensor,
    y: torch.Tensor,
    init: Params,
    config: AdaptConfig,
    on_step: StepHook | None = None,
) -> Params:
    """Adam on the support cross-entropy of a linear head, from the prototype head (scaled so its
    logits start in the softmax's useful range)."""
    scale = init["head.weight"].norm(dim=1).mean().clamp_min(1e-6)
    head = {k: (v / scale).clone().requires_grad_(True) for k, v in init.items()}
    optimizer = torch.optim.Adam(head.values(), lr=config.linear_lr)
    with torch.enable_grad():
        for i in range(config.linear_steps):
            optimizer.zero_grad()
            logits = features @ head["head.weight"].T + head["head.bias"]
            cross_entropy(logits, y).backward()
            optimizer.step()
            _step(on_step, i + 1, config.linear_steps)
    return {k: v.detach() for k, v in head.items()}


class AdaptedClassifier:
    """A classifier for one support set: backbone weights (shared, copied or fast), a feature map
    and a linear head."""

    def __init__(
        self,
        model: nn.Module,
        params: Params,
        buffers: Params,
        *,
        ways: int,
        config: AdaptConfig,
        features: FeatureMap = FeatureMap(),
        normalized_head: bool = False,
    ) -> None:
        self._model = model
        self._params = params
        self._buffers = buffers
        self.ways = ways
        self._config = config
        self._features = features
        self._normalized_head = normalized_head  # MAML heads act on normalised features

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``images`` under the adapted weights (before the feature map)."""
        body = {k: v for k, v in self._params.items() if not k.startswith("head.")}
        return embed(
            self._model,
            images,
            params=body,
            buffers=self._buffers,
            tta=self._config.tta,
            batch_limit=self._config.batch_limit,
        )

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores ``(n, ways)``."""
        return self.head_logits(self.embed(images))

    @torch.no_grad()
    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores ``(n, ways)`` of backbone features from :meth:`embed` (a caller that
        already holds them need not embed the images again)."""
        features = head_features(features) if self._normalized_head else self._features(features)
        return features @ self._params["head.weight"].T + self._params["head.bias"]

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(n, ways)``."""
        return torch.softmax(self.logits(images), dim=-1)


def adapt(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig | None = None,
    meta: MetaConfig = MetaConfig(),
    domain_mean: torch.Tensor | None = None,
    unlabeled_x: torch.Tensor | None = None,
    on_step: StepHook | None = None,
) -> AdaptedClassifier:
    """Adapt ``model`` to a support set.

    Args:
        model: the base backbone; it is never modified.
        support_x: pipeline output ``(n, C, S, S)``.
        support_y: labels ``0..ways-1``.
        ways: number of classes.
        config: adaptation mode and its levers (default: ``AdaptConfig()``).
        meta: the meta-learner's config (MAML inner learning rate and steps).
        domain_mean: the domain's mean feature (from ``fedfew adapt-domain``), for centring.
        unlabeled_x: unlabelled images of the task (typically the cases to classify), used for
            centring when no domain mean is known and for transductive refinement.
        on_step: called with (steps done, steps in all) after each optimisation step of the
            mode (once at the end for prototypes). An exception it raises stops the adaptation
            and propagates; nothing is returned and the base model is unchanged (a caller's
            Cancel button raises here).
    """
    config = config or AdaptConfig()
    return ADAPT_MODES[config.mode].adapt(
        model,
        support_x,
        support_y,
        ways=ways,
        config=config,
        meta=meta,
        domain_mean=domain_mean,
        unlabeled_x=unlabeled_x,
        on_step=on_step,
    )


def _frozen(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    meta: MetaConfig,
    domain_mean: torch.Tensor | None,
    unlabeled_x: torch.Tensor | None,
    on_step: StepHook | None = None,
) -> AdaptedClassifier:
    """Prototype or linear head over the unchanged backbone's mapped features."""
    params, buffers = split_params(model)
    both = support_x if unlabeled_x is None else torch.cat([support_x, unlabeled_x])
    raw = embed(model, both, tta=config.tta, batch_limit=config.batch_limit)
    fmap = model_feature_map(config, model, domain_mean=domain_mean, features=raw)
    mapped = fmap(raw)
    n = len(support_y)
    head = fit_head(
        mapped[:n], support_y, ways=ways, config=config, unlabeled=mapped[n:], on_step=on_step
    )
    _step(on_step, 1, 1)  # the head is fitted (prototypes take this one step)
    return AdaptedClassifier(
        model, {**params, **head}, buffers, ways=ways, config=config, features=fmap
    )


def _finetune(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    meta: MetaConfig,
    domain_mean: torch.Tensor | None,
    unlabeled_x: torch.Tensor | None,
    on_step: StepHook | None = None,
) -> AdaptedClassifier:
    """A few Adam steps on the support loss over head and a private copy of the backbone
    (Guo et al. 2020: fine-tuning beats meta-learning far from the source domain)."""
    work = copy.deepcopy(model)
    both = support_x if unlabeled_x is None else torch.cat([support_x, unlabeled_x])
    raw = embed(work, both, tta=config.tta, batch_limit=config.batch_limit)
    fmap = model_feature_map(config, work, domain_mean=domain_mean, features=raw)
    init = prototype_head(fmap(raw[: len(support_y)]), support_y, ways)
    # Distances of raw embeddings are large; scaling the prototype head keeps the softmax away
    # from saturation so the first steps have useful gradients.
    scale = init["head.weight"].norm(dim=1).mean().clamp_min(1e-6).detach()
    head = {k: (v / scale).clone().requires_grad_(True) for k, v in init.items()}
    optimizer = torch.optim.Adam([*work.parameters(), *head.values()], lr=config.finetune_lr)
    # nothing in the network trains (the public start): its support features never change, so
    # the steps move the head on the features embedded above instead of running it each step
    fixed = fmap(raw[: len(support_y)]) if _features_fixed(work, config) else None
    work.train()
    with torch.enable_grad():
        for i in range(config.finetune_steps):
            optimizer.zero_grad()
            mapped = fixed if fixed is not None else fmap(work(support_x))
            logits = mapped @ head["head.weight"].T + head["head.bias"]
            cross_entropy(logits, support_y).backward()
            optimizer.step()
            _step(on_step, i + 1, config.finetune_steps)
    work.eval()
    params, buffers = split_params(work)
    head = {k: v.detach() for k, v in head.items()}
    return AdaptedClassifier(
        work, {**params, **head}, buffers, ways=ways, config=config, features=fmap
    )


def _features_fixed(model: nn.Module, config: AdaptConfig) -> bool:
    """Whether fine-tuning leaves ``model``'s features of the support as first embedded: no
    parameter trains, and they were embedded without flip averaging (as the steps run it)."""
    return not config.tta and not any(p.requires_grad for p in model.parameters())


def _maml(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    meta: MetaConfig,
    domain_mean: torch.Tensor | None,
    unlabeled_x: torch.Tensor | None,
    on_step: StepHook | None = None,
) -> AdaptedClassifier:
    """MAML's inner loop from the meta-learned weights (first order: only inference follows)."""
    params, buffers = split_params(model)
    was_training = model.training
    model.eval()
    try:
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
    finally:
        model.train(was_training)
    _step(on_step, 1, 1)  # the inner loop runs as one call (models.meta.maml_adapt)
    fast = {k: v.detach() for k, v in fast.items()}
    return AdaptedClassifier(model, fast, buffers, ways=ways, config=config, normalized_head=True)


@dataclass(frozen=True)
class AdaptMode:
    """One adaptation mode: how it fits a classifier, whether the backbone stays as it is, and
    what the dashboard says of it and needs before offering it."""

    adapt: Callable[..., AdaptedClassifier]
    frozen_backbone: bool
    uses_feature_map: bool  # whether centring / normalisation apply (MAML has its own head)
    description: str
    head: HeadFit | None = None  # a frozen-backbone mode's head fitter (fit_head)
    help: str = ""  # plain words for clinicians (how long it takes is measured, not said)
    # what it needs of the base model: "" when the model supports it, else why not in words
    requirement: Callable[[nn.Module, MetaConfig], str] = lambda model, meta: ""
    min_cases_per_class: int = 1  # labelled cases of each class it needs
    # its head's leave-one-out logits without a refit per held-out case (closed form, or every
    # fold in one batched fit; None: refitted per case); the same numbers as refitting fit_head
    # without unlabelled cases
    held_out: HeldOutFit | None = None


# name -> adaptation mode; a new mode is one new entry.
# The first is the default (AdaptConfig.mode) and the dashboard's first choice.
MAML_LEARNERS = frozenset({"maml", "fomaml"})  # META_LEARNERS that learn an initialisation


def _has_trainable_weights(model: nn.Module, meta: MetaConfig) -> str:
    if any(p.requires_grad for p in model.parameters()):
        return ""
    return "this base model's weights are all frozen, so there is nothing to fine-tune"


def _maml_trained(model: nn.Module, meta: MetaConfig) -> str:
    if meta.learner in MAML_LEARNERS:
        return ""
    return (
        f"this base model was trained with {meta.learner}, not MAML; MAML's few steps "
        "only work from a model meta-trained for them"
    )


# name -> adaptation mode; a new mode is one new entry.
# The first is the default (AdaptConfig.mode) and the dashboard's first choice.
ADAPT_MODES: Catalogue[AdaptMode] = Catalogue(
    "adaptation mode",
    {
        "ridge": AdaptMode(
            _frozen,
            True,
            True,
            "least squares on the features (instant)",
            _ridge_fit,
            held_out=_ridge_held_out,
            help="ridge: a least-squares classifier on the features; instant, and steady with "
            "few cases",
        ),
        "prototype": AdaptMode(
            _frozen,
            True,
            True,
            "class means of the features (instant)",
            _prototype_fit,
            held_out=_prototype_held_out,
            help="prototype: the average of each class's cases; the most robust choice",
        ),
        "linear": AdaptMode(
            _frozen,
            True,
            True,
            "logistic regression on the features",
            _linear_fit,
            held_out=_linear_held_out,
            help="linear: a linear classifier on the features; can separate classes that "
            "prototypes mix up",
        ),
        "finetune": AdaptMode(
            _finetune,
            False,
            True,
            "fine-tunes head and network (seconds)",
            help="finetune: also adjusts the network itself; can help when the cases look "
            "unlike the training data",
            requirement=_has_trainable_weights,
            # one case per class is memorised, and leave-one-out (the reliability check) needs
            # a second case of each class to say whether it was
            min_cases_per_class=2,
        ),
        "maml": AdaptMode(
            _maml,
            False,
            False,
            "MAML's inner loop (for MAML-trained models)",
            help="maml: the few learning steps a MAML-trained model was trained to take",
            requirement=_maml_trained,
        ),
    },
)
