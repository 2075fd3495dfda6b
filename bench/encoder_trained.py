"""What training on top of the frozen public encoder adds on a modality it never saw (issue 23).

The protocol, folds and episodes of bench/encoder_levers.py's ``run_fold`` (leave one modality
out; each held-out modality split by patient into an unlabelled pool, whose mean centres the
features, and an evaluation half; 3-way 5-shot, 15 queries, seed 0), against its default row
``Row()`` (Lite0 at 224 px, multi-scale features centred on the pool's mean, parts normalised,
ridge head with lambda 1), paired per episode:

- **meta-trained adapters** (``adapter-scale``, ``adapter-low-rank``): the product's feature
  adapters (models/feature_adapter.py ``FeatureScale`` and ``LowRankAdapter``) trained with the
  product's episodic trainer (privacy/dp_meta.py ``DPMetaTrainer``, ProtoNet loss) without noise
  and without clipping (bench/federated_encoder.py's ``NO_NOISE`` and ``NO_CLIP``) on the cached
  multi-scale features of the four other modalities (all their classes); then on the held-out
  modality the adapter's output goes through the default feature map and ridge head, on all
  ``--episodes`` episodes of the fold. Each adapter is scored after each of ``--steps`` (one run,
  evaluated as it reaches each length).
- **fine-tuning under a fixed step budget** (``finetune-norm-affine``, ``finetune-head``): the
  product's ``finetune`` adaptation mode (models/adaptation.py ``adapt``: a prototype-initialised
  head on the centred, part-normalised features, ``--finetune-steps`` Adam steps at
  ``AdaptConfig``'s learning rate on the support's cross-entropy) on the 15 support images at
  224 px, with the encoder's normalisation affine parameters trainable (models/freezing.py subset
  ``norm-affine``) or with the public start as it is (every encoder parameter frozen: only the
  head moves). It costs seconds per episode, so only the first ``--finetune-episodes`` episodes
  of each fold run (the same first episodes the default row sees: one seeded sampler); the
  default ridge and the prototype head (the fine-tuning's start) are scored on those episodes.

- **domain preparation** (``adapt-domain batch-statistics``): the product's ``fedfew
  adapt-domain`` method ``batch-statistics`` (models/domain.py: every BatchNorm layer's
  statistics re-estimated on the fold's unlabelled pool at 224 px, AdaBN) applied to the public
  start; every image of the fold is embedded again by the prepared encoder, then the default
  feature map (centred on the pool's mean) and ridge head, on all ``--episodes`` episodes. It
  needs no other modality, so it also runs on ``--task new-condition`` (the three held-out
  conditions of each modality, its pool their unlabelled half), alone.

Every row reports its accuracy per fold, the mean over folds, and its paired difference from the
default over all the folds' episodes together (mean and 95% CI, ``models.evaluation.mean_ci95``).
Cached features come from ``python bench/encoder_levers.py embed --encoder lite0@224``.

    python bench/encoder_trained.py --threads 1             # about 20 min on 2 shared cores
    python bench/encoder_trained.py --finetune-episodes 0   # the adapters alone (5 min)
    python bench/encoder_trained.py --rows domain --threads 2 --name encoder_domain_new_modality
    python bench/encoder_trained.py --rows domain --task new-condition --threads 2 \
        --name encoder_domain_new_condition                 # each about 5 min idle
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_SETS, Progress, require_shared_data, set_threads, write_result
from bench.encoder_levers import Row, cache_path, episode_accuracies, map_parts, row_features
from bench.federated_encoder import NO_CLIP, NO_NOISE
from bench.new_condition import HELD_OUT
from bench.new_modality import pool_mask, split_by_patient
from bench.new_modality_encoder import TASKS, BenchConfig, target_images
from models.adaptation import AdaptConfig, adapt, embed
from models.domain import DomainConfig, adapt_domain
from models.episodes import EpisodeConfig, sample_episode
from models.evaluation import mean_ci95
from models.feature_adapter import FeatureScale, LowRankAdapter
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.pipeline import PipelineConfig
from models.public_start import PUBLIC_ENCODER, start_public_encoder
from models.readers import load_npz
from privacy.dp_config import DPConfig
from privacy.dp_meta import DPMetaTrainer

OUT = "encoder_trained"
SIDE = 224  # the public start's input side (the cached features' side)
FINETUNE_SUBSETS = {"finetune-norm-affine": "norm-affine", "finetune-head": "none"}


@dataclasses.dataclass(frozen=True)
class AdapterRecipe:
    """One adapter's non-private meta-training on the other modalities' cached features."""

    kind: str  # "scale" or "low-rank"
    lr: float
    steps: tuple[int, ...]  # evaluated after each of these total step counts
    rank: int = 8
    step_episodes: int = 16  # episodes per step
    ways: int = 3
    shots: int = 5  # at most, per class (DPConfig.max_shots)
    queries: int = 5  # at most, per class
    sample_rate: float = 0.3  # each patient's chance to join a step
    seed: int = 0

    def build(self, parts: tuple[int, ...]) -> nn.Module:
        """The adapter at its start (the identity on part-normalised features)."""
        if self.kind == "scale":
            return FeatureScale(parts)
        return LowRankAdapter(parts, rank=self.rank)

    def dp(self) -> DPConfig:
        """The trainer's settings: no noise, no clipping."""
        return DPConfig(
            noise_multiplier=NO_NOISE,
            max_grad_norm=NO_CLIP,
            sample_rate=self.sample_rate,
            episodes=self.step_episodes,
            ways=self.ways,
            max_shots=self.shots,
            max_queries=self.queries,
        )


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cached_features(name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The default row's multi-scale features of every image of a modality (before centring),
    and their part sizes."""
    path = cache_path(name, "lite0", SIDE)
    if not path.is_file():
        raise SystemExit(f"{path} missing: python bench/encoder_levers.py embed first")
    features, parts = row_features(torch.load(path, weights_only=True), Row())
    return features, tuple(parts)


def source_sets(held_out: str, task: str, folder: Path) -> list[ImageSet]:
    """The other modalities as feature sets (images: cached features shaped (n, d, 1, 1)),
    with their labels and patients."""
    out = []
    for other in SHARED_SETS:
        if other == held_out:
            continue
        pixels, _ = target_images(other, task, folder)
        features, _ = cached_features(other)
        assert len(features) == len(pixels), other
        images = features[:, :, None, None].numpy().astype(np.float32)
        out.append(dataclasses.replace(pixels, images=images, name=f"{other}:features"))
    return out


@dataclasses.dataclass
class Fold:
    """One held-out modality: its evaluation half, pool and default features."""

    name: str
    selected: np.ndarray  # which of the modality's images the fold scores
    in_pool: np.ndarray  # over the selected images
    evaluation: ImageSet
    features: torch.Tensor  # raw multi-scale features of the selected images
    parts: tuple[int, ...]

    @property
    def keep(self) -> np.ndarray:
        """The evaluation half's images among the selected ones."""
        return ~self.in_pool


def load_fold(name: str, config: BenchConfig, folder: Path) -> Fold:
    """The split of bench/encoder_levers.py's ``run_fold``."""
    target, selected = target_images(name, config.task, folder)
    in_pool = pool_mask(target, config.pool_fraction, config.seed)
    _, evaluation = split_by_patient(target, config.pool_fraction, config.seed)
    features, parts = cached_features(name)
    return Fold(name, selected, in_pool, evaluation, features[torch.from_numpy(selected)], parts)


def scored(fold: Fold, features: torch.Tensor, config: BenchConfig) -> np.ndarray:
    """Per-episode accuracies of the default ridge on features of the fold's selected images,
    after the default feature map (centred on the pool's mean, parts normalised)."""
    mapped = map_parts(features, features[fold.in_pool].mean(0), list(fold.parts), Row())
    with threads(1):  # head fits are tiny (new_modality_encoder._one_thread)
        return episode_accuracies(
            Row(),
            features=mapped[torch.from_numpy(fold.keep)],
            evaluation=fold.evaluation,
            shots=config.shots[0],
            config=config,
        )


def adapter_rows(
    fold: Fold, recipe: AdapterRecipe, sets: list[ImageSet], config: BenchConfig, log: Progress
) -> list[dict[str, Any]]:
    """The adapter trained on ``sets`` and scored after each of the recipe's step counts."""
    adapter = recipe.build(fold.parts)
    trainer = DPMetaTrainer(
        adapter, sets, dp=recipe.dp(), meta=MetaConfig(), lr=recipe.lr, seed=recipe.seed
    )
    out, done, seconds = [], 0, 0.0
    for total in recipe.steps:
        start = time.perf_counter()
        with threads(1):
            trainer.train(total - done)
        seconds += time.perf_counter() - start
        done = total
        adapter.eval()
        with torch.no_grad():
            adapted = adapter(fold.features)
        accuracies = scored(fold, adapted, config)
        label = f"adapter-{recipe.kind} {total} steps lr {recipe.lr:g}"
        log(f"{fold.name}: {label}: {100 * accuracies.mean():.1f}% ({seconds:.0f} s training)")
        out.append(
            {
                "row": label,
                "fold": fold.name,
                "recipe": dataclasses.asdict(recipe),
                "steps": total,
                "training_seconds": seconds,
                "accuracies": accuracies,
            }
        )
    return out


def finetune_models() -> dict[str, nn.Module]:
    """The public start with its norm-affine parameters trainable, and as it is (frozen)."""
    return {
        row: start_public_encoder(dataclasses.replace(PUBLIC_ENCODER, trainable=subset)).model
        for row, subset in FINETUNE_SUBSETS.items()
    }


def finetune_rows(
    fold: Fold,
    models: dict[str, nn.Module],
    config: BenchConfig,
    steps: int,
    folder: Path,
    log: Progress,
) -> list[dict[str, Any]]:
    """The first ``config.episodes`` episodes of the fold with each model fine-tuned ``steps``
    steps on the support images at 224 px (``adapt`` mode ``finetune``, centred on the pool's
    mean); the episodes are drawn as :func:`episode_accuracies` draws them."""
    images = load_npz(folder / f"{fold.name}.npz", PipelineConfig(image_size=SIDE)).images
    images = images[fold.selected][fold.keep]  # indexed as the evaluation half
    pool_mean = fold.features[fold.in_pool].mean(0)
    adapt_config = AdaptConfig(mode="finetune", finetune_steps=steps)
    episode = EpisodeConfig(ways=config.ways, shots=config.shots[0], queries=config.queries)
    rng = np.random.default_rng(config.seed)
    found = {row: np.empty(config.episodes) for row in models}
    seconds = dict.fromkeys(models, 0.0)
    supports = []
    check = float("nan")
    for i in range(config.episodes):
        ep = sample_episode(fold.evaluation.labels, fold.evaluation.patients, episode, rng)
        supports.append(ep.support.tolist())
        sx, qx = torch.from_numpy(images[ep.support]), torch.from_numpy(images[ep.query])
        sy, qy = torch.from_numpy(ep.support_labels), torch.from_numpy(ep.query_labels)
        if i == 0:  # the cached features are this model's features of these images
            raw = embed(models["finetune-head"], sx)
            cached = fold.features[torch.from_numpy(fold.keep)][ep.support]
            check = float((raw - cached).abs().max() / cached.abs().max())
        for row, model in models.items():
            start = time.perf_counter()
            classifier = adapt(
                model, sx, sy, ways=config.ways, config=adapt_config, domain_mean=pool_mean
            )
            predicted = classifier.logits(qx).argmax(-1)
            seconds[row] += time.perf_counter() - start
            found[row][i] = (predicted == qy).float().mean().item()
        log(f"{fold.name} episode {i}: " + ", ".join(f"{r} {a[i]:.2f}" for r, a in found.items()))
    return [
        {
            "row": f"{row} {steps} steps",
            "fold": fold.name,
            "steps": steps,
            "lr": adapt_config.finetune_lr,
            "trainable": FINETUNE_SUBSETS[row],
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "seconds_per_episode": seconds[row] / config.episodes,
            "supports": supports,
            "cached_vs_model_max_relative_diff": check,
            "accuracies": found[row],
        }
        for row, model in models.items()
    ]


def domain_rows(fold: Fold, config: BenchConfig, folder: Path, log: Progress) -> dict[str, Any]:
    """The public start prepared by ``adapt-domain batch-statistics`` on the fold's pool, every
    selected image embedded again by it, scored on all the fold's episodes."""
    images = load_npz(folder / f"{fold.name}.npz", PipelineConfig(image_size=SIDE)).images
    images = images[fold.selected]
    start = time.perf_counter()
    prepared = adapt_domain(
        start_public_encoder().model,
        images[fold.in_pool],
        config=DomainConfig(method="batch-statistics"),
    )
    preparing = time.perf_counter() - start
    features = embed(prepared.model, torch.from_numpy(images))
    accuracies = scored(fold, features, config)
    log(f"{fold.name}: batch statistics {100 * accuracies.mean():.1f}% ({preparing:.0f} s)")
    return {
        "row": "adapt-domain batch-statistics",
        "fold": fold.name,
        "pool_images": int(fold.in_pool.sum()),
        "training_seconds": preparing,
        "accuracies": accuracies,
    }


def reference_rows(
    fold: Fold, config: BenchConfig, default: np.ndarray, label: str
) -> list[dict[str, Any]]:
    """The default ridge and the prototype head (the fine-tuning's start) on the first
    ``config.episodes`` episodes; the default's accuracies must be the first ones of the full
    run (``default``): the same sampler and seed, so the same episodes."""
    mapped = map_parts(fold.features, fold.features[fold.in_pool].mean(0), list(fold.parts), Row())
    keep = mapped[torch.from_numpy(fold.keep)]
    out = []
    for row in (Row(), dataclasses.replace(Row(), head="prototype")):
        with threads(1):
            accuracies = episode_accuracies(
                row, features=keep, evaluation=fold.evaluation, shots=config.shots[0], config=config
            )
        if row == Row():
            assert np.array_equal(accuracies, default[: config.episodes]), fold.name
        out.append({"row": f"{row.label} ({label})", "fold": fold.name, "accuracies": accuracies})
    return out


def summarise(rows: list[dict[str, Any]], defaults: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per row: accuracy per fold, mean over folds, and the paired difference from the default
    over all the folds' episodes together (mean, 95% CI) and per fold."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["row"], []).append(r)
    out = []
    for label, members in groups.items():
        diffs = [m["accuracies"] - defaults[m["fold"]][: len(m["accuracies"])] for m in members]
        diff, ci = mean_ci95(np.concatenate(diffs))
        out.append(
            {
                "row": label,
                "folds": len(members),
                "episodes_per_fold": len(members[0]["accuracies"]),
                "accuracy": float(np.mean([m["accuracies"].mean() for m in members])),
                "per_fold": {m["fold"]: float(m["accuracies"].mean()) for m in members},
                "paired_vs_default": {"diff": diff, "ci95": ci},
                "paired_per_fold": {
                    m["fold"]: dict(zip(("diff", "ci95"), mean_ci95(d), strict=True))
                    for m, d in zip(members, diffs, strict=True)
                },
                **{
                    key: float(np.mean([m[key] for m in members]))
                    for key in ("training_seconds", "seconds_per_episode", "steps")
                    if key in members[0]
                },
            }
        )
    return out


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """Each row's paired difference from the default (points, 95% CI), mean over folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(summary) + 1.2))
    labels = [f"{r['row']} [{r['episodes_per_fold']} ep/fold]" for r in summary]
    diffs = [100 * r["paired_vs_default"]["diff"] for r in summary]
    cis = [100 * np.nan_to_num(r["paired_vs_default"]["ci95"]) for r in summary]
    ax.errorbar(diffs, range(len(summary)), xerr=cis, fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(summary)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference from the default ridge row (points, 95% CI)")
    ax.set_title("3-way 5-shot new modality: trained on top of the frozen Lite0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(
    name: str,
    run: dict[str, Any],
    rows: list[dict[str, Any]],
    defaults: dict[str, np.ndarray],
) -> tuple[list[dict[str, Any]], Path]:
    """Write the rows so far and their summary (``config.folds_done``: the folds they cover)."""
    summary = summarise(rows, defaults)
    out = write_result(
        name,
        config={**run, "folds_done": list(defaults)},
        results={
            "summary": summary,
            "rows": [{**r, "accuracies": r["accuracies"].tolist()} for r in rows],
        },
        device=torch.device("cpu"),
    )
    return summary, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line settings."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default=TASKS[0])
    p.add_argument(
        "--rows",
        default="adapters,finetune,domain",
        help="row kinds: adapters, finetune (new-modality only), domain",
    )
    p.add_argument("--folds", default=None, help="default: every fold of the task")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--steps", default="100,300,1000", help="adapter step counts evaluated")
    p.add_argument("--scale-lr", type=float, default=0.01)
    p.add_argument("--low-rank-lr", type=float, default=0.001)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--step-episodes", type=int, default=16)
    p.add_argument("--finetune-episodes", type=int, default=6, help="0: no fine-tuning rows")
    p.add_argument("--finetune-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="for the encoder's passes")
    p.add_argument("--name", default=OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run every fold and write ``bench/results/NAME.json`` and its plot."""
    a = parse_args(argv)
    set_threads(a.threads)
    folder = require_shared_data()
    log = Progress()
    kinds = set(a.rows.split(","))
    if a.task != TASKS[0] and kinds & {"adapters", "finetune"}:
        raise SystemExit("adapters and finetune rows need --task new-modality (other modalities)")
    config = BenchConfig(
        task=a.task,
        folds=tuple(
            a.folds.split(",") if a.folds else SHARED_SETS if a.task == TASKS[0] else HELD_OUT
        ),
        sides=(SIDE,),
        ways=3,
        shots=(5,),
        queries=15,
        episodes=a.episodes,
        calibrated_episodes=0,
        pool_fraction=0.5,
        seed=0,
    )
    steps = tuple(int(s) for s in a.steps.split(","))
    recipes = [
        AdapterRecipe("scale", a.scale_lr, steps, step_episodes=a.step_episodes),
        AdapterRecipe("low-rank", a.low_rank_lr, steps, rank=a.rank, step_episodes=a.step_episodes),
    ]
    if "adapters" not in kinds:
        recipes = []
    finetune = a.finetune_episodes if "finetune" in kinds else 0
    short = dataclasses.replace(config, episodes=finetune)
    models = finetune_models() if finetune else {}
    rows: list[dict[str, Any]] = []
    defaults: dict[str, np.ndarray] = {}
    run = {
        **dataclasses.asdict(config),
        "adapters": [dataclasses.asdict(r) for r in recipes],
        "rows": sorted(kinds),
        "finetune_episodes": finetune,
        "finetune_steps": a.finetune_steps,
        "threads": a.threads,
    }
    for name in config.folds:
        fold = load_fold(name, config, folder)
        defaults[name] = scored(fold, fold.features, config)
        rows.append({"row": Row().label, "fold": name, "accuracies": defaults[name]})
        log(f"{name}: default {100 * defaults[name].mean():.1f}%")
        if recipes:
            sets = source_sets(name, config.task, folder)
        for recipe in recipes:
            rows += adapter_rows(fold, recipe, sets, config, log)
        if "domain" in kinds:
            rows.append(domain_rows(fold, config, folder, log))
        if finetune:
            label = f"first {finetune} episodes"
            rows += reference_rows(fold, short, defaults[name], label)
            rows += finetune_rows(fold, models, short, a.finetune_steps, folder, log)
        summary, out = save(a.name, run, rows, defaults)  # after every fold: a partial run stays
    plot(summary, out.with_suffix(".png"))
    for r in summary:
        p = r["paired_vs_default"]
        log(
            f"{r['row']}: {100 * r['accuracy']:.1f}% (paired {100 * p['diff']:+.1f} "
            f"+/- {100 * p['ci95']:.1f}, {r['episodes_per_fold']} episodes per fold)"
        )
    print(out)


if __name__ == "__main__":
    main()
