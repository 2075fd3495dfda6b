"""Features of a frozen encoder, computed once per image and kept in memory.

A frozen encoder (no parameter trains, BatchNorm on fixed statistics: models/freezing.py) is a
fixed function, so an image's features never change while its weights do not. The dashboard
embeds the same support cases for adaptation, the reliability check, the unusual-image check and
the nearest cases; at 224 px each pass costs about 37 ms per image on 2 cores. The cache keys each
image by a digest of its pixels, per model object, and forgets everything when any of the
model's tensors is replaced or changed in place (tensor version counters), so loading new weights
into the same module can never serve stale features.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

MAX_IMAGES = 4096  # per model: 4,096 x 1,712 floats is 28 MB, a day of one clinician's cases


def image_digest(image: torch.Tensor) -> bytes:
    """A digest of one image's pixels, dtype and shape."""
    data = image.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.digest()


def module_digest(module: nn.Module) -> str:
    """A SHA-256 of a module's tensors (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.numpy().tobytes() if data.dtype != torch.bfloat16 else b"")
    return digest.hexdigest()


def _state_version(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version of every tensor of the model: any change alters it."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((id(t), t._version) for t in tensors)


class FeatureCache:
    """Image digest -> features for one model, least recently used dropped past a bound."""

    def __init__(self, max_images: int = MAX_IMAGES) -> None:
        self.max_images = max_images
        self._rows: OrderedDict[tuple[bytes, str], torch.Tensor] = OrderedDict()
        self._version: tuple[tuple[int, int], ...] = ()

    def features(
        self,
        model: nn.Module,
        images: torch.Tensor,
        compute: Callable[[torch.Tensor], torch.Tensor],
        *,
        variant: str = "",
    ) -> torch.Tensor:
        """Features ``(n, d)`` of ``images``: cached rows as they are, the others from
        ``compute(missing_images)`` (then kept). ``variant`` separates ways of embedding (flip
        averaging)."""
        version = _state_version(model)
        if version != self._version:
            self._rows.clear()
            self._version = version
        keys = [(image_digest(img), variant) for img in images]
        unique = list(dict.fromkeys(keys))
        todo = [k for k in unique if k not in self._rows]
        if todo:
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            computed = compute(images[[first[k] for k in todo]])
            for k, row in zip(todo, computed, strict=True):
                self._rows[k] = row.detach().clone()
        for k in unique:
            self._rows.move_to_end(k)
        # Stacked before the bound is applied: a call with more images than the bound still gets
        # every row (its oldest ones are then dropped from the cache).
        out = torch.stack([self._rows[k] for k in keys]) if keys else torch.empty(0)
        while len(self._rows) > self.max_images:
            self._rows.popitem(last=False)
        return out


_CACHES: weakref.WeakKeyDictionary[nn.Module, FeatureCache] = weakref.WeakKeyDictionary()


def cache_for(model: nn.Module) -> FeatureCache:
    """The feature cache of ``model`` (made on first use, gone with the model)."""
    if model not in _CACHES:
        _CACHES[model] = FeatureCache()
    return _CACHES[model]
