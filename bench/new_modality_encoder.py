"""The public encoder on modalities it never saw: ImageNet EfficientNet-Lite0, frozen (issue 23).

The same protocol as bench/new_modality.py (its ``split_by_patient``, seed and pool fraction): each
shared modality is split by patient into an unlabelled pool and an evaluation half; every scored
episode comes from the evaluation half, and every row of one (fold, ways, shots, side) sees the
same episodes, so rows compare pairwise. The encoder trains on nothing, so "leave one modality
out" needs no training per fold: each image is embedded once per input side and cached.

Rows: ``pixel`` (nearest centroid on the 64-px pipeline output, the floor), ``head`` (the
pooled features after the last layer) and ``multi-scale`` (blocks 10, 15 and the head, each part
centred and normalised), each with prototype (no centring), centring on the task's images,
centring on the pool's mean (what ``fedfew adapt-domain`` statistics give), and the ridge and
logistic-regression heads. Each row also reports the share of query cases that the dashboard's
calibration labels confidently (calibrated probability >= 0.8) and the head's fitting time; the
encoder's seconds per image and peak memory are reported per side.

    python bench/new_modality_encoder.py                        # 224 px, 600 episodes
    python bench/new_modality_encoder.py --sides 160,192,224    # the resolution sweep
"""

from __future__ import annotations

import argparse
import dataclasses
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
from models.adaptation import AdaptConfig
from models.calibration import (
    CalibrationConfig,
    calibrate,
    decide,
    expected_calibration_error,
)
from models.episodes import EpisodeConfig
from models.evaluation import EpisodeLogits, embed_all, evaluate_episodes
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.pipeline import PipelineConfig
from models.public_start import start_public_encoder
from models.readers import load_npz

TASKS = ("new-modality", "new-condition")
PIXEL_SIDE = 64  # the shared sets' own side: pixels are the floor at their native resolution
CACHE = Path(__file__).resolve().parent / "results" / "cache"  # embeddings, not committed
# lever -> (adaptation config, centre on the pool's mean)
# (the mode is named: AdaptConfig's default became ridge after these rows were first measured)
LEVERS: dict[str, tuple[AdaptConfig, bool]] = {
    "prototype": (AdaptConfig(mode="prototype", centre=False), False),
    "centre-task": (AdaptConfig(mode="prototype", centre=True), False),
    "centre-domain": (AdaptConfig(mode="prototype", centre=True), True),
    "ridge-domain": (AdaptConfig(mode="ridge", centre=True), True),
}
# Logistic regression (mode "linear") is left out: 100 Adam steps per fit and per leave-one-out
# fold made it 30x slower than the other rows, and at 128 px on blood cells it scored below ridge.
PIXEL_LEVERS = ("prototype", "centre-domain", "ridge-domain")
HEAD_PART = 1280  # the head's features are the last 1280 of the multi-scale embedding
MULTI_PARTS = (112, 320, 1280)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Resolved settings, saved with the results."""

    task: str  # "new-modality" or "new-condition"
    folds: tuple[str, ...]
    sides: tuple[int, ...]
    ways: int
    shots: tuple[int, ...]
    queries: int
    episodes: int
    calibrated_episodes: int  # the first episodes again, calibrated: the confident share
    pool_fraction: float
    seed: int


class CachedFeatures(nn.Module):
    """Stands for an encoder whose features are already computed: the evaluation reads its
    ``feature_parts`` (how the feature map normalises) and its device."""

    def __init__(self, parts: tuple[int, ...]) -> None:
        super().__init__()
        self.feature_parts = parts
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)


def embed_modality(name: str, side: int, folder: Path, log: Progress) -> dict[str, Any]:
    """Multi-scale features of every image of a modality at ``side`` px (cached on disk)."""
    path = CACHE / f"lite0-multi-{name}-{side}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    data = load_npz(folder / f"{name}.npz", PipelineConfig(image_size=side))
    encoder = start_public_encoder().model
    start = time.perf_counter()
    features = embed_all(encoder, data.images, batch=64)
    seconds = time.perf_counter() - start
    out = {
        "features": features,
        "seconds_per_image": seconds / len(data),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    ms = 1000 * seconds / len(data)
    log(f"embedded {name} at {side} px: {len(data)} images, {ms:.1f} ms each")
    return out


def _one_thread() -> int:
    """Head fits are tiny: one thread is over 10x faster than several that wait on each other
    (measured on 2 busy cores); returns the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous


