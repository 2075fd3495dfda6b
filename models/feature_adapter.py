"""A small trainable adapter between a frozen public encoder and the few-shot head.

The public encoder (models/public_start.py) is a fixed function: its features are computed once
per image (models/feature_cache.py in memory, models/feature_store.py on a node's disk). What a
federation then trains is the adapter alone, on those cached features: a few thousand parameters,
so a DP step costs milliseconds instead of the encoder's backward pass at 224 px, and the noise
DP adds is spread over few coordinates. The adapter takes the encoder's multi-scale features,
normalises each part (as the adaptation's feature map does) and re-weighs them, so it learns
which features tell cases of a modality apart: a learned metric for the prototypes, trained with
the episodic ProtoNet loss (Tobaben et al. 2023: FiLM-sized parameter sets are where DP works on a
frozen public encoder). At its start every adapter is the identity on the normalised features.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from models.catalogue import Catalogue
from models.feature_cache import cache_for, module_digest
from models.freezing import is_fully_frozen


def normalise_parts(features: torch.Tensor, parts: tuple[int, ...]) -> torch.Tensor:
    """Each part of concatenated features ``(n, d)`` scaled to unit L2 norm."""
    pieces = features.split(list(parts), dim=-1)
    return torch.cat([p / p.norm(dim=-1, keepdim=True).clamp_min(1e-6) for p in pieces], dim=-1)


class FeatureScale(nn.Module):
    """One learned scale per feature (a diagonal metric): ``d`` parameters, started at 1."""

    def __init__(self, parts: tuple[int, ...]) -> None:
        super().__init__()
        self.parts = parts
        self.out_features = sum(parts)
        self.scale = nn.Parameter(torch.ones(sum(parts)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Re-weigh part-normalised features ``(n, d)`` (any trailing 1x1 dims are dropped)."""
        return normalise_parts(features.flatten(1), self.parts) * self.scale


