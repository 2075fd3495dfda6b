"""Public architectures (MONAI's ResNet, EfficientNet and ViT) as embedding backbones.

Built without downloading anything; public weights (ImageNet, RadImageNet, self-supervised) come
from a local file through ``models.weights.load_weights``. timm would offer more architectures,
but every timm 1.x imports torchvision, which does not import beside the pinned CPU torch here
(``operator torchvision::nms does not exist``; STACK.md), so MONAI's are used instead.

Each encoder keeps MONAI's state-dict keys (torchvision-style ``conv1``/``layer4`` for ResNet,
lukemelas-style ``_blocks`` for EfficientNet), so those public files load without renaming, and
declares ``out_features`` and ``last_block`` (for the ``last-block`` subset in models/freezing.py).
``norm="group"`` replaces BatchNorm by GroupNorm (trainable from scratch, Opacus-valid);
``norm="batch"`` keeps BatchNorm for public statistics, run frozen (models/freezing.py, the rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from monai.networks.nets import EfficientNetBN, ResNet, ViT
from monai.networks.nets.efficientnet import MBConvBlock
from monai.networks.nets.resnet import ResNetBlock, get_inplanes
from torch import nn

from models.efficientnet_lite import efficientnet_lite0, efficientnet_lite1, efficientnet_lite2
from models.freezing import batchnorm_to_groupnorm, freeze_batchnorm

if TYPE_CHECKING:
    from models.networks import BackboneConfig

# Backbones whose public weights carry BatchNorm statistics (``BackboneConfig.norm="batch"``).
LITE_BACKBONES = frozenset({"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"})
BATCHNORM_BACKBONES = frozenset({"resnet10", "resnet18", "efficientnet_b0", *LITE_BACKBONES})
# Backbones that can add intermediate blocks' pooled features to their embedding.
MULTI_SCALE_BACKBONES = LITE_BACKBONES

VIT_PATCH = 8  # 64 px images give 8x8 = 64 tokens, the token count of ViT-Ti at 224 px / 28
VIT_HIDDEN = 192  # ViT-Tiny (Touvron et al. 2021, DeiT-Ti): hidden 192, 12 layers, 3 heads
VIT_LAYERS = 12
VIT_HEADS = 3
VIT_MLP = 4 * VIT_HIDDEN  # the customary MLP ratio 4


def _settle_norm(model: nn.Module, config: BackboneConfig) -> None:
    """MONAI builds BatchNorm (and its ResNet ignores ``norm`` inside the residual stages): turn
    it into GroupNorm to train from scratch, or freeze it for public statistics."""
    if config.norm == "group":
        batchnorm_to_groupnorm(model, config.groups)
    else:
        freeze_batchnorm(model)


class ResNetEncoder(ResNet):
    """MONAI's 2D ResNet without its classifier: ``(B, C, S, S)`` to ``(B, 512)``."""

    def __init__(self, config: BackboneConfig, *, layers: list[int]) -> None:
        super().__init__(
            ResNetBlock,
            layers,
            get_inplanes(),
            spatial_dims=2,
            n_input_channels=config.in_channels,
            feed_forward=False,  # no classifier: the pooled 512-d features are the embedding
            act=("relu", {"inplace": False}),  # in-place activations break per-example grads
        )
        self.out_features = get_inplanes()[-1] * ResNetBlock.expansion
        self.last_block = "layer4"
        _settle_norm(self, config)


def resnet10(config: BackboneConfig) -> ResNetEncoder:
    """ResNet-10 (one basic block per stage; 4.9M parameters in 2D)."""
    return ResNetEncoder(config, layers=[1, 1, 1, 1])


def resnet18(config: BackboneConfig) -> ResNetEncoder:
    """ResNet-18 (He et al. 2016; 11.2M parameters in 2D)."""
    return ResNetEncoder(config, layers=[2, 2, 2, 2])


class EfficientNetEncoder(EfficientNetBN):
    """MONAI's EfficientNet-B0 (Tan and Le 2019) up to the pooled 1280-d features."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__(
            "efficientnet-b0",
            pretrained=False,  # never download; weights come from a local file
            spatial_dims=2,
            in_channels=config.in_channels,
            num_classes=1,
        )
        # features before the classifier are the embedding
        self._fc = nn.Identity()  # type: ignore[assignment]
        self._dropout = nn.Identity()  # type: ignore[assignment]
        # Deterministic, plain autograd: per-episode gradients (torch.func) need a forward
        # without random drop-connect and without the custom autograd Function of memswish.
        self.set_swish(memory_efficient=False)
        for block in self.modules():
            if isinstance(block, MBConvBlock):
                block.drop_connect_rate = 0.0
        self.out_features = int(self._conv_head.out_channels)
        self.last_block = f"_blocks.{len(self._blocks) - 1}"
        _settle_norm(self, config)


def efficientnet_b0(config: BackboneConfig) -> EfficientNetEncoder:
    """EfficientNet-B0 (4.0M parameters)."""
    return EfficientNetEncoder(config)


class ViTEncoder(ViT):
    """A ViT-Tiny-sized MONAI ViT on 8-px patches; the embedding is the mean of its tokens
    (no class token: mean pooling works as well for small ViTs, Zhai et al. 2022)."""

    def __init__(self, config: BackboneConfig) -> None:
        if config.image_size % VIT_PATCH:
            raise ValueError(
                f"BackboneConfig.image_size={config.image_size} must divide by the ViT patch "
                f"size {VIT_PATCH} for vit_tiny"
            )
        super().__init__(
            in_channels=config.in_channels,
            img_size=config.image_size,
            patch_size=VIT_PATCH,
            hidden_size=VIT_HIDDEN,
            mlp_dim=VIT_MLP,
            num_layers=VIT_LAYERS,
            num_heads=VIT_HEADS,
            spatial_dims=2,
            classification=False,
            dropout_rate=0.0,  # deterministic forward for per-episode gradients
        )
        self.out_features = VIT_HIDDEN
        self.last_block = f"blocks.{len(self.blocks) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images ``(B, C, S, S)`` to ``(B, 192)`` (mean over the patch tokens)."""
        tokens, _ = super().forward(x)
        return tokens.mean(dim=1)


def vit_tiny(config: BackboneConfig) -> ViTEncoder:
    """ViT-Tiny-sized (5.4M parameters at 64 px); LayerNorm only, so no ``norm="batch"``."""
    return ViTEncoder(config)


# name -> builder, merged into ``models.networks.BACKBONES``.
PUBLIC_BACKBONES: dict[str, Callable[[BackboneConfig], nn.Module]] = {
    "resnet10": resnet10,
    "resnet18": resnet18,
    "efficientnet_b0": efficientnet_b0,
    "vit_tiny": vit_tiny,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite1": efficientnet_lite1,
    "efficientnet_lite2": efficientnet_lite2,
}
