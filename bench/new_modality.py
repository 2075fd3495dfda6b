"""Few-shot accuracy on a modality no training step has seen, lever by lever (issue 11).

Leave one of the five shared modalities out; pre-train on the other four; split the held-out
modality by patient into an unlabelled pool (labels dropped: what a hospital has on disk) and an
evaluation half. Every scored episode comes from the evaluation half, and every row of one
(fold, ways, shots) sees the same episodes, so rows compare pairwise.

Encoders (rows' first part): ``pixel`` (the pipeline output: nearest centroid on pixels),
``random`` (Conv-4, random weights), ``supervised`` (Conv-4 pre-trained as a classifier over the
four source modalities' classes), ``protonet`` (today's ``fedfew train`` recipe,
``--protonet-steps``) and ``supervised+<method>`` (then prepared with ``adapt_domain`` on the
unlabelled pool).
Adaptation (second part): each lever of ``AdaptConfig`` alone and stacked.

    python bench/new_modality.py                       # all five folds
    python bench/new_modality.py --folds fundus_odir --sup-steps 100 --episodes 50   # smoke
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    SHARED_SETS,
    Progress,
    choose_device,
    require_shared_data,
    set_threads,
    write_result,
)
from bench.cross_domain import PixelEmbedding, load_sets
from bench.lever_report import plot_levers, summarise
from models.adaptation import AdaptConfig, embed
from models.domain import DomainConfig, adapt_domain
from models.episodes import EpisodeConfig
from models.evaluation import evaluate_episodes
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.pretraining import PretrainConfig, supervised_pretrain
from models.training import TrainConfig, meta_train

# The levers, each alone, then stacked; the name is the row's second part.
LEVERS: dict[str, tuple[AdaptConfig, bool]] = {  # name -> (config, centre on the pool's mean)
    "prototype": (AdaptConfig(mode="prototype", centre=False), False),
    "centre-task": (AdaptConfig(mode="prototype", centre=True), False),
    "centre-domain": (AdaptConfig(mode="prototype", centre=True), True),
    "tta": (AdaptConfig(mode="prototype", centre=False, tta=True), False),
    "transductive": (AdaptConfig(mode="prototype", centre=False, transductive_steps=2), False),
    "linear": (AdaptConfig(mode="linear", centre=False), False),
    "stack": (AdaptConfig(mode="prototype", centre=True, tta=True, transductive_steps=2), True),
    "stack-linear": (AdaptConfig(mode="linear", centre=True, tta=True), True),
}
FINETUNE = AdaptConfig(mode="finetune", centre=True)  # costly: one fine-tune per episode
MAIN_LEVERS = ("prototype", "stack")  # rows evaluated at every (ways, shots)
BASELINE_ENCODERS = ("pixel", "random")  # scored with these levers only (CPU time)
BASELINE_LEVERS = ("prototype", "centre-domain", "stack")
POOL_MEAN_IMAGES = 256  # random pool images behind the domain mean (embedding costs CPU time)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Resolved settings, saved with the results."""

    folds: tuple[str, ...]
    ways: tuple[int, ...]
    shots: tuple[int, ...]
    queries: int
    episodes: int
    finetune_episodes: int
    sup_steps: int
    protonet_steps: int
    domain_methods: tuple[str, ...]
    domain_steps: int
    domain_minutes: float
    pool_fraction: float
    seed: int


def pool_mask(data: ImageSet, fraction: float, seed: int) -> np.ndarray:
    """Which images are in the unlabelled pool: those of a random ``fraction`` of the patients."""
    rng = np.random.default_rng(seed)
    patients = np.unique(data.patients)
    rng.shuffle(patients)
    return np.isin(data.patients, patients[: round(fraction * len(patients))])


def split_by_patient(data: ImageSet, fraction: float, seed: int) -> tuple[np.ndarray, ImageSet]:
    """The unlabelled pool (images only) and the evaluation half, disjoint by patient."""
    in_pool = pool_mask(data, fraction, seed)
    keep = ~in_pool
    evaluation = dataclasses.replace(
        data,
        images=data.images[keep],
        labels=data.labels[keep],
        patients=data.patients[keep],
    )
    return data.images[in_pool], evaluation


