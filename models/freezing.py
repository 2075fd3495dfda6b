"""Frozen parts of a backbone: which parameters train, and BatchNorm that never mixes examples.

The rule (DESIGN.md section 3; docs/privacy.md relies on it): DP clipping bounds one patient's
influence only if each image's embedding depends on that image alone. BatchNorm in train mode
normalises with the batch's statistics, so one patient's images shift every other image's
embedding. Hence:

1. A backbone trained from scratch uses GroupNorm or LayerNorm (``BackboneConfig.norm="group"``).
2. A backbone that loads public weights with BatchNorm statistics (``norm="batch"``) runs every
   BatchNorm layer as :class:`FrozenBatchNorm2d`: always in eval mode, on the loaded statistics,
   which never update. A BatchNorm on frozen statistics is a fixed per-channel affine map, so its
   ``weight`` and ``bias`` may still train (the ``norm-affine`` subset) without mixing examples.
3. :func:`check_batchnorm_frozen` refuses any other BatchNorm (:class:`BatchNormError`);
   :func:`apply_freezing` runs it on every backbone that ``build_backbone`` makes.

Which parameters train is a named subset (:data:`PARAMETER_SUBSETS`). Parameters outside it get
``requires_grad=False``; modules whose parameters are all frozen stay in eval mode even when the
model is put in train mode (a forward pre-hook), so dropout or drop-path never perturb a frozen
encoder and its features can be cached (:func:`is_fully_frozen`). Only trainable parameters are
differentiated, clipped and noised (``privacy.dp_meta``, ``privacy.dp_supervised``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from models.catalogue import Catalogue
from models.errors import BatchNormError

if TYPE_CHECKING:
    from models.networks import BackboneConfig

# Normalisation layers whose affine weight and bias form the ``norm-affine`` subset.
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.GroupNorm, nn.LayerNorm, _BatchNorm, _InstanceNorm)
FILM_ATTR = "film"  # a FiLM layer marks itself ``film = True`` to join the ``norm-affine`` subset
LAST_BLOCK_ATTR = "last_block"  # a backbone may name its last block; else it is found by shape


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d on frozen statistics: always in eval mode, so the running mean and variance
    never update and no example's output depends on another's. Same state-dict keys as
    ``nn.BatchNorm2d``, so public weights load unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.training = False  # from birth: a module is built in train mode without train()

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        """Stay in eval mode whatever ``mode`` says."""
        return super().train(False)


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``model`` by a :class:`FrozenBatchNorm2d` carrying the
    same parameters and statistics (in place; returns ``model``)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, FrozenBatchNorm2d):
            frozen = FrozenBatchNorm2d(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=True,
            )
            frozen.load_state_dict(child.state_dict(), strict=False)
            setattr(model, name, frozen)
        else:
            freeze_batchnorm(child)
    return model


def batchnorm_to_groupnorm(model: nn.Module, groups: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``model`` by a fresh ``nn.GroupNorm(groups, C)`` (in
    place; returns ``model``): the trainable-from-scratch form, as Opacus's ``ModuleValidator.fix``
    does but with the backbone's own number of groups."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(groups, child.num_features, eps=child.eps))
        else:
            batchnorm_to_groupnorm(child, groups)
    return model


def check_batchnorm_frozen(model: nn.Module) -> None:
    """Raise if any BatchNorm layer could update its statistics or use a batch's statistics.

    Collects every offending layer and raises once (as Opacus's ``ModuleValidator`` does).

    Raises:
        BatchNormError: names each BatchNorm layer that is not a :class:`FrozenBatchNorm2d`
            with running statistics.
    """
    problems = [
        f"{name or '<root>'} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        and not (isinstance(module, FrozenBatchNorm2d) and module.running_mean is not None)
    ]
    if problems:
        raise BatchNormError(
            "BatchNorm layers whose statistics would mix examples (DP and federation need "
            f"per-example independence): {', '.join(problems)}. Build the backbone with "
            "norm='group' to train it, or norm='batch' to keep public statistics frozen."
        )


Subset = Callable[[nn.Module], frozenset[str]]


def _all(model: nn.Module) -> frozenset[str]:
    return frozenset(name for name, _ in model.named_parameters())


def _none(model: nn.Module) -> frozenset[str]:
    return frozenset()


def _norm_affine(model: nn.Module) -> frozenset[str]:
    return frozenset(
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, NORM_TYPES) or getattr(module, FILM_ATTR, False)
        for name, _ in module.named_parameters(recurse=False)
    )


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def last_block_name(model: nn.Module) -> str:
    """The name of ``model``'s last block: its ``last_block`` attribute when it declares one,
    else the last parameter-holding child at the first level with more than one such child
    (``blocks.3`` for Conv-4 and ResNet-12)."""
    declared = getattr(model, LAST_BLOCK_ATTR, None)
    if isinstance(declared, str):
        return declared
    module, prefix = model, ""
    while True:
        children = [(n, c) for n, c in module.named_children() if _has_parameters(c)]
        if not children:
            return prefix.rstrip(".")
        name, child = children[-1]
        if len(children) > 1:
            return prefix + name
        module, prefix = child, f"{prefix}{name}."


def _last_block(model: nn.Module) -> frozenset[str]:
    block = last_block_name(model)
    names = [name for name, _ in model.named_parameters()]
    start = next((i for i, n in enumerate(names) if n.startswith(f"{block}.")), len(names))
    return frozenset(names[start:])


# name -> the parameters that train. "all": full training; "norm-affine": normalisation (and
# FiLM) scale and shift only, the few parameters DP can tune well on a frozen public encoder;
# "last-block": the last block and everything after it (classic partial fine-tuning);
# "none": a fixed feature extractor whose features can be cached (only heads adapt).
PARAMETER_SUBSETS: Catalogue[Subset] = Catalogue(
    "parameter subset",
    {
        "all": _all,
        "norm-affine": _norm_affine,
        "last-block": _last_block,
        "none": _none,
    },
)


def _stay_in_eval_when_frozen(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a module whose parameters are all frozen runs in eval mode."""
    if module.training and not any(p.requires_grad for p in module.parameters()):
        module.eval()


def apply_freezing(model: nn.Module, config: BackboneConfig) -> nn.Module:
    """Freeze the parameters outside ``config.trainable``'s subset and keep frozen modules in
    eval mode (in place; returns ``model``). Idempotent.

    Raises:
        BatchNormError: the model has a BatchNorm layer whose statistics are not frozen.
    """
    check_batchnorm_frozen(model)
    trainable = PARAMETER_SUBSETS[config.trainable](model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    frozen_above: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{p}.") for p in frozen_above) or not _has_parameters(module):
            continue
        # A ModuleList is never called, so its hook would never run: hook its items instead.
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        if not any(p.requires_grad for p in module.parameters()):
            frozen_above.append(name)
            if _stay_in_eval_when_frozen not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_stay_in_eval_when_frozen)
            if name == "":
                break
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The named parameters that train (``requires_grad``): the only ones differentiated,
    clipped, noised and updated."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def frozen_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The named parameters that do not train (passed as constants to functional calls)."""
    return {name: p for name, p in model.named_parameters() if not p.requires_grad}


def is_fully_frozen(model: nn.Module) -> bool:
    """True when no parameter trains: the encoder is a fixed function in eval mode, so its
    features for an image can be computed once and cached."""
    return not any(p.requires_grad for p in model.parameters())
