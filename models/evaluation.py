"""Few-shot evaluation: accuracy with a 95% confidence interval over many episodes on unseen
classes, and a leave-one-out reliability estimate on a clinician's own support set."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from models.adaptation import (
    EMBED_BATCH,
    AdaptConfig,
    adapt,
    embed,
    fit_head,
    model_feature_map,
)
from models.calibration import CalibrationConfig, HeldOut, held_out_logits
from models.episodes import EpisodeConfig, sample_episode
from models.errors import EpisodeError
from models.imageset import ImageSet
from models.meta import MetaConfig


@dataclass(frozen=True)
class EpisodeLogits:
    """One episode's query logits with the support set's leave-one-out logits, so the caller can
    calibrate them as the dashboard does (:mod:`models.calibration`)."""

    episode: int
    query_labels: np.ndarray  # (q,)
    query_logits: np.ndarray  # (q, ways), uncalibrated
    held_out: HeldOut  # leave-one-out logits of the support set


@dataclass(frozen=True)
class EvalResult:
    """Mean episode accuracy and the half-width of its 95% normal confidence interval."""

    accuracy: float
    ci95: float
    ways: int
    shots: int
    queries: int
    episodes: int
    adapt: str
    dataset: str

    def to_dict(self) -> dict[str, object]:
        """JSON form (the keys are relied on by ``fedfew evaluate --json``)."""
        return asdict(self)


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and 1.96 standard errors (the few-shot literature's customary interval)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()) if len(values) else float("nan"), float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(len(values)))


@torch.no_grad()
def embed_all(
    model: nn.Module, images: np.ndarray, *, tta: bool = False, batch: int = EMBED_BATCH
) -> torch.Tensor:
    """Embed a whole image set once (the backbone is fixed in frozen-backbone modes)."""
    device = next(model.parameters()).device
    return embed(model, torch.from_numpy(images).to(device), tta=tta, batch_limit=batch)


def evaluate(
    model: nn.Module,
    data: ImageSet,
    *,
    episode: EpisodeConfig,
    adapt_config: AdaptConfig = AdaptConfig(),
    meta: MetaConfig = MetaConfig(),
    episodes: int = 600,
    seed: int = 0,
    domain_mean: torch.Tensor | None = None,
    on_episode: Callable[[], None] | None = None,
    on_logits: Callable[[EpisodeLogits], None] | None = None,
) -> EvalResult:
    """Accuracy over ``episodes`` random episodes of ``data`` (classes unseen in training).

    ``on_logits``, when given, receives each episode's logits and the support set's
    leave-one-out logits (costly for modes that adapt the backbone: see
    :meth:`CalibrationConfig.folds`).

    Raises:
        EpisodeError: the set cannot supply an episode of this shape.
    """
    embeddings = (
        embed_all(model, data.images, tta=adapt_config.tta)
        if adapt_config.frozen_backbone
        else None
    )
    return evaluate_episodes(
        model,
        data,
        episode=episode,
        adapt_config=adapt_config,
        meta=meta,
        episodes=episodes,
        seed=seed,
        domain_mean=domain_mean,
        embeddings=embeddings,
        on_episode=on_episode,
        on_logits=on_logits,
    )


def evaluate_episodes(
    model: nn.Module,
    data: ImageSet,
    *,
    episode: EpisodeConfig,
    adapt_config: AdaptConfig,
    meta: MetaConfig,
    episodes: int,
    seed: int,
    domain_mean: torch.Tensor | None,
    embeddings: torch.Tensor | None,
    on_episode: Callable[[], None] | None = None,
    on_logits: Callable[[EpisodeLogits], None] | None = None,
    calibration: CalibrationConfig = CalibrationConfig(),
) -> EvalResult:
    """:func:`evaluate` given the set's embeddings under a frozen backbone (``None``: the mode
    adapts the backbone per episode); benchmarks reuse one embedding for many configs.

    Raises:
        EpisodeError: the set cannot supply an episode of this shape.
    """
    if episodes < 1:
        raise EpisodeError(f"episodes must be >= 1, got {episodes}")
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    accuracies = np.empty(episodes)
    for i in range(episodes):
        ep = sample_episode(data.labels, data.patients, episode, rng)
        sy = torch.from_numpy(ep.support_labels).to(device)
        qy = torch.from_numpy(ep.query_labels).to(device)
        if embeddings is not None:
            raw = embeddings[np.concatenate([ep.support, ep.query])]
            fmap = model_feature_map(adapt_config, model, domain_mean=domain_mean, features=raw)
            mapped = fmap(raw)
            n = len(ep.support)
            head = fit_head(
                mapped[:n], sy, ways=episode.ways, config=adapt_config, unlabeled=mapped[n:]
            )
            logits = mapped[n:] @ head["head.weight"].T + head["head.bias"]
        else:
            classifier = adapt(
                model,
                torch.from_numpy(data.images[ep.support]).to(device),
                sy,
                ways=episode.ways,
                config=adapt_config,
                meta=meta,
                domain_mean=domain_mean,
                unlabeled_x=torch.from_numpy(data.images[ep.query]).to(device),
            )
            logits = classifier.logits(torch.from_numpy(data.images[ep.query]).to(device))
        accuracies[i] = (logits.argmax(-1) == qy).float().mean().item()
        if on_logits is not None:
            support_x = torch.from_numpy(data.images[ep.support]).to(device)
            held = held_out_logits(
                model,
                support_x,
                sy,
                ways=episode.ways,
                config=adapt_config,
                meta=meta,
                domain_mean=domain_mean,
                embeddings=None if embeddings is None else embeddings[ep.support],
                max_folds=calibration.folds(adapt_config),
            )
            on_logits(
                EpisodeLogits(
                    episode=i,
                    query_labels=ep.query_labels.copy(),
                    query_logits=logits.detach().double().cpu().numpy(),
                    held_out=held,
                )
            )
        if on_episode is not None:
            on_episode()
    mean, ci = mean_ci95(accuracies)
    return EvalResult(
        accuracy=mean,
        ci95=ci,
        ways=episode.ways,
        shots=episode.shots,
        queries=episode.queries,
        episodes=episodes,
        adapt=adapt_config.mode,
        dataset=data.name,
    )


@dataclass(frozen=True)
class LeaveOneOut:
    """Leave-one-out accuracy on a support set: each case predicted after adapting to the rest."""

    accuracy: float
    correct: tuple[bool, ...]
    predicted: tuple[int, ...]


def leave_one_out(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    adapt_config: AdaptConfig = AdaptConfig(),
    meta: MetaConfig = MetaConfig(),
) -> LeaveOneOut:
    """Estimate how reliable an adapted classifier is from its own support set.

    Raises:
        EpisodeError: a class has fewer than 2 cases (leaving its only case out leaves no class).
    """
    counts = torch.bincount(support_y, minlength=ways)
    if len(counts) > ways or int(counts.min()) < 2:
        raise EpisodeError(
            f"leave-one-out needs >= 2 labelled cases in each of the {ways} classes, "
            f"got {counts.tolist()}: add cases"
        )
    predicted = []
    for i in range(len(support_y)):
        keep = torch.arange(len(support_y)) != i
        classifier = adapt(
            model, support_x[keep], support_y[keep], ways=ways, config=adapt_config, meta=meta
        )
        predicted.append(int(classifier.logits(support_x[i : i + 1]).argmax(-1)))
    correct = tuple(p == int(y) for p, y in zip(predicted, support_y, strict=True))
    return LeaveOneOut(
        accuracy=sum(correct) / len(correct), correct=correct, predicted=tuple(predicted)
    )
