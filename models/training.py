"""Non-private episodic meta-training on one machine (the DP variant lives in privacy/)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from models.augment import augment_batch
from models.episodes import Episode, EpisodeConfig, eligible_classes, sample_episode
from models.errors import EpisodeError
from models.imageset import ImageSet
from models.meta import EpisodeBatch, MetaConfig, MetaLearner, split_params


@dataclass(frozen=True)
class TrainConfig:
    """Episodic meta-training schedule."""

    steps: int = 300  # 1.75 s/step measured on 2 idle CPU cores: under 10 minutes of training
    meta_batch: int = 2  # episodes per optimiser step; more costs time linearly on CPU
    lr: float = 1e-3  # Adam, the usual ProtoNet/MAML outer rate
    seed: int = 0  # initialisation, episode draws and augmentation
    augment: bool = True  # MONAI flips/rotations/intensity: few-shot sets are tiny
    episode: EpisodeConfig = field(
        default_factory=lambda: EpisodeConfig(ways=5, shots=5, queries=10)
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.meta_batch < 1:
            raise ValueError(
                "TrainConfig.steps and meta_batch must be >= 1, "
                f"got {self.steps}, {self.meta_batch}"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with every model."""
        return asdict(self)


class EpisodeSource:
    """Draws episodes from several sets, one set per episode (classes of different modalities
    are trivially apart, so mixing them in one episode would teach nothing)."""

    def __init__(self, sets: Sequence[ImageSet], episode: EpisodeConfig) -> None:
        self.sets: list[tuple[ImageSet, np.ndarray, EpisodeConfig]] = []
        for data in sets:
            pool = eligible_classes(data.labels, data.patients, episode)
            if len(pool) >= 2:
                ways = min(episode.ways, len(pool))
                config = EpisodeConfig(ways=ways, shots=episode.shots, queries=episode.queries)
                self.sets.append((data, pool, config))
        if not self.sets:
            raise EpisodeError(
                f"no training set has 2 classes with >= {episode.shots + episode.queries} images "
                "from >= 2 patients each: add data or lower shots/queries"
            )

    def draw(self, rng: np.random.Generator) -> tuple[ImageSet, Episode, int]:
        """One episode: its set, its indices and its number of ways."""
        data, pool, config = self.sets[int(rng.integers(len(self.sets)))]
        episode = sample_episode(data.labels, data.patients, config, rng, classes=pool)
        return data, episode, config.ways


def episode_batch(
    data: ImageSet,
    episode: Episode,
    *,
    augment: bool,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
) -> EpisodeBatch:
    """Tensors of one episode on ``device``, augmented for training when asked."""
    sx = torch.from_numpy(data.images[episode.support])
    qx = torch.from_numpy(data.images[episode.query])
    if augment:
        sx = augment_batch(sx, seed=int(rng.integers(2**31)))
        qx = augment_batch(qx, seed=int(rng.integers(2**31)))
    return EpisodeBatch(
        sx.to(device),
        torch.from_numpy(episode.support_labels).to(device),
        qx.to(device),
        torch.from_numpy(episode.query_labels).to(device),
    )


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, *, step: int, what: str
) -> float:
    """Backpropagate ``loss`` and step, refusing a non-finite loss; returns the loss value."""
    value = float(loss.detach())
    if not np.isfinite(value):
        raise FloatingPointError(
            f"{what} loss became {value} at step {step}: lower the learning rate or check the data"
        )
    loss.backward()
    optimizer.step()
    return value


def meta_train(
    model: nn.Module,
    sets: Sequence[ImageSet],
    *,
    config: TrainConfig = TrainConfig(),
    meta: MetaConfig = MetaConfig(),
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Meta-train ``model`` in place; returns the loss of every step."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    source = EpisodeSource(sets, config.episode)
    learner = MetaLearner(meta)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    losses = []
    for step in range(config.steps):
        optimizer.zero_grad()
        params: dict[str, torch.Tensor] = dict(model.named_parameters())
        _, buffers = split_params(model)
        total = torch.zeros(())
        for _ in range(config.meta_batch):
            data, episode, ways = source.draw(rng)
            batch = episode_batch(data, episode, augment=config.augment, rng=rng, device=device)
            total = total + learner.episode_loss(model, params, buffers, batch, ways)
        value = optimizer_step(total / config.meta_batch, optimizer, step=step, what="training")
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    return losses