class LowRankAdapter(FeatureScale):
    """The per-feature scale plus a residual rank-``rank`` map ``x + U V x`` (U starts at 0, so
    the adapter starts as the identity): it can also mix features across depths."""

    def __init__(self, parts: tuple[int, ...], rank: int = 8) -> None:
        super().__init__(parts)
        dim = sum(parts)
        generator = torch.Generator().manual_seed(0)  # public, data-independent start
        self.down = nn.Parameter(torch.randn(rank, dim, generator=generator) / dim**0.5)
        self.up = nn.Parameter(torch.zeros(dim, rank))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Scaled features plus the low-rank residual."""
        scaled = super().forward(features)
        return scaled + (scaled @ self.down.T) @ self.up.T


def public_basis(features: torch.Tensor, parts: tuple[int, ...], size: int) -> torch.Tensor:
    """The top ``size`` principal directions ``(d, size)`` of public images' unit features (each
    centred on their mean, each part normalised, the whole at norm 1, as the adaptation's feature
    map maps them): where a within-class release is made (the operator's step, public data only)."""
    centred = features.double() - features.double().mean(0)
    unit = normalise_parts(centred, parts) / len(parts) ** 0.5
    unit = unit - unit.mean(0)
    _, vectors = torch.linalg.eigh(unit.T @ unit / len(unit))
    return vectors[:, -size:]


class WithinClassMetric(nn.Module):
    """The domain's within-class metric, released by the federation under DP: no parameter
    trains. Its forward normalises each part (as the scale adapter at its start); it carries the
    statistics the sites need and the metric the adaptation's feature map applies after
    centring (:meth:`transform`), both set from DP releases (privacy/within_class_release.py,
    mechanism ``dp-within-class``).

    Buffers: ``basis`` (d, p), public directions the moments are released in, set by the
    operator from public images (:meth:`fit_public_basis`); ``centre`` (d), the domain's released
    centre; ``inner`` (p, p), the metric inside the basis (identity outside it); ``stage``: 0
    before the centre is released, 1 once it is, 2 once a metric is.
    """

    BASIS = 512  # public directions: of 1,712 on Lite0 (bench/results/demo_within_class*.json)

    def __init__(self, parts: tuple[int, ...], basis_size: int = BASIS) -> None:
        super().__init__()
        self.parts = parts
        self.out_features = sum(parts)
        size = min(basis_size, self.out_features)
        self.register_buffer("basis", torch.zeros(self.out_features, size))
        self.register_buffer("centre", torch.zeros(self.out_features))
        self.register_buffer("inner", torch.eye(size))
        self.register_buffer("stage", torch.tensor(0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Part-normalised features ``(n, d)`` (any trailing 1x1 dims are dropped)."""
        return normalise_parts(features.flatten(1), self.parts)

    @torch.no_grad()
    def fit_public_basis(self, features: torch.Tensor) -> None:
        """Take the basis from public images' encoder features: the top principal directions
        of their unit features, each centred on the public images' mean and part-normalised."""
        basis = public_basis(self(features).double(), self.parts, self.basis.shape[1])
        self.basis.copy_(basis.to(self.basis.dtype))

    def transform(self, mapped: torch.Tensor) -> torch.Tensor:
        """Mapped features (centred, parts normalised) times the metric, at their own norm; the
        identity until a metric is released."""
        if int(self.stage) < 2:
            return mapped
        basis = self.basis.to(mapped.dtype)
        inside = mapped @ basis
        eye = torch.eye(len(self.inner), dtype=mapped.dtype, device=mapped.device)
        out = mapped + (inside @ (self.inner.to(mapped.dtype) - eye)) @ basis.T
        scale = mapped.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out * scale


def feature_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The metric a model's adapter applies after the feature map (None: none)."""
    adapter = getattr(model, "adapter", None)
    return adapter.transform if isinstance(adapter, WithinClassMetric) else None


# name -> builder of an adapter from the encoder's feature part sizes; a new adapter is one entry.
# "none" in BackboneConfig.adapter means no adapter (the encoder's features as they are).
ADAPTERS: Catalogue[Callable[[tuple[int, ...]], nn.Module]] = Catalogue(
    "adapter",
    {
        "scale": FeatureScale,
        "low-rank": LowRankAdapter,
        "within-class": WithinClassMetric,
    },
)


class AdaptedEncoder(nn.Module):
    """A frozen encoder followed by a trainable feature adapter.

    Attributes:
        encoder: the frozen network (no parameter trains; BatchNorm on fixed statistics).
        adapter: the trainable map on its features (an :data:`ADAPTERS` entry).
    """

    def __init__(self, encoder: nn.Module, adapter: str) -> None:
        super().__init__()
        if not is_fully_frozen(encoder):
            raise ValueError("an adapter sits on a frozen encoder: set trainable = 'none'")
        self.encoder = encoder
        parts = tuple(getattr(encoder, "feature_parts", ())) or (int(encoder.out_features),)
        self.adapter = ADAPTERS[adapter](parts)
        self.feature_parts = parts
        self.out_features = int(encoder.out_features)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's features; outside autograd each image is embedded once and
        kept in the encoder's feature cache (the encoder is a fixed function)."""
        if torch.is_grad_enabled():  # inside a gradient transform: plain, uncached
            return self.encoder(images)
        return cache_for(self.encoder).features(self.encoder, images, self.encoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Adapted features ``(B, d)`` of images ``(B, C, S, S)``."""
        return self.adapter(self.encode(images))


def encoder_of(model: nn.Module) -> nn.Module:
    """The network that holds a backbone's public weights (the encoder of an adapted one)."""
    return model.encoder if isinstance(model, AdaptedEncoder) else model


_SHARED: OrderedDict[str, nn.Module] = OrderedDict()  # encoder digest -> the one object kept
SHARED_ENCODERS = 2  # a process holds one encoder, two while a new version arrives


def share_encoder(model: AdaptedEncoder) -> AdaptedEncoder:
    """Give ``model`` the encoder object this process already holds with the same tensors, so
    its features cached in an earlier round serve this one (a server evaluating every round's
    model, where only the adapter changed); returns ``model``."""
    digest = module_digest(model.encoder)
    if digest in _SHARED:
        model.encoder = _SHARED[digest]
        _SHARED.move_to_end(digest)
    else:
        _SHARED[digest] = model.encoder
        while len(_SHARED) > SHARED_ENCODERS:
            _SHARED.popitem(last=False)
    return model
