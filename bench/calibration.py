"""Are the dashboard's probabilities honest? Expected calibration error and the share of
"uncertain" outcomes against accuracy, before and after calibration (issue 14).

Leave one of the five shared modalities out, pre-train Conv-4 as a classifier on the other four
(as ``bench/new_modality.py``), and draw 3-way 5-shot episodes from the held-out modality. Each
episode's queries are scored twice: with the raw softmax the dashboard used to show, and
calibrated by a temperature fitted to the support set's leave-one-out logits
(:mod:`models.calibration`, exactly what the dashboard and ``fedfew evaluate --predictions`` do).
An outcome below :attr:`CalibrationConfig.min_confidence` counts as "uncertain".

    python bench/calibration.py --threads 1 --episodes 40 --sup-steps 100      # what was run
    python bench/calibration.py --folds brain_mri --episodes 10 --sup-steps 20  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    SHARED_SETS,
    Progress,
    choose_device,
    require_shared_data,
    set_threads,
    write_result,
)
from bench.cross_domain import cap_per_class, load_sets
from models.adaptation import AdaptConfig, embed
from models.calibration import (
    CalibrationConfig,
    calibrate,
    decide,
    expected_calibration_error,
    softmax,
    summarise_decisions,
)
from models.episodes import EpisodeConfig
from models.evaluation import EpisodeLogits, evaluate_episodes
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.pretraining import PretrainConfig, supervised_pretrain

TARGET_ECE = 0.10  # the target for calibrated probabilities
# The dashboard's frozen-backbone modes: their leave-one-out costs one head fit per fold, so
# every episode is calibrated exactly as the page does it.
MODES = ("prototype", "linear")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Resolved settings, saved with the results."""

    folds: tuple[str, ...]
    modes: tuple[str, ...]
    ways: int
    shots: int
    queries: int
    episodes: int
    sup_steps: int
    per_class: int  # images per class of the held-out modality kept (embedding time)
    seed: int
    calibration: dict[str, object]


def fold_rows(
    fold: str, sets: dict[str, ImageSet], config: BenchConfig, log: Progress
) -> list[dict[str, Any]]:
    """One row per mode of one held-out modality."""
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    model = build_backbone(BackboneConfig())
    sources = [s for name, s in sets.items() if name != fold]
    supervised_pretrain(
        model, sources, config=PretrainConfig(steps=config.sup_steps, seed=config.seed)
    )
    model.eval()
    seconds = time.perf_counter() - started
    log(f"fold {fold}: pre-trained {config.sup_steps} steps in {seconds:.0f} s")
    data = cap_per_class(sets[fold], config.per_class, config.seed)
    features = embed(model, torch.from_numpy(data.images))
    calibration = CalibrationConfig(**config.calibration)  # type: ignore[arg-type]
    rows = []
    for mode in config.modes:
        found: list[EpisodeLogits] = []
        started = time.perf_counter()
        adapt_config = AdaptConfig(mode=mode)
        result = evaluate_episodes(
            model,
            data,
            episode=EpisodeConfig(ways=config.ways, shots=config.shots, queries=config.queries),
            adapt_config=adapt_config,
            meta=MetaConfig(),
            episodes=config.episodes,
            seed=config.seed,
            domain_mean=None,
            embeddings=features,
            on_logits=found.append,
            calibration=calibration,
        )
        rows.append(
            {
                "fold": fold,
                "mode": mode,
                "accuracy": result.accuracy,
                "ci95": result.ci95,
                **score(found, calibration),
                "episodes": config.episodes,
                "seconds": time.perf_counter() - started,
            }
        )
        r = rows[-1]
        log(
            f"  {mode}: accuracy {100 * r['accuracy']:.1f}%, ECE {r['ece_before']:.3f} -> "
            f"{r['ece_after']:.3f}, uncertain {100 * r['uncertain_before']:.0f}% -> "
            f"{100 * r['uncertain_after']:.0f}% "
            f"(right when labelled: {r['confident_accuracy_after']:.2f})"
        )
    return rows