def score(
    name: str,
    encoder: str,
    lever: str,
    *,
    features: torch.Tensor,
    parts: tuple[int, ...],
    evaluation: ImageSet,
    pool_mean: torch.Tensor,
    shots: int,
    config: BenchConfig,
    levers: dict[str, tuple[AdaptConfig, bool]] = LEVERS,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """One row: accuracy, confident share and head time over the fold's episodes (``levers``
    and ``model``: other heads, or features already mapped, for bench/encoder_levers.py)."""
    adapt_config, domain = levers[lever]
    model = model if model is not None else CachedFeatures(parts)
    calibration = CalibrationConfig()
    confident: list[float] = []
    confident_right: list[float] = []
    calibrated: list[np.ndarray] = []
    truth: list[np.ndarray] = []

    def keep(found: EpisodeLogits) -> None:
        probabilities, _ = calibrate(found.held_out, found.query_logits, config=calibration)
        decisions = decide(probabilities, min_confidence=calibration.min_confidence)
        confident.append(float((decisions >= 0).mean()))
        right = decisions == found.query_labels
        confident_right.append(float(right.sum() / max(1, (decisions >= 0).sum())))
        calibrated.append(probabilities)
        truth.append(found.query_labels)

    common: dict[str, Any] = {
        "episode": EpisodeConfig(ways=config.ways, shots=shots, queries=config.queries),
        "adapt_config": adapt_config,
        "meta": MetaConfig(),
        "seed": config.seed,
        "domain_mean": pool_mean if domain else None,
        "embeddings": features,
    }
    start = time.perf_counter()
    result = evaluate_episodes(model, evaluation, episodes=config.episodes, **common)
    seconds = time.perf_counter() - start
    if shots >= 2 and config.calibrated_episodes:  # the first episodes again, calibrated
        evaluate_episodes(
            model,
            evaluation,
            episodes=min(config.episodes, config.calibrated_episodes),
            on_logits=keep,
            **common,
        )
    return {
        "fold": name,
        "encoder": encoder,
        "lever": lever,
        "ways": config.ways,
        "shots": shots,
        "accuracy": result.accuracy,
        "ci95": result.ci95,
        "episodes": config.episodes,
        "confident_share": float(np.mean(confident)) if confident else None,
        "confident_accuracy": float(np.mean(confident_right)) if confident else None,
        "ece": (
            expected_calibration_error(np.concatenate(calibrated), np.concatenate(truth))
            if calibrated
            else None
        ),
        "seconds_per_episode": seconds / config.episodes,
    }


def target_images(name: str, task: str, folder: Path) -> tuple[ImageSet, np.ndarray]:
    """The images one fold is scored on, at 64 px, and which of the modality's images they are:
    the whole modality (new modality), or its held-out conditions (new condition, the classes of
    bench/new_condition.py's ``HELD_OUT``, relabelled)."""
    pixels = load_npz(folder / f"{name}.npz", PipelineConfig(image_size=PIXEL_SIDE))
    _, codes = np.unique(pixels.patients, return_inverse=True)
    pixels = dataclasses.replace(pixels, patients=codes.astype(np.int64))
    if task == "new-modality":
        return pixels, np.ones(len(pixels), dtype=bool)
    held = [pixels.classes.index(c) for c in HELD_OUT[name]]
    return pixels.subset_classes(held, name=f"{name}:new"), np.isin(pixels.labels, held)


def run_fold(name: str, config: BenchConfig, folder: Path, log: Progress) -> list[dict[str, Any]]:
    """Every row of one held-out modality (or one modality's held-out conditions)."""
    target, selected = target_images(name, config.task, folder)
    in_pool = pool_mask(target, config.pool_fraction, config.seed)
    _, evaluation = split_by_patient(target, config.pool_fraction, config.seed)
    keep = ~in_pool
    rows = []
    threads = _one_thread()
    flat = torch.from_numpy(target.images.reshape(len(target), -1))
    for shots in config.shots:
        for lever in PIXEL_LEVERS:
            rows.append(
                score(
                    name,
                    "pixel",
                    lever,
                    features=flat[keep],
                    parts=(),
                    evaluation=evaluation,
                    pool_mean=flat[in_pool].mean(0),
                    shots=shots,
                    config=config,
                )
            )
    for side in config.sides:
        torch.set_num_threads(threads)
        cached = embed_modality(name, side, folder, log)
        _one_thread()
        multi = cached["features"][torch.from_numpy(selected)]
        for encoder, features, parts in (
            (f"head@{side}", multi[:, -HEAD_PART:], ()),
            (f"multi-scale@{side}", multi, MULTI_PARTS),
        ):
            for shots in config.shots:
                for lever in LEVERS:
                    row = score(
                        name,
                        encoder,
                        lever,
                        features=features[keep],
                        parts=parts,
                        evaluation=evaluation,
                        pool_mean=features[in_pool].mean(0),
                        shots=shots,
                        config=config,
                    )
                    row["encoder_ms_per_image"] = 1000 * cached["seconds_per_image"]
                    row["encoder_peak_rss_mb"] = cached["peak_rss_mb"]
                    rows.append(row)
        log(f"{name} at {side} px scored")
    torch.set_num_threads(threads)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over folds per (encoder, lever, shots), its 95% CI (from the folds' own CIs, folds
    independent) and the gain over pixel nearest centroid on the same episodes."""
    pixel = {
        (r["fold"], r["shots"]): r["accuracy"]
        for r in rows
        if r["encoder"] == "pixel" and r["lever"] == "prototype"
    }
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["lever"], r["shots"]), []).append(r)
    out = []
    for (encoder, lever, shots), members in groups.items():
        k = len(members)
        out.append(
            {
                "encoder": encoder,
                "lever": lever,
                "shots": shots,
                "folds": k,
                "accuracy": float(np.mean([m["accuracy"] for m in members])),
                "ci95": float(np.sqrt(sum(m["ci95"] ** 2 for m in members)) / k),
                "gain_vs_pixel": float(
                    np.mean([m["accuracy"] - pixel[(m["fold"], shots)] for m in members])
                ),
                "per_fold": {m["fold"]: m["accuracy"] for m in members},
                **{
                    key: (
                        float(np.mean([m[key] for m in members]))
                        if members[0][key] is not None
                        else None
                    )
                    for key in ("confident_share", "confident_accuracy", "ece")
                },
                "head_ms_per_episode": 1000
                * float(np.mean([m["seconds_per_episode"] for m in members])),
            }
        )
    return sorted(out, key=lambda r: (r["shots"], -r["accuracy"]))


def plot(summary: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Bar chart of the 5-shot rows' mean accuracy with 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r["shots"] == max(s["shots"] for s in summary)]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1))
    labels = [f"{r['encoder']} / {r['lever']}" for r in rows]
    ax.barh(labels, [100 * r["accuracy"] for r in rows], xerr=[100 * r["ci95"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{title}: accuracy, mean of the folds (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str]:
    """Command-line settings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default=TASKS[0])
    p.add_argument("--folds", default=None, help="default: every fold of the task")
    p.add_argument("--sides", default="224")
    p.add_argument("--ways", type=int, default=3)
    p.add_argument("--shots", default="1,5")
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--calibrated-episodes", type=int, default=100)
    p.add_argument("--pool-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--name", default=None, help="default: the task's name, then _encoder")
    a = p.parse_args(argv)
    set_threads(a.threads)
    name = a.name or f"{a.task.replace('-', '_')}_encoder"
    folds = a.folds or ",".join(SHARED_SETS if a.task == TASKS[0] else HELD_OUT)
    return BenchConfig(
        task=a.task,
        folds=tuple(folds.split(",")),
        sides=tuple(int(s) for s in a.sides.split(",")),
        ways=a.ways,
        shots=tuple(int(s) for s in a.shots.split(",")),
        queries=a.queries,
        episodes=a.episodes,
        calibrated_episodes=a.calibrated_episodes,
        pool_fraction=a.pool_fraction,
        seed=a.seed,
    ), name


def main(argv: list[str] | None = None) -> None:
    """Run every fold and write ``bench/results/NAME.json`` and its plot."""
    config, name = parse_args(argv)
    folder = require_shared_data()
    log = Progress()
    rows: list[dict[str, Any]] = []
    for fold in config.folds:
        rows += run_fold(fold, config, folder, log)
    summary = summarise(rows)
    out = write_result(
        name,
        config=dataclasses.asdict(config),
        results={"rows": rows, "summary": summary},
        device=torch.device("cpu"),
    )
    plot(summary, out.with_suffix(".png"), title=f"{config.ways}-way {config.task}")
    for r in summary:
        log(
            f"{r['shots']}-shot {r['encoder']:>16} {r['lever']:>14}: "
            f"{100 * r['accuracy']:.1f} +/- {100 * r['ci95']:.1f} "
            f"(gain {100 * r['gain_vs_pixel']:+.1f}; confident {r['confident_share']}, "
            f"ECE {r['ece']})"
        )


if __name__ == "__main__":
    main()
