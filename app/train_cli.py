"""``fedfew train`` and ``fedfew evaluate``: meta-train a model on one machine, and measure its
few-shot accuracy.

Registered lazily in ``app/cli.py``: this module imports torch, MONAI and Opacus, so it is imported
only when one of its commands runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer
from tqdm import tqdm

from app.model_cli import load_sets
from models.adaptation import ADAPT_MODES, AdaptConfig
from models.calibration import CalibrationConfig, calibrate
from models.episodes import EpisodeConfig
from models.evaluation import EpisodeLogits
from models.evaluation import evaluate as run_evaluation
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.model_dir import load_model_dir, save_model_dir
from models.networks import BACKBONES, BackboneConfig
from models.pipeline import PipelineConfig
from models.public_start import PUBLIC_ENCODER, pipeline_for, save_public_start
from models.public_weights import PUBLIC_WEIGHTS, resolve_weights
from models.readers import load_dataset
from models.training import TrainConfig, meta_train
from models.weights import StartedBackbone, start_backbone
from privacy.ledger import Ledger
from privacy.mechanisms import DEFAULT_MECHANISM, MECHANISMS, get_mechanism
from privacy.private_run import charge_private_run, run_charged_training

DP_BACKBONE = "conv4"  # what --epsilon trains by default: the DP mechanisms train parameters

# Keys of a `fedfew evaluate --predictions` line (one JSON object per query).
PREDICTION_EPISODE = "episode"
PREDICTION_QUERY = "query"
PREDICTION_TRUE = "true"
PREDICTION_PROBABILITIES = "probabilities"


def _train_model(
    sets: list[ImageSet],
    *,
    backbone: BackboneConfig,
    config: TrainConfig,
    meta: MetaConfig,
    weights: Path | None = None,
) -> tuple[StartedBackbone, list[float]]:
    torch.manual_seed(config.seed)
    started = start_backbone(backbone, weights=weights)
    model = started.model
    with tqdm(total=config.steps, desc=f"meta-training ({meta.learner})", unit="step") as bar:

        def on_step(_step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        losses = meta_train(model, sets, config=config, meta=meta, on_step=on_step)
    return started, losses


def train(
    data: str = typer.Option(..., help="Training sets: .npz files or manifests, comma-separated."),
    out: Path = typer.Option(..., help="Model directory to write."),
    meta_learner: str = typer.Option("protonet", help="protonet | maml | fomaml"),
    steps: int = typer.Option(TrainConfig.steps, help="Optimiser steps."),
    seed: int = typer.Option(0, help="Seed for initialisation, episodes and augmentation."),
    backbone: str | None = typer.Option(
        None,
        help=f"Backbone: {' | '.join(BACKBONES)}. Default: the public start (ImageNet "
        "EfficientNet-Lite0, frozen: nothing trains, it beats every trained network on new "
        "modalities); with --epsilon, conv4 (the DP mechanisms train a network's parameters).",
    ),
    weights: str | None = typer.Option(
        None,
        help=f"Public weights to start from: a file (.safetensors or a torch state dict) or "
        f"a named set shipped in a package ({' | '.join(PUBLIC_WEIGHTS)}); its SHA-256 is "
        "recorded in the model directory.",
    ),
    ways: int = typer.Option(
        5, help="Classes per training episode (capped by each set's classes)."
    ),
    shots: int = typer.Option(5, help="Support images per class in training episodes."),
    queries: int = typer.Option(10, help="Query images per class in training episodes."),
    epsilon: float | None = typer.Option(
        None, help="Train with DP, spending this epsilon (needs --ledger)."
    ),
    ledger: Path | None = typer.Option(None, help="The site's budget ledger (fedfew budget init)."),
    accountant: str | None = typer.Option(
        None, help="rdp | prv for calibration (default: the ledger's accountant)."
    ),
    sample_rate: float = typer.Option(0.1, help="DP: Poisson sampling rate q of patients."),
    mechanism: str = typer.Option(
        DEFAULT_MECHANISM, help=f"DP mechanism with --epsilon: {' | '.join(MECHANISMS)}."
    ),
) -> None:
    """Meta-train a few-shot model on one machine and write a model directory.

    With --epsilon and --ledger the run is differentially private: sigma is calibrated so the run
    spends epsilon, and the ledger is charged before training (refused past the site's cap).
    --mechanism picks the registered DP mechanism (docs/privacy.md): dp-episodic meta-trains
    with per-episode clipping; dp-supervised trains the backbone as a classifier over the sets'
    classes with per-patient clipping.
    """
    if (epsilon is None) != (ledger is None):
        raise typer.BadParameter("--epsilon and --ledger go together (DP training needs both)")
    dp_mechanism = get_mechanism(mechanism)  # an unknown name fails before any file is read
    meta = MetaConfig(learner=meta_learner)
    if backbone is None and epsilon is None and weights is None:
        _write_public_start(data, out, meta=meta)
        return
    named_set = PUBLIC_WEIGHTS.get(weights or "")
    name = backbone or (named_set.backbone if named_set else DP_BACKBONE)
    pipeline = pipeline_for(name)
    backbone_config = BackboneConfig(name=name, image_size=pipeline.image_size)
    weights_file = resolve_weights(weights)
    config = TrainConfig(
        steps=steps, seed=seed, episode=EpisodeConfig(ways=ways, shots=shots, queries=queries)
    )
    site_ledger = Ledger.open(ledger) if ledger is not None else None
    sets = load_sets(data, pipeline)
    extra: dict[str, object] = {"train": config.to_dict(), "data": [s.name for s in sets]}
    if site_ledger is not None and epsilon is not None:
        torch.manual_seed(seed)
        started = start_backbone(backbone_config, weights=weights_file)  # fails uncharged
        model = started.model
        planned, entry = charge_private_run(
            dp_mechanism,
            ledger=site_ledger,
            target_epsilon=epsilon,
            steps=steps,
            dp=dp_mechanism.dp_config(  # noise_multiplier is calibrated for the target epsilon
                {
                    "noise_multiplier": 1.0,
                    "sample_rate": sample_rate,
                    "ways": ways,
                    "max_shots": shots,
                    "max_queries": queries,
                }
            ),
            accountant=accountant or site_ledger.accountant,
            requester="fedfew train",
        )
        with tqdm(total=steps, desc=f"DP training ({mechanism})", unit="step") as bar:
            report = run_charged_training(
                model,
                sets,
                mechanism=dp_mechanism,
                planned=planned,
                entry=entry,
                target_epsilon=epsilon,
                delta=site_ledger.delta,
                meta=meta,
                on_step=lambda _i: bar.update(1),
            )
        extra["privacy"] = {**report.to_dict(), "site": site_ledger.site}
        summary = (
            f"epsilon {report.run_epsilon:.3f} ({report.run_epsilon_accountant}, "
            f"delta {site_ledger.delta:g}); site {site_ledger.site} has now spent "
            f"{report.entry.epsilon_after:.3f} of {site_ledger.cap_epsilon:g}"
        )
    else:
        started, losses = _train_model(
            sets, backbone=backbone_config, config=config, meta=meta, weights=weights_file
        )
        model = started.model
        extra["final_loss"] = float(np.mean(losses[-50:]))
        summary = f"final loss {extra['final_loss']:.3f}, not private"
    extra["private"] = epsilon is not None
    save_model_dir(
        out,
        model,
        backbone=started.config,
        pipeline=pipeline,
        meta=meta,
        extra=extra,
        weights=started.weights,
    )
    typer.echo(f"model written to {out} ({summary})")


def _write_public_start(data: str, out: Path, *, meta: MetaConfig) -> None:
    """The default recipe: the frozen public encoder, as installed. The sets are read (a bad
    file fails as in training) and named in the model directory, but nothing trains: measured in
    bench/results/new_modality_encoder.json, the frozen encoder with multi-scale features and
    a ridge head beats every network this project trained on them."""
    sets = load_sets(data, PipelineConfig())
    save_public_start(out, data=[s.name for s in sets], meta=meta)
    typer.echo(
        f"model written to {out} (the public start: ImageNet EfficientNet-Lite0, frozen, "
        f"{PUBLIC_ENCODER.image_size} px, {PUBLIC_ENCODER.features} features; nothing trained)"
    )


def evaluate(
    model: Path = typer.Option(..., help="Model directory written by `fedfew train`."),
    data: Path = typer.Option(
        ..., help="Test set (.npz or manifest) with classes unseen in training."
    ),
    ways: int = typer.Option(..., help="Classes per episode."),
    shots: int = typer.Option(..., help="Labelled support images per class."),
    queries: int = typer.Option(15, help="Query images per class."),
    episodes: int = typer.Option(600, help="Episodes to average (>= 600 for a publishable CI)."),
    adapt: str = typer.Option(
        AdaptConfig.mode, help=f"Adaptation mode: {' | '.join(ADAPT_MODES)}."
    ),
    seed: int = typer.Option(0, help="Seed of the episode draws."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    predictions: Path | None = typer.Option(
        None,
        help="Write one JSON line per query: episode, query, true class index and every "
        "class's probability, calibrated on the episode's support set as the dashboard does "
        "(needs --shots >= 2).",
    ),
) -> None:
    """Few-shot accuracy (95% CI) of a model on a test set."""
    if predictions is not None and shots < 2:
        raise typer.BadParameter(
            f"--predictions needs --shots >= 2 (calibration holds out one support case per "
            f"fold and keeps the others), got {shots}"
        )
    loaded = load_model_dir(model)
    test = load_dataset(data, loaded.pipeline)
    episode = EpisodeConfig(ways=ways, shots=shots, queries=queries)
    adapt_config = AdaptConfig(mode=adapt)
    calibration = CalibrationConfig()
    lines: list[str] = []

    def keep_predictions(found: EpisodeLogits) -> None:
        probabilities, _ = calibrate(found.held_out, found.query_logits, config=calibration)
        for q, (label, row) in enumerate(zip(found.query_labels, probabilities, strict=True)):
            record = {
                PREDICTION_EPISODE: found.episode,
                PREDICTION_QUERY: q,
                PREDICTION_TRUE: int(label),
                PREDICTION_PROBABILITIES: [round(float(p), 6) for p in row],
            }
            lines.append(json.dumps(record))

    with tqdm(total=episodes, desc=f"evaluating ({adapt})", unit="ep", disable=None) as bar:
        result = run_evaluation(
            loaded.model,
            test,
            episode=episode,
            adapt_config=adapt_config,
            meta=loaded.meta,
            episodes=episodes,
            seed=seed,
            domain_mean=loaded.domain_mean,
            on_episode=lambda: bar.update(1),
            on_logits=keep_predictions if predictions is not None else None,
        )
    if predictions is not None:
        predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        typer.echo(
            f"{ways}-way {shots}-shot accuracy on {test.name}: "
            f"{100 * result.accuracy:.1f}% +/- {100 * result.ci95:.1f} ({episodes} episodes)"
        )
