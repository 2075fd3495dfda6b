"""Preparing a model for a new modality from a hospital's own unlabelled images.

Nothing here reads a label, and nothing computed here leaves the hospital: the adapted model and
its domain statistics are a local model version. Anything derived from it that is to be shared
must first pass through an accounted DP mechanism (docs/privacy.md, "Local domain adaptation").

Methods (registry ``DOMAIN_METHODS``), measured in ``bench/new_modality.py``:

- ``statistics``: only the domain's mean feature, for centring at adaptation time (SimpleShot);
- ``batch-statistics``: every BatchNorm layer's statistics re-estimated on the unlabelled images
  (AdaBN, Li et al. 2018), then the domain's mean feature; nothing trains, so it suits a frozen
  encoder such as the public start;
- ``contrastive``: SimCLR on the unlabelled images, with feature distillation from the source
  model so its knowledge is kept (STARTUP, Phoo & Hariharan 2021; Islam et al. 2021), then the
  domain's mean feature of the adapted encoder;
- ``contrastive-norm``: the same, training only the normalisation layers' affine parameters.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.adaptation import embed
from models.catalogue import Catalogue
from models.errors import DataError, NothingToTrainError
from models.freezing import is_fully_frozen
from models.guard import IMAGE_SUFFIXES, file_suffix
from models.model_dir import LoadedModel, save_model_dir
from models.pipeline import PipelineConfig
from models.readers import load_files, load_npz_images
from models.self_supervised import ContrastiveConfig, contrastive_train


@dataclass(frozen=True)
class UnlabeledImages:
    """Images of one modality without labels, as the shared pipeline outputs them."""

    images: np.ndarray  # float32 (N, C, S, S)
    source: str  # what they were read from (kept in the local model record)
    skipped: int  # unreadable files left out (each reported when loaded)

    @property
    def digest(self) -> str:
        """SHA-256 of the pixel arrays: the local record names the exact images used."""
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()


def load_unlabeled(path: str | Path, config: PipelineConfig = PipelineConfig()) -> UnlabeledImages:
    """Read unlabelled images: an ``.npz`` set, a folder (searched recursively) or a CSV manifest
    with a ``path`` column. Labels in the file are never read.

    Raises:
        DataError: nothing readable, or an unknown kind of source.
    """
    p = Path(path)
    if p.suffix.lower() == ".npz":
        return UnlabeledImages(images=load_npz_images(p, config), source=p.name, skipped=0)
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and not f.name.startswith(".") and file_suffix(f) in IMAGE_SUFFIXES
        )
    elif p.is_file() and p.suffix.lower() == ".csv":
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if "path" not in (reader.fieldnames or ()):
                raise DataError(f"{p}: a manifest of unlabelled images needs a 'path' column")
            files = [p.parent / row["path"] for row in reader if row.get("path")]
    else:
        raise DataError(f"{p}: give an .npz file, a folder of images or a .csv with a path column")
    if not files:
        raise DataError(f"{p}: no image files found")
    result = load_files(files, config)
    if not result.paths:
        raise DataError(f"{p}: none of the {len(files)} images could be loaded")
    return UnlabeledImages(images=result.images, source=p.name, skipped=len(result.errors))


@dataclass(frozen=True)
class DomainConfig:
    """How to prepare a model for a modality (measured against no preparation in
    bench/results/new_modality.json)."""

    method: str = "contrastive"  # learns the modality, where statistics only re-centre
    minutes: float = 5.0  # wall-clock budget of the training methods (1,000 images, 2 cores)
    steps: int = 300  # at most this many steps within the budget
    distill_weight: float = 1.0  # keeps the source's features while learning the modality's
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in DOMAIN_METHODS:
            raise ValueError(
                f"DomainConfig.method must be one of {sorted(DOMAIN_METHODS)}, got {self.method!r}"
            )
        if not self.minutes > 0 or self.steps < 1 or self.distill_weight < 0:
            raise ValueError(
                "DomainConfig.minutes must be > 0, steps >= 1 and distill_weight >= 0, got "
                f"{self.minutes}, {self.steps}, {self.distill_weight}"
            )

    def contrastive(self) -> ContrastiveConfig:
        """The contrastive schedule of the training methods."""
        return ContrastiveConfig(
            steps=self.steps,
            distill_weight=self.distill_weight,
            seed=self.seed,
            max_seconds=60.0 * self.minutes,
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with the adapted model."""
        return asdict(self)


@dataclass(frozen=True)
class DomainResult:
    """The adapted encoder (a copy; the source is untouched) and the domain's mean feature."""

    model: nn.Module
    domain_mean: torch.Tensor
    steps: int  # training steps taken (0 for ``statistics``)


StepFn = Callable[[int, float], None]


def adapt_domain(
    model: nn.Module,
    images: np.ndarray,
    *,
    config: DomainConfig | None = None,
    on_step: StepFn | None = None,
) -> DomainResult:
    """Prepare a copy of ``model`` for the modality of ``images`` (unlabelled); ``config``
    defaults to ``DomainConfig()``.

    Raises:
        DataError: fewer than two images.
        FloatingPointError: training diverged.
    """
    if len(images) < 2:
        raise DataError(f"domain adaptation needs >= 2 unlabelled images, got {len(images)}")
    config = config or DomainConfig()
    if DOMAIN_METHODS[config.method].trains and is_fully_frozen(model):
        raise NothingToTrainError(
            f"{config.method} trains the encoder, but every parameter of this model is frozen "
            f"(the public encoder): use {default_method(model)} or batch-statistics"
        )
    work = copy.deepcopy(model)
    steps = DOMAIN_METHODS[config.method].prepare(work, images, config, on_step)
    work.eval()
    mean = embed(work, torch.from_numpy(images)).mean(0)
    return DomainResult(model=work, domain_mean=mean, steps=steps)


