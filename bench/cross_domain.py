"""Cross-domain few-shot benchmark: leave one modality out on the five shared real sets.

For each held-out set: train on the other four (one set per episode, as ``meta_train`` does), then
measure N-way K-shot accuracy with a 95% CI on the held-out set, for every meta-learner and
adaptation mode and for the baselines (pixel-space nearest centroid, random-init Conv-4 +
prototypes, supervised pre-training + fine-tune / prototypes). brain_mri and skin_dermoscopy_isic
also get within-source rows, since some of their classes differ by acquisition source alone
(../shared/data/README.md, "Shortcuts by source").

Run from the repository root: ``python bench/cross_domain.py --profile quick``
(see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS,
    SHARED_SETS,
    Progress,
    choose_device,
    fold_means,
    require_shared_data,
    set_threads,
    write_result,
)
from models.adaptation import AdaptConfig
from models.episodes import EpisodeConfig
from models.errors import EpisodeError
from models.evaluation import evaluate
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.pretraining import PretrainConfig, supervised_pretrain
from models.readers import load_npz
from models.training import TrainConfig, meta_train

META_LEARNERS = ("protonet", "fomaml", "maml")
TRAINERS = ("pixel", "random", "supervised", *META_LEARNERS)
ADAPT_MODES = {  # trainer -> adaptation modes evaluated on its backbone
    "pixel": ("prototype",),
    "random": ("prototype",),
    "supervised": ("finetune", "prototype"),
    **{learner: ("prototype", "finetune", "maml") for learner in META_LEARNERS},
}
# Classes to drop for the within-source rows (../shared/data/README.md, "Shortcuts by source").
WITHIN_SOURCE_EXCLUDE = {
    "brain_mri": ("notumor",),  # mostly from another collection than the three tumour classes
    "skin_dermoscopy_isic": ("melanoma", "nevus"),  # older ISIC archive; the other six: HAM10000
}
ALL, WITHIN = "all", "within_source"


@dataclass(frozen=True)
class BenchConfig:
    """One profile of the benchmark, resolved from the command line and saved with the results."""

    profile: str
    folds: tuple[str, ...]  # held-out sets
    ways: tuple[int, ...]
    shots: tuple[int, ...]
    queries: int  # per class at evaluation; 15 is the few-shot literature's customary value
    steps: dict[str, int]  # training steps per trainer (after --steps-scale)
    proto_episodes: int  # prototype-mode evaluation: cached embeddings, cheap
    costly_episodes: int  # finetune/maml adaptation: one adaptation per episode, costly
    finetune_steps: int = 25  # AdaptConfig's default; quick lowers it to stay in minutes
    eval_per_class: int | None = None  # cap on held-out images per class (None: all of them)
    width: int = 64  # Conv-4 filters
    seed: int = 0


FULL_STEPS = {"protonet": 1500, "fomaml": 1500, "maml": 800, "supervised": 1500}
PROFILES = {
    # Checks the script end to end on 2 loaded CPU cores in a few minutes; numbers are not final.
    "quick": BenchConfig(
        profile="quick",
        folds=("brain_mri", "skin_dermoscopy_isic"),  # both have within-source rows
        ways=(3,),
        shots=(5,),
        queries=15,
        steps={"protonet": 6, "fomaml": 3, "maml": 2, "supervised": 6},
        proto_episodes=50,
        costly_episodes=3,
        finetune_steps=3,
        eval_per_class=30,
        width=32,
    ),
    # The real numbers (a GPU machine): all folds, shots, ways and methods.
    "full": BenchConfig(
        profile="full",
        folds=SHARED_SETS,
        ways=(2, 3),
        shots=(1, 5, 10),
        queries=15,
        steps=FULL_STEPS,
        proto_episodes=600,
        costly_episodes=200,
    ),
}


class PixelEmbedding(nn.Module):
    """The pipeline output flattened: prototypes on it are the pixel-space nearest centroid."""

    def __init__(self) -> None:
        super().__init__()
        # No weights; an empty parameter tells evaluate() which device to use.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` -> ``(B, C*S*S)``."""
        return x.flatten(1)


def load_sets(folder: Path, log: Progress) -> dict[str, ImageSet]:
    """The five shared sets through the shared pipeline (patient ids from provenance).

    Patient ids are recoded as integers: the same grouping, but the episode sampler compares
    them per draw, and integer comparisons halve its time over thousands of episodes.
    """
    sets = {}
    for name in SHARED_SETS:
        data = load_npz(folder / f"{name}.npz")
        _, codes = np.unique(data.patients, return_inverse=True)
        sets[name] = replace(data, patients=codes.astype(np.int64))
        log(
            f"loaded {name}: {len(data)} images, {len(data.classes)} classes, "
            f"{codes.max() + 1} patients"
        )
    return sets


def cap_per_class(data: ImageSet, cap: int | None, seed: int) -> ImageSet:
    """At most ``cap`` random images per class (quick profile: fewer images to embed)."""
    if cap is None:
        return data
    rng = np.random.default_rng(seed)
    keep = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(data.labels == c))[:cap]
                for c in range(len(data.classes))
            ]
        )
    )
    return replace(
        data, images=data.images[keep], labels=data.labels[keep], patients=data.patients[keep]
    )


