"""Accuracy vs epsilon of DP episodic meta-training, leave one modality out on the shared sets.

For each held-out set, one site holds the other four sets and trains with DP at each epsilon in
{1, 2, 4, 8} (delta 1e-5, sigma calibrated with the RDP accountant for the planned steps), plus
epsilon = inf: the same mechanism with per-episode clipping and no noise, and plain non-private
meta-training for the same number of steps. Few-shot accuracy with 95% CI on the held-out set
(prototype adaptation, 600 episodes). Also: how many more patients (at the same expected episode
fill, i.e. a k-times lower sample rate) epsilon 1 would need to reach epsilon 8's noise.

Run from the repository root: ``python bench/dp_epsilon.py [--folds ...] [--steps N]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    SHARED_SETS,
    Progress,
    choose_device,
    require_shared_data,
    set_threads,
    write_result,
)
from bench.cross_domain import load_sets
from models.episodes import EpisodeConfig
from models.evaluation import evaluate
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.training import TrainConfig, meta_train
from privacy.accounting import calibrate_noise_multiplier, epsilon_for
from privacy.dp_meta import EPISODIC_SENSITIVITY, DPConfig, DPMetaTrainer

DELTA = 1e-5
EPSILONS = (1.0, 2.0, 4.0, 8.0)


def records_needed(*, steps: int, q: float) -> list[dict[str, float]]:
    """Epsilon-1 noise vs epsilon-8 noise as the site grows k-fold (sample rate q / k keeps the
    expected number of patients per step, hence the signal, the same)."""
    sigma8 = calibrate_noise_multiplier(target_epsilon=8, delta=DELTA, sample_rate=q, steps=steps)
    rows = []
    for k in (1, 2, 4, 8, 16, 32, 64):
        sigma1 = calibrate_noise_multiplier(
            target_epsilon=1, delta=DELTA, sample_rate=q / k, steps=steps
        )
        rows.append({"patients_factor": k, "sigma_eps1": sigma1, "sigma_eps8_at_1x": sigma8})
    return rows


def train_dp(
    train_sets, dp: DPConfig, steps: int, seed: int, device
) -> tuple[torch.nn.Module, float]:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    model = build_backbone(BackboneConfig()).to(device)
    start = time.perf_counter()
    DPMetaTrainer(model, train_sets, dp=dp, meta=MetaConfig(), seed=seed).train(steps)
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    """Run and write bench/results/dp_epsilon.json (+ .png)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folds", nargs="+", default=list(SHARED_SETS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sample-rate", type=float, default=0.08)
    p.add_argument("--episodes", type=int, default=16, help="DP episodes per step (E)")
    p.add_argument("--eval-episodes", type=int, default=600)
    p.add_argument("--threads", type=int)
    p.add_argument("--name", default="dp_epsilon")
    args = p.parse_args(argv)
    folder = require_shared_data()
    device = choose_device()
    set_threads(args.threads)
    log = Progress()
    sets = load_sets(folder, log)
    base = DPConfig(
        noise_multiplier=1.0,
        sample_rate=args.sample_rate,
        episodes=args.episodes,
        ways=3,
        max_shots=5,
        max_queries=5,
    )
    config = {
        **vars(args),
        "dp": base.to_dict(),
        "delta": DELTA,
        "accountant": "rdp",
        "eval": "3-way and 2-way 5-shot, prototype adaptation",
    }
    rows: list[dict[str, Any]] = []
    needed = records_needed(steps=args.steps, q=args.sample_rate)
    for fold in args.folds:
        train_sets = [s for n, s in sets.items() if n != fold]
        for epsilon in (*EPSILONS, math.inf, None):
            seed = 0
            if epsilon is None:  # plain non-private meta-training, same number of steps
                torch.manual_seed(seed)
                model = build_backbone(BackboneConfig()).to(device)
                start = time.perf_counter()
                meta_train(model, train_sets, config=TrainConfig(steps=args.steps, seed=seed))
                seconds, label, sigma = time.perf_counter() - start, "non-private", 0.0
            else:
                if math.isinf(epsilon):
                    sigma = 1e-9  # clipping only: isolates the cost of the noise
                else:
                    sigma = EPISODIC_SENSITIVITY * calibrate_noise_multiplier(
                        target_epsilon=epsilon,
                        delta=DELTA,
                        sample_rate=args.sample_rate,
                        steps=args.steps,
                    )
                dp = dataclasses.replace(base, noise_multiplier=sigma)
                model, seconds = train_dp(train_sets, dp, args.steps, seed, device)
                label = "inf (clip only)" if math.isinf(epsilon) else f"{epsilon:g}"
            spent = (
                epsilon_for(
                    [(sigma / EPISODIC_SENSITIVITY, args.sample_rate, args.steps)],
                    delta=DELTA,
                    accountant="rdp",
                )
                if epsilon is not None and not math.isinf(epsilon)
                else None
            )
            for ways in (2, 3):
                result = evaluate(
                    model,
                    sets[fold],
                    episode=EpisodeConfig(ways, 5, 15),
                    episodes=args.eval_episodes,
                    seed=ways,
                )
                rows.append(
                    {
                        "fold": fold,
                        "epsilon": label,
                        "epsilon_accounted": spent,
                        "noise_multiplier": sigma,
                        "ways": ways,
                        "shots": 5,
                        "accuracy": result.accuracy,
                        "ci95": result.ci95,
                        "train_seconds": seconds,
                    }
                )
                log(
                    f"{fold:22s} eps {label:16s} {ways}-way 5-shot "
                    f"{100 * result.accuracy:5.1f} +- {100 * result.ci95:4.1f} ({seconds:.0f}s)"
                )
            write_result(
                args.name,
                config=config,
                device=device,
                results={"rows": rows, "records_needed": needed},
            )
    _plot(rows, Path(__file__).resolve().parent / "results" / f"{args.name}.png")
    log("done")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{e:g}" for e in EPSILONS] + ["inf (clip only)", "non-private"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for ways in (2, 3):
        means = []
        for label in labels:
            accs = [r["accuracy"] for r in rows if r["epsilon"] == label and r["ways"] == ways]
            means.append(100 * sum(accs) / len(accs) if accs else float("nan"))
        ax.plot(range(len(labels)), means, marker="o", label=f"{ways}-way 5-shot")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_xlabel("epsilon (delta 1e-5)")
    ax.set_ylabel("accuracy on held-out modality, % (mean over folds)")
    ax.set_title("DP episodic ProtoNet: accuracy vs epsilon")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