def default_method(model: nn.Module) -> str:
    """The preparation a model gets unless told otherwise: the domain's statistics for a frozen
    encoder (nothing in it can train), else :class:`DomainConfig`'s training method."""
    return "statistics" if is_fully_frozen(model) else DomainConfig.method


def _statistics(
    model: nn.Module, images: np.ndarray, config: DomainConfig, on_step: StepFn | None
) -> int:
    return 0


BATCH_STATISTICS_BATCH = 32  # images per pass when re-estimating BatchNorm statistics


@torch.no_grad()
def _batch_statistics(
    model: nn.Module, images: np.ndarray, config: DomainConfig, on_step: StepFn | None
) -> int:
    """Re-estimate every BatchNorm layer's running mean and variance on ``images`` (AdaBN): one
    pass in which each layer normalises a batch by the batch's own statistics, as in training,
    so later layers see inputs normalised the modality's way; each layer keeps the average of
    its batches' means and (unbiased) variances, as BatchNorm's cumulative average does. The
    affine parameters and every weight stay as they were, and so does eval mode: a frozen
    BatchNorm never enters train mode, the pass replaces its output instead.

    Raises:
        DataError: the model has no BatchNorm layer with running statistics.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    if not layers:
        raise DataError("batch-statistics needs a backbone with BatchNorm layers")
    per_batch: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in layers}

    def normalise_by_batch(
        layer: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        x = args[0]
        per_batch[layer].append(
            torch.stack([x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)])
        )
        return nn.functional.batch_norm(
            x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps
        )

    handles = [m.register_forward_hook(normalise_by_batch) for m in layers]
    try:
        # batches of near-equal size, so none holds a single image (a variance needs 2)
        for batch in np.array_split(images, -(-len(images) // BATCH_STATISTICS_BATCH)):
            model(torch.from_numpy(batch))
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        mean, var = torch.stack(per_batch[layer]).mean(0)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        layer.num_batches_tracked.fill_(len(per_batch[layer]))
    return 0


def _contrastive(
    model: nn.Module, images: np.ndarray, config: DomainConfig, on_step: StepFn | None
) -> int:
    return len(contrastive_train(model, images, config=config.contrastive(), on_step=on_step))


def _contrastive_norm(
    model: nn.Module, images: np.ndarray, config: DomainConfig, on_step: StepFn | None
) -> int:
    norms = [
        p
        for m in model.modules()
        if isinstance(m, nn.GroupNorm | nn.LayerNorm | nn.BatchNorm2d)
        for p in m.parameters(recurse=False)
    ]
    if not norms:
        raise DataError("contrastive-norm needs a backbone with normalisation layers")
    keep = {id(p) for p in norms}
    frozen = [p for p in model.parameters() if id(p) not in keep and p.requires_grad]
    for p in frozen:  # no gradient work for what is not trained
        p.requires_grad_(False)
    try:
        losses = contrastive_train(
            model, images, config=config.contrastive(), parameters=norms, on_step=on_step
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return len(losses)


@dataclass(frozen=True)
class DomainMethod:
    """One way to prepare a model: ``prepare`` changes the model in place and returns the
    optimisation steps it took; ``trains``: whether it optimises (a step budget and a loss to
    show), or only measures statistics (seconds, no steps)."""

    prepare: Callable[[nn.Module, np.ndarray, DomainConfig, StepFn | None], int]
    trains: bool


# name -> method; one entry per method.
DOMAIN_METHODS: Catalogue[DomainMethod] = Catalogue(
    "domain method",
    {
        "statistics": DomainMethod(_statistics, trains=False),
        "batch-statistics": DomainMethod(_batch_statistics, trains=False),
        "contrastive": DomainMethod(_contrastive, trains=True),
        "contrastive-norm": DomainMethod(_contrastive_norm, trains=True),
    },
)


def domain_record(
    config: DomainConfig, unlabeled: UnlabeledImages, result: DomainResult
) -> dict[str, object]:
    """What the local model version records about its preparation (kept at the hospital)."""
    return {
        **dataclasses.asdict(config),
        "steps_taken": result.steps,
        "images": len(unlabeled.images),
        "images_sha256": unlabeled.digest,
        "source": unlabeled.source,
        "local_only": True,  # derived from unprotected local data: never shared without DP
    }


def save_prepared(
    path: Path,
    loaded: LoadedModel,
    result: DomainResult,
    *,
    record: dict[str, object],
    parent: dict[str, object],
) -> Path:
    """Write a prepared model as a model directory: the parent's records (data, pre-training,
    public weights) carried over, the preparation ``record`` and ``parent`` added, and the
    domain's mean feature beside the weights."""
    inherited = {
        key: value
        for key, value in loaded.config.items()
        if key not in {"backbone", "meta", "code_version", "created"}
    }
    parent = {**parent, "code_version": loaded.config.get("code_version")}
    return save_model_dir(
        path,
        result.model,
        backbone=loaded.backbone,
        pipeline=loaded.pipeline,
        meta=loaded.meta,
        extra={**inherited, "domain": record, "parent": parent},
        domain_mean=result.domain_mean,
    )