def encoders(
    sources: list[ImageSet], pool: np.ndarray, config: BenchConfig, log: Progress
) -> dict[str, nn.Module]:
    """Every encoder of one fold, trained on the sources (and prepared on the pool)."""
    out = pretrained(sources, config, log)
    return {**out, **prepared(out["supervised"], pool, config, log)}


def pretrained(sources: list[ImageSet], config: BenchConfig, log: Progress) -> dict[str, nn.Module]:
    """The encoders that see only the sources: pixels, random, supervised (and protonet)."""
    torch.manual_seed(config.seed)
    out: dict[str, nn.Module] = {
        "pixel": PixelEmbedding(),
        "random": build_backbone(BackboneConfig()),
    }
    started = time.perf_counter()
    supervised = build_backbone(BackboneConfig())
    supervised_pretrain(
        supervised, sources, config=PretrainConfig(steps=config.sup_steps, seed=config.seed)
    )
    log(
        f"  supervised pre-training: {config.sup_steps} steps, "
        f"{time.perf_counter() - started:.0f} s"
    )
    out["supervised"] = supervised.eval()
    if config.protonet_steps:
        started = time.perf_counter()
        protonet = build_backbone(BackboneConfig())
        meta_train(
            protonet, sources, config=TrainConfig(steps=config.protonet_steps, seed=config.seed)
        )
        log(f"  protonet: {config.protonet_steps} steps, {time.perf_counter() - started:.0f} s")
        out["protonet"] = protonet.eval()
    return out


def prepared(
    supervised: nn.Module, pool: np.ndarray, config: BenchConfig, log: Progress
) -> dict[str, nn.Module]:
    """The supervised encoder prepared on the unlabelled pool by each domain method."""
    out = {}
    for method in config.domain_methods:
        started = time.perf_counter()
        domain = DomainConfig(
            method=method,
            steps=config.domain_steps,
            minutes=config.domain_minutes,
            seed=config.seed,
        )
        result = adapt_domain(supervised, pool, config=domain)
        seconds = time.perf_counter() - started
        log(f"  adapt-domain {method}: {result.steps} steps on {len(pool)} images, {seconds:.0f} s")
        out[f"supervised+{method}"] = result.model.eval()
    return out


class Embeddings:
    """Each encoder's features of the evaluation half and the pool, with and without flip TTA,
    computed once and shared by every lever."""

    def __init__(self, model: nn.Module, data: ImageSet, pool: np.ndarray, *, seed: int) -> None:
        pick = np.random.default_rng(seed).permutation(len(pool))[:POOL_MEAN_IMAGES]
        self.model, self._data, self._pool = model, data, pool[np.sort(pick)]
        self._cache: dict[tuple[str, bool], torch.Tensor] = {}

    def get(self, which: str, *, tta: bool) -> torch.Tensor:
        """Features of ``"eval"`` or ``"pool"``."""
        if (which, tta) not in self._cache:
            images = self._data.images if which == "eval" else self._pool
            self._cache[which, tta] = embed(self.model, torch.from_numpy(images), tta=tta)
        return self._cache[which, tta]


def score(
    features: Embeddings,
    data: ImageSet,
    *,
    lever: str,
    adapt_config: AdaptConfig,
    use_pool_mean: bool,
    ways: int,
    shots: int,
    config: BenchConfig,
    episodes: int,
) -> dict[str, Any]:
    """One row: the accuracy of one encoder with one adaptation config on the evaluation half."""
    tta = adapt_config.tta
    domain_mean = features.get("pool", tta=tta).mean(0) if use_pool_mean else None
    started = time.perf_counter()
    result = evaluate_episodes(
        features.model,
        data,
        episode=EpisodeConfig(ways=ways, shots=shots, queries=config.queries),
        adapt_config=adapt_config,
        meta=MetaConfig(),
        episodes=episodes,
        seed=config.seed,
        domain_mean=domain_mean,
        embeddings=features.get("eval", tta=tta) if adapt_config.frozen_backbone else None,
    )
    return {
        "lever": lever,
        "ways": ways,
        "shots": shots,
        "accuracy": result.accuracy,
        "ci95": result.ci95,
        "episodes": episodes,
        "seconds": time.perf_counter() - started,
    }


