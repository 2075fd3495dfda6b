"""Flower ServerApp: federated DP meta-learning with a validation gate, quorum, checkpoints,
per-round evaluation on a public set, and a registry version per round."""

from __future__ import annotations

import dataclasses
import logging
import secrets
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federation.checkpoint import Checkpoint
from federation.errors import ModelMismatchError
from federation.polling_grid import PollingGrid
from federation.publishing import model_from_state, publish_state
from federation.records import State
from federation.release_strategy import ReleaseStrategy
from federation.rounds import run_rounds
from federation.server_config import ServerConfig
from federation.strategies import strategy_for
from federation.strategy import LOGGER_NAME
from models.episodes import EpisodeConfig
from models.evaluation import evaluate
from models.feature_adapter import AdaptedEncoder
from models.freezing import apply_freezing
from models.imageset import ImageSet
from models.model_dir import load_model_dir
from models.networks import NO_ADAPTER, build_backbone
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from models.registry import Registry, RegistryEntry
from models.synthetic import demo_sets
from privacy.prototype_release import PROTOTYPES_FILE, PrototypeRelease
from privacy.round_record import RoundRecord

logger = logging.getLogger(LOGGER_NAME)
EVAL_SHOTS = (1, 5)

app = ServerApp()


def initial_state(config: ServerConfig) -> State:
    """The round-0 global model: the run config's ``initial-model`` (a public start written by
    `fedfew pretrain` or the demo's operator step), else a fresh initialisation (seeded only when
    the config says so).

    Raises:
        ModelMismatchError: the initial model is not the network the round plan names.
        ModelDirError: the initial model directory cannot be read.
    """
    backbone = config.backbone
    if config.initial_model:
        loaded = load_model_dir(Path(config.initial_model))
        same = dataclasses.replace(
            loaded.backbone, trainable=backbone.trainable, adapter=backbone.adapter
        )
        adds_adapter = loaded.backbone.adapter in (NO_ADAPTER, backbone.adapter)
        if same != backbone or not adds_adapter:
            raise ModelMismatchError(
                f"initial model {config.initial_model} is a {loaded.backbone.to_dict()} network "
                f"but the run config asks for {backbone.to_dict()}: set backbone.name, "
                "backbone.width, backbone.image-size, backbone.norm and backbone.features to the "
                "initial model's"
            )
        model = loaded.model
        if loaded.backbone.adapter != backbone.adapter:  # a plain public start gains an adapter
            bare = dataclasses.replace(backbone, adapter=NO_ADAPTER)
            model = AdaptedEncoder(apply_freezing(model, bare), backbone.adapter)
    else:
        torch.manual_seed(config.seed if config.seed >= 0 else secrets.randbits(63))
        model = build_backbone(backbone)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def public_eval_set(config: ServerConfig) -> ImageSet:
    """The server's public evaluation set: never a hospital's data."""
    pipeline = PipelineConfig(image_size=config.backbone.image_size)
    if config.eval.data == "synthetic":
        return demo_sets(config=pipeline)[1]
    return load_dataset(config.eval.data, pipeline)


def evaluate_state(state: State, config: ServerConfig, data: ImageSet) -> dict[str, float]:
    """Few-shot accuracy (prototype adaptation) of a global model on the public set."""
    model = model_from_state(state, config.round_plan(1)).eval()
    metrics: dict[str, float] = {}
    ways = min(config.eval.ways, len(data.classes))
    for shots in EVAL_SHOTS:
        result = evaluate(
            model,
            data,
            episode=EpisodeConfig(ways=ways, shots=shots, queries=10),
            episodes=config.eval.episodes,
            seed=1,
        )
        metrics[f"accuracy-{ways}way-{shots}shot"] = result.accuracy
        metrics[f"ci95-{ways}way-{shots}shot"] = result.ci95
    return metrics


def publish_version(
    registry: Registry,
    state: State,
    record: RoundRecord,
    config: ServerConfig,
    *,
    prototypes: PrototypeRelease | None = None,
) -> RegistryEntry:
    """Register the round's global model with every site's privacy report (once per round),
    and the round's prototype release beside it when the round made one."""
    return publish_state(
        registry,
        state,
        config.round_plan(1),  # backbone and meta-learner are the same in every round
        name=f"{config.federation} round {record.round}" + _start_label(record, config),
        # Round 0 (a random or public start) was trained on no hospital's data: not DP-trained.
        extra={
            "federation": config.to_dict(),
            "round": record.round,
            "private": record.round > 0,
        },
        metrics=record.metrics,
        privacy={site: report.to_dict() for site, report in record.sites.items()},
        info={
            "federation": config.federation,
            "round": record.round,
            "problems": list(record.problems),
            "clipped": list(record.clipped),
        },  # the run config is kept once, in the version's config.json ("federation")
        prototypes=prototypes,
    )


def _start_label(record: RoundRecord, config: ServerConfig) -> str:
    if record.round != 0:
        return ""
    if config.initial_model:
        return f" (public start {Path(config.initial_model).name})"
    return " (initial model)"


def serve(grid: Grid, config: ServerConfig) -> None:
    """Run (or resume) the federation described by ``config`` on ``grid``."""
    config.root.mkdir(parents=True, exist_ok=True)
    final = run_federation(grid, config, initial_state(config))
    logger.info("federation %s finished at round %d", config.federation, final.round)


def run_federation(grid: Grid, config: ServerConfig, state: State) -> Checkpoint:
    """The rounds from ``state`` (round 0), each version published to the server's registry;
    returns the final checkpoint."""
    registry = Registry.open(config.root / "registry", create=True)
    eval_set = public_eval_set(config)
    strategy = strategy_for(config, state)
    if isinstance(strategy, ReleaseStrategy):
        for entry in registry.entries(kind="global"):  # a resumed server's earlier releases
            if (kept := entry.path / PROTOTYPES_FILE).exists():
                strategy.restore_release(entry.info["round"], PrototypeRelease.load(kept))
    return run_rounds(
        grid,
        strategy,
        initial_state=state,
        evaluate=lambda s: evaluate_state(s, config, eval_set),
        publish=lambda s, record: publish_version(
            registry, s, record, config, prototypes=strategy.prototypes_of(record.round)
        ),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: the run config says what to run."""
    serve(PollingGrid(grid), ServerConfig.from_run_config(context.run_config))