def score(found: list[EpisodeLogits], calibration: CalibrationConfig) -> dict[str, float]:
    """ECE, uncertain share and confident accuracy of every query, raw and calibrated."""
    labels = np.concatenate([f.query_labels for f in found])
    raw = np.concatenate([softmax(f.query_logits) for f in found])
    calibrated_parts, temperatures = [], []
    for f in found:
        probabilities, t = calibrate(f.held_out, f.query_logits, config=calibration)
        calibrated_parts.append(probabilities)
        temperatures.append(t)
    calibrated = np.concatenate(calibrated_parts)
    out: dict[str, float] = {"median_temperature": float(np.median(temperatures))}
    for when, probabilities in (("before", raw), ("after", calibrated)):
        decisions = decide(probabilities, min_confidence=calibration.min_confidence)
        summary = summarise_decisions(decisions.tolist(), labels.tolist())
        out[f"ece_{when}"] = expected_calibration_error(
            probabilities, labels, bins=calibration.bins
        )
        out[f"uncertain_{when}"] = summary["uncertain_share"]
        out[f"confident_accuracy_{when}"] = summary["confident_accuracy"]
        out[f"mean_confidence_{when}"] = float(probabilities.max(axis=1).mean())
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """ECE before/after per fold and mode, and uncertain share against accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['fold'].split('_')[0]}\n{r['mode']}" for r in rows]
    x = np.arange(len(rows))
    left.bar(x - 0.2, [r["ece_before"] for r in rows], 0.4, label="raw softmax")
    left.bar(x + 0.2, [r["ece_after"] for r in rows], 0.4, label="calibrated (LOO temperature)")
    left.axhline(TARGET_ECE, color="k", linestyle="--", linewidth=1, label="target 0.10")
    left.set_xticks(x, labels, fontsize=7)
    left.set_ylabel("expected calibration error")
    left.legend(fontsize=8)
    for mode, marker in zip(sorted({r["mode"] for r in rows}), "os^", strict=False):
        own = [r for r in rows if r["mode"] == mode]
        right.scatter(
            [r["accuracy"] for r in own],
            [r["uncertain_after"] for r in own],
            marker=marker,
            label=f"{mode}: uncertain share",
        )
        right.scatter(
            [r["accuracy"] for r in own],
            [r["confident_accuracy_after"] for r in own],
            marker=marker,
            facecolors="none",
            edgecolors="k",
            label=f"{mode}: accuracy when a label is given",
        )
    right.set_xlabel("accuracy (top class, every query)")
    right.set_ylabel("share")
    right.legend(fontsize=8)
    fig.suptitle("Calibration on a held-out modality, 3-way 5-shot")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str]:
    """Command-line settings and the result name."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folds", nargs="+", default=list(SHARED_SETS), choices=SHARED_SETS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--ways", type=int, default=3)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--sup-steps", type=int, default=300)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="calibration")
    args = p.parse_args(argv)
    set_threads(args.threads)
    return BenchConfig(
        folds=tuple(args.folds),
        modes=tuple(args.modes),
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        episodes=args.episodes,
        sup_steps=args.sup_steps,
        per_class=args.per_class,
        seed=args.seed,
        calibration=CalibrationConfig().to_dict(),
    ), args.out


def main(argv: list[str] | None = None) -> None:
    """Run the folds and write ``bench/results/<out>.json`` and ``.png``."""
    config, out = parse_args(argv)
    folder = require_shared_data()
    log = Progress()
    sets = load_sets(folder, log)
    rows: list[dict[str, Any]] = []
    for fold in config.folds:
        rows += fold_rows(fold, sets, config, log)
        path = write_result(
            out,
            config=dataclasses.asdict(config),
            results={"rows": rows, "target_ece": TARGET_ECE},
            device=choose_device(),
        )
        plot(rows, path.with_suffix(".png"))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
