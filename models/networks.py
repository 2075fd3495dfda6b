"""Embedding backbones built from MONAI blocks, GroupNorm only (DP and federation need per-example
independence, which BatchNorm breaks); public architectures live in models/public_backbones.py and
frozen parts in models/freezing.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn

from models.catalogue import Catalogue
from models.feature_adapter import ADAPTERS, AdaptedEncoder
from models.freezing import PARAMETER_SUBSETS, apply_freezing
from models.public_backbones import BATCHNORM_BACKBONES, MULTI_SCALE_BACKBONES, PUBLIC_BACKBONES

NORMS = ("group", "batch")  # "batch" only for public weights with BatchNorm statistics (frozen)
# What the embedding is: the last layer's pooled features, or (multi-scale backbones) those of
# intermediate blocks too, concatenated (each part centred and normalised on its own).
FEATURES = ("head", "multi-scale")
NO_ADAPTER = "none"  # BackboneConfig.adapter: the encoder's features as they are


@dataclass(frozen=True)
class BackboneConfig:
    """Which embedding network to build."""

    name: str = "conv4"  # Conv-4: the few-shot standard, fast enough for DP-SGD on 2 CPU cores
    in_channels: int = 3  # the pipeline fixes every modality to 3 channels
    width: int = 64  # Conv-4's customary 64 filters per layer
    image_size: int = 64  # must match PipelineConfig.image_size
    groups: int = 8  # GroupNorm groups: 8 divides every width used here
    norm: str = "group"  # GroupNorm trains from scratch; "batch" keeps public statistics frozen
    trainable: str = "all"  # parameter subset that trains (models/freezing.PARAMETER_SUBSETS)
    features: str = "head"  # the embedding: the head's pooled features, or "multi-scale"
    # A trainable adapter on a frozen encoder's features (models/feature_adapter.py ADAPTERS):
    # what a federation trains when the encoder stays fixed and its features are cached.
    adapter: str = NO_ADAPTER

    def __post_init__(self) -> None:
        if self.name not in BACKBONES:
            raise ValueError(
                f"BackboneConfig.name must be one of {sorted(BACKBONES)}, got {self.name!r}"
            )
        for field in ("in_channels", "width", "image_size", "groups"):
            if getattr(self, field) < 1:
                raise ValueError(f"BackboneConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.width % self.groups:
            raise ValueError(
                f"BackboneConfig.width={self.width} must divide by groups={self.groups}"
            )
        if self.image_size < 16:
            raise ValueError(f"BackboneConfig.image_size must be >= 16, got {self.image_size}")
        batch_ok = self.name in BATCHNORM_BACKBONES
        if self.norm not in NORMS or (self.norm == "batch" and not batch_ok):
            raise ValueError(
                f"BackboneConfig.norm must be one of {NORMS} ('batch' only for "
                f"{sorted(BATCHNORM_BACKBONES)}), got {self.norm!r} for {self.name!r}"
            )
        if self.features not in FEATURES or (
            self.features == "multi-scale" and self.name not in MULTI_SCALE_BACKBONES
        ):
            raise ValueError(
                f"BackboneConfig.features must be one of {FEATURES} ('multi-scale' only for "
                f"{sorted(MULTI_SCALE_BACKBONES)}), got {self.features!r} for {self.name!r}"
            )
        if self.trainable not in PARAMETER_SUBSETS:
            raise ValueError(
                f"BackboneConfig.trainable must be one of {sorted(PARAMETER_SUBSETS)}, "
                f"got {self.trainable!r}"
            )
        if self.adapter != NO_ADAPTER and (
            self.adapter not in ADAPTERS or self.trainable != "none"
        ):
            raise ValueError(
                f"BackboneConfig.adapter must be {NO_ADAPTER!r} or one of {sorted(ADAPTERS)} "
                f"on a frozen encoder (trainable 'none'), got {self.adapter!r} with trainable "
                f"{self.trainable!r}"
            )

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with every model."""
        return asdict(self)


def _conv(cin: int, cout: int, groups: int, *, act: bool = True) -> Convolution:
    return Convolution(
        spatial_dims=2,
        in_channels=cin,
        out_channels=cout,
        kernel_size=3,
        act="RELU" if act else None,
        norm=("GROUP", {"num_groups": groups}),
    )


class Conv4(nn.Module):
    """Four conv-GroupNorm-ReLU-maxpool blocks (Vinyals et al. 2016; Snell et al. 2017)."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        chans = [config.in_channels] + [config.width] * 4
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(_conv(chans[i], chans[i + 1], config.groups), nn.MaxPool2d(2))
                for i in range(4)
            ]
        )
        side = config.image_size // 16
        self.out_features = config.width * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images ``(B, C, S, S)`` to ``(B, out_features)``."""
        return self.blocks(x).flatten(1)


class ResidualBlock(nn.Module):
    """Three 3x3 convolutions with a projected shortcut, then 2x2 max-pool (ResNet-12 style)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(cin, cout, groups),
            _conv(cout, cout, groups),
            _conv(cout, cout, groups, act=False),
        )
        self.shortcut = Convolution(
            spatial_dims=2,
            in_channels=cin,
            out_channels=cout,
            kernel_size=1,
            act=None,
            norm=("GROUP", {"num_groups": groups}),
        )
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum, activation and downsampling."""
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Module):
    """ResNet-12 (Oreshkin et al. 2018) at reduced widths so it trains on a CPU."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        w = config.width
        widths = [config.in_channels, w, w * 3 // 2, w * 2, w * 4]
        self.blocks = nn.Sequential(
            *[ResidualBlock(widths[i], widths[i + 1], config.groups) for i in range(4)]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images ``(B, C, S, S)`` to ``(B, out_features)``."""
        return self.pool(self.blocks(x)).flatten(1)


BackboneBuilder = Callable[[BackboneConfig], nn.Module]

# name -> builder of an embedding network with attribute ``out_features``; a new architecture is
# one new entry. BatchNorm only frozen (models/freezing.py states the rule and checks it).
BACKBONES: Catalogue[BackboneBuilder] = Catalogue(
    "backbone", {"conv4": Conv4, "resnet12": ResNet12, **PUBLIC_BACKBONES}
)


def build_backbone(config: BackboneConfig) -> nn.Module:
    """Build the embedding network named by ``config`` (attribute ``out_features`` is its size),
    with the parameters outside ``config.trainable`` frozen, and its adapter if it names one."""
    encoder = apply_freezing(BACKBONES[config.name](config), config)
    return encoder if config.adapter == NO_ADAPTER else AdaptedEncoder(encoder, config.adapter)