def eval_targets(name: str, data: ImageSet) -> list[tuple[str, ImageSet]]:
    """The held-out set, plus its within-source subset where one class differs by source."""
    targets = [(ALL, data)]
    if name in WITHIN_SOURCE_EXCLUDE:
        keep = [i for i, c in enumerate(data.classes) if c not in WITHIN_SOURCE_EXCLUDE[name]]
        targets.append((WITHIN, data.subset_classes(keep, name=f"{name}:{WITHIN}")))
    return targets


def train_backbone(
    trainer: str,
    train_sets: list[ImageSet],
    config: BenchConfig,
    device: torch.device,
    log: Progress,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build (and train) the backbone of one trainer; returns it with its training record."""
    if trainer == "pixel":
        return PixelEmbedding().to(device), {"steps": 0, "seconds": 0.0}
    torch.manual_seed(config.seed)
    model = build_backbone(BackboneConfig(width=config.width)).to(device)
    if trainer == "random":
        return model, {"steps": 0, "seconds": 0.0}
    steps = config.steps[trainer]
    every = max(1, steps // 5)

    def on_step(step: int, loss: float) -> None:
        if (step + 1) % every == 0 or step + 1 == steps:
            log(f"  {trainer} step {step + 1}/{steps} loss {loss:.3f}")

    start = time.perf_counter()
    if trainer == "supervised":
        pre = PretrainConfig(steps=steps, seed=config.seed)
        losses = supervised_pretrain(model, train_sets, config=pre, on_step=on_step)
        settings: dict[str, Any] = pre.to_dict()
    else:
        train = TrainConfig(steps=steps, seed=config.seed)
        meta = MetaConfig(learner=trainer)
        losses = meta_train(model, train_sets, config=train, meta=meta, on_step=on_step)
        settings = {"train": train.to_dict(), "meta": meta.to_dict()}
    seconds = time.perf_counter() - start
    record = {
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-max(1, steps // 10) :])),
        "config": settings,
    }
    return model, record


def evaluate_backbone(
    trainer: str,
    model: nn.Module,
    fold: str,
    targets: list[tuple[str, ImageSet]],
    config: BenchConfig,
    log: Progress,
) -> list[dict[str, Any]]:
    """Rows of every (target, ways, shots, adaptation mode) for one backbone."""
    meta = MetaConfig(learner=trainer) if trainer in META_LEARNERS else MetaConfig()
    rows = []
    for variant, data in targets:
        for ways in config.ways:
            for shots in config.shots:
                episode = EpisodeConfig(ways=ways, shots=shots, queries=config.queries)
                for mode in ADAPT_MODES[trainer]:
                    costly = mode != "prototype"
                    n = config.costly_episodes if costly else config.proto_episodes
                    method = "pixel-centroid" if trainer == "pixel" else f"{trainer}+{mode}"
                    if trainer == "random":
                        method = "random-conv4+prototype"
                    row: dict[str, Any] = {
                        "fold": fold,
                        "dataset": data.name,
                        "variant": variant,
                        "method": method,
                        "trainer": trainer,
                        "adapt": mode,
                        "ways": ways,
                        "shots": shots,
                        "queries": config.queries,
                        "episodes": n,
                    }
                    start = time.perf_counter()
                    try:
                        # The same seed per (fold, target, shape): every method sees the same
                        # episodes (the costly ones the first n of them), a paired comparison.
                        result = evaluate(
                            model,
                            data,
                            episode=episode,
                            adapt_config=AdaptConfig(
                                mode=mode, finetune_steps=config.finetune_steps
                            ),
                            meta=meta,
                            episodes=n,
                            seed=config.seed + 1000 * ways + shots,
                        )
                    except EpisodeError as exc:  # recorded in the row and printed, not hidden
                        row.update(error=str(exc), accuracy=None, ci95=None)
                        log(f"  {method} {data.name} {ways}w{shots}s: cannot sample ({exc})")
                    else:
                        row.update(accuracy=result.accuracy, ci95=result.ci95, error=None)
                        log(
                            f"  {method:24s} {data.name:36s} {ways}-way {shots:2d}-shot "
                            f"{100 * result.accuracy:5.1f} +- {100 * result.ci95:4.1f} "
                            f"({n} episodes, {time.perf_counter() - start:.1f}s)"
                        )
                    row["seconds"] = time.perf_counter() - start
                    rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path, *, ways: int, shots: int) -> bool:
    """Bars of ``ways``-way ``shots``-shot accuracy per held-out modality and method, 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [
        r
        for r in rows
        if r["variant"] == ALL and r["ways"] == ways and r["shots"] == shots and r["accuracy"]
    ]
    if not sel:
        return False
    folds = list(dict.fromkeys(r["fold"] for r in sel))
    methods = list(dict.fromkeys(r["method"] for r in sel))
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(folds)), 4.5))
    cmap = plt.get_cmap("tab20")
    for j, method in enumerate(methods):
        by_fold = {r["fold"]: r for r in sel if r["method"] == method}
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, f in enumerate(folds) if f in by_fold]
        acc = [100 * by_fold[f]["accuracy"] for f in folds if f in by_fold]
        err = [100 * (by_fold[f]["ci95"] or 0.0) for f in folds if f in by_fold]
        ax.bar(xs, acc, width, yerr=err, capsize=2, label=method, color=cmap(j % 20))
    ax.axhline(100 / ways, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(folds)), folds, rotation=15)
    ax.set_ylabel(f"{ways}-way {shots}-shot accuracy (%)")
    ax.set_title("Leave one modality out: accuracy on the held-out modality (95% CI)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def previous_results(
    name: str, config: BenchConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows and training records of an earlier run of the same config, for ``--resume``."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return [], []
    payload = json.loads(path.read_text())
    wanted = json.loads(json.dumps(asdict(config)))
    saved = {k: payload["config"].get(k) for k in wanted}
    if saved != wanted:
        raise SystemExit(
            f"--resume: {path} was written with another config ({saved}); "
            "use another --name or drop --resume"
        )
    results = payload["results"]
    return results["rows"], results["training"]


def resolve(args: argparse.Namespace) -> BenchConfig:
    """The profile with the command-line overrides applied."""
    config = PROFILES[args.profile]
    steps = {k: max(1, round(v * args.steps_scale)) for k, v in config.steps.items()}
    config = replace(config, steps=steps)
    for field in ("folds", "ways", "shots"):
        if getattr(args, field):
            config = replace(config, **{field: tuple(getattr(args, field))})
    for field in ("proto_episodes", "costly_episodes", "finetune_steps", "queries", "width"):
        if getattr(args, field) is not None:
            config = replace(config, **{field: getattr(args, field)})
    unknown = sorted(set(config.folds) - set(SHARED_SETS))
    if unknown:
        raise SystemExit(f"--folds: unknown sets {unknown}; choose from {SHARED_SETS}")
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (every default comes from the profile)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step budget")
    p.add_argument("--folds", nargs="+", help=f"held-out sets, from {SHARED_SETS}")
    p.add_argument("--ways", nargs="+", type=int)
    p.add_argument("--shots", nargs="+", type=int)
    p.add_argument("--queries", type=int)
    p.add_argument("--proto-episodes", type=int, help="episodes of prototype-mode evaluation")
    p.add_argument("--costly-episodes", type=int, help="episodes of finetune/maml evaluation")
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--finetune-steps", type=int, help="AdaptConfig.finetune_steps")
    p.add_argument("--width", type=int, help="Conv-4 filters")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: cores, <= 16)")
    p.add_argument("--name", help="result name (default cross_domain, or cross_domain_quick)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the (fold, trainer) results of an earlier run of the same config in NAME.json",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write bench/results/NAME.json and NAME.png."""
    args = parse_args(argv)
    folder = require_shared_data()
    config = resolve(args)
    name = args.name or ("cross_domain" if config.profile == "full" else "cross_domain_quick")
    device = choose_device()
    threads = set_threads(args.threads)
    log = Progress()
    log(f"profile {config.profile} on {device} ({threads} threads): {asdict(config)}")
    sets = load_sets(folder, log)
    resolved = {**asdict(config), "trainers": args.trainers, "threads": threads}
    resolved["note"] = (
        f"prototype-mode rows use {config.proto_episodes} episodes; finetune/maml rows use "
        f"{config.costly_episodes} (one adaptation per episode)"
    )
    rows, training = previous_results(name, config) if args.resume else ([], [])
    done = {(t["fold"], t["trainer"]) for t in training}
    if done:
        log(f"resuming: {len(done)} (fold, trainer) pairs already in {name}.json")
    for fold in config.folds:
        log(f"fold: hold out {fold}")
        train_sets = [s for n, s in sets.items() if n != fold]
        targets = eval_targets(fold, cap_per_class(sets[fold], config.eval_per_class, config.seed))
        for trainer in args.trainers:
            if (fold, trainer) in done:
                continue
            model, record = train_backbone(trainer, train_sets, config, device, log)
            training.append({"fold": fold, "trainer": trainer, **record})
            rows.extend(evaluate_backbone(trainer, model, fold, targets, config, log))
            results = {"rows": rows, "training": training, "means": fold_means(rows)}
            write_result(name, config=resolved, results=results, device=device)
        log(f"fold {fold} done; partial results in {RESULTS / name}.json")
    png = RESULTS / f"{name}.png"
    shots = 5 if 5 in config.shots else config.shots[0]
    ways = 3 if 3 in config.ways else config.ways[-1]
    if plot(rows, png, ways=ways, shots=shots):
        log(f"plot: {png}")
    log(f"mean over held-out folds ({ALL}), accuracy %:")
    for m in sorted(fold_means(rows), key=lambda m: (m["variant"], m["ways"], m["shots"])):
        log(
            f"  {m['variant']:13s} {m['ways']}-way {m['shots']:2d}-shot {m['method']:24s} "
            f"{100 * m['accuracy']:5.1f}  ({m['folds']} folds)"
        )
    log(f"done: {RESULTS / name}.json")


if __name__ == "__main__":
    main()