def run_fold(
    name: str, sets: dict[str, ImageSet], config: BenchConfig, log: Progress
) -> list[dict[str, Any]]:
    """Rows of one held-out modality."""
    pool, evaluation = split_by_patient(sets[name], config.pool_fraction, config.seed)
    log(f"fold {name}: pool {len(pool)} unlabelled images, evaluation {len(evaluation)} images")
    sources = [s for n, s in sets.items() if n != name]
    return score_encoders(name, evaluation, pool, encoders(sources, pool, config, log), config, log)


def score_encoders(
    fold: str,
    evaluation: ImageSet,
    pool: np.ndarray,
    models: dict[str, nn.Module],
    config: BenchConfig,
    log: Progress,
) -> list[dict[str, Any]]:
    """Every lever's rows for every encoder of one fold."""
    rows: list[dict[str, Any]] = []
    for encoder, model in models.items():
        features = Embeddings(model, evaluation, pool, seed=config.seed)
        levers = {
            name: lever
            for name, lever in LEVERS.items()
            if encoder not in BASELINE_ENCODERS or name in BASELINE_LEVERS
        }
        for lever, (adapt_config, use_pool_mean) in levers.items():
            grid = [
                (w, k)
                for w in config.ways
                for k in config.shots
                if lever in MAIN_LEVERS or (w, k) == (3, 5)
            ]
            for ways, shots in grid:
                if ways > len(evaluation.classes):
                    continue
                row = score(
                    features,
                    evaluation,
                    lever=lever,
                    adapt_config=adapt_config,
                    use_pool_mean=use_pool_mean,
                    ways=ways,
                    shots=shots,
                    config=config,
                    episodes=config.episodes,
                )
                rows.append({"fold": fold, "encoder": encoder, **row})
        if config.finetune_episodes and encoder != "pixel":
            row = score(
                features,
                evaluation,
                lever="finetune",
                adapt_config=FINETUNE,
                use_pool_mean=True,
                ways=3,
                shots=5,
                config=config,
                episodes=config.finetune_episodes,
            )
            rows.append({"fold": fold, "encoder": encoder, **row})
        best = max(
            (r for r in rows if r["encoder"] == encoder and (r["ways"], r["shots"]) == (3, 5)),
            key=lambda r: r["accuracy"],
        )
        log(f"  {encoder}: best 3-way 5-shot {100 * best['accuracy']:.1f}% ({best['lever']})")
    return rows


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str]:
    """Command-line settings and the result name."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folds", nargs="+", default=list(SHARED_SETS), choices=SHARED_SETS)
    p.add_argument("--ways", nargs="+", type=int, default=[2, 3])
    p.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10])
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--finetune-episodes", type=int, default=40)
    p.add_argument("--sup-steps", type=int, default=600)
    p.add_argument("--protonet-steps", type=int, default=0, help="0: no protonet row")
    p.add_argument("--domain-methods", nargs="+", default=["contrastive", "contrastive-norm"])
    p.add_argument("--domain-steps", type=int, default=150)
    p.add_argument("--domain-minutes", type=float, default=5.0)
    p.add_argument("--pool-fraction", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="new_modality")
    args = p.parse_args(argv)
    set_threads(args.threads)
    return BenchConfig(
        folds=tuple(args.folds),
        ways=tuple(args.ways),
        shots=tuple(args.shots),
        queries=args.queries,
        episodes=args.episodes,
        finetune_episodes=args.finetune_episodes,
        sup_steps=args.sup_steps,
        protonet_steps=args.protonet_steps,
        domain_methods=tuple(args.domain_methods),
        domain_steps=args.domain_steps,
        domain_minutes=args.domain_minutes,
        pool_fraction=args.pool_fraction,
        seed=args.seed,
    ), args.out


def main(argv: list[str] | None = None) -> None:
    """Run the folds and write ``bench/results/<out>.json`` and ``.png``."""
    config, out = parse_args(argv)
    folder = require_shared_data()
    log = Progress()
    sets = load_sets(folder, log)
    rows: list[dict[str, Any]] = []
    for name in config.folds:
        rows += run_fold(name, sets, config, log)
        summary = summarise(rows)
        path = write_result(
            out,
            config=dataclasses.asdict(config),
            results={"rows": rows, "summary": summary},
            device=choose_device(),
        )
    plot_levers(summary, path.with_suffix(".png"), title="New modality, 3-way 5-shot")
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
