"""Training throughput and adaptation latency, on synthetic data so it runs anywhere.

- Throughput: episodes per second of ``meta_train`` for each meta-learner, 5-way 5-shot 10-query
  episodes, Conv-4 on 64x64 images, on the benchmark device (CUDA when present).
- Latency: the dashboard path on the CPU with 2 threads (a clinician's 2-core machine): adapt a
  Conv-4 to a 5-way 5-shot support set with prototypes, then predict 20 images; p50/p90.
- Data path on the CPU: milliseconds per image of the training augmentations (``augment_batch``,
  256 images of 3x64x64 a batch; ~0.5 ms measured) and seconds to generate the synthetic set of
  24 classes x 40 images (~1.2 s measured on 2 shared cores). These were wall-clock asserts in
  the unit tests, where a loaded machine made them flaky; here they are measured and recorded.

Run from the repository root: ``python bench/throughput.py`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, Progress, choose_device, set_threads, write_result
from models.adaptation import AdaptConfig, adapt
from models.augment import augment_batch
from models.episodes import EpisodeConfig, sample_episode
from models.meta import META_LEARNERS, MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.synthetic import synthetic_arrays, synthetic_imageset
from models.training import TrainConfig, meta_train

EPISODE = EpisodeConfig(ways=5, shots=5, queries=10)  # the shape of the design's targets
PREDICT = 20  # images classified after adaptation in the latency measurement
LATENCY_THREADS = 2  # a clinician's laptop or small server
AUGMENT_BATCH = (256, 3, 64, 64)  # a DP meta-batch's images at the default 64 px
SYNTHETIC_SIZE = (24, 40)  # classes, images per class: the demo's synthetic pool


def training_throughput(
    learner: str, steps: int, device: torch.device, log: Progress
) -> dict[str, Any]:
    """Episodes per second of ``meta_train``, the first (warm-up) step left out."""
    data = synthetic_imageset(n_classes=10, per_class=30, seed=0)
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig()).to(device)
    config = TrainConfig(steps=steps + 1, episode=EPISODE)
    stamps: list[float] = []

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    meta_train(model, [data], config=config, meta=MetaConfig(learner=learner), on_step=on_step)
    seconds = stamps[-1] - stamps[0]
    episodes = steps * config.meta_batch
    result = {
        "learner": learner,
        "steps_timed": steps,
        "meta_batch": config.meta_batch,
        "seconds": seconds,
        "seconds_per_step": seconds / steps,
        "episodes_per_s": episodes / seconds,
    }
    log(f"  {learner:9s} {result['episodes_per_s']:7.2f} episodes/s ({seconds / steps:.3f} s/step)")
    return result


def adaptation_latency(repeats: int, log: Progress) -> dict[str, Any]:
    """Seconds to adapt with prototypes to 5x5 support images and predict 20, on 2 CPU threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        data = synthetic_imageset(n_classes=5, per_class=30, seed=1)
        torch.manual_seed(0)
        model = build_backbone(BackboneConfig()).eval()
        rng = np.random.default_rng(0)
        times = []
        for i in range(repeats + 3):  # 3 warm-up runs (allocator, kernels) are not counted
            ep = sample_episode(data.labels, data.patients, EPISODE, rng)
            sx = torch.from_numpy(data.images[ep.support])
            sy = torch.from_numpy(ep.support_labels)
            qx = torch.from_numpy(data.images[ep.query[:PREDICT]])
            start = time.perf_counter()
            classifier = adapt(model, sx, sy, ways=EPISODE.ways, config=AdaptConfig())
            classifier.predict_proba(qx)
            if i >= 3:
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    p50, p90 = (float(v) for v in np.percentile(times, [50, 90]))
    log(
        f"  adapt(prototype) + predict {PREDICT}: p50 {p50:.3f} s, p90 {p90:.3f} s ({repeats} runs)"
    )
    return {
        "threads": LATENCY_THREADS,
        "repeats": repeats,
        "support": EPISODE.ways * EPISODE.shots,
        "predicted": PREDICT,
        "p50_s": p50,
        "p90_s": p90,
        "mean_s": float(np.mean(times)),
        "times_s": times,
    }


def data_path_speed(repeats: int, log: Progress) -> dict[str, Any]:
    """CPU ms per image of ``augment_batch`` and seconds to generate the synthetic set (median)."""
    x = torch.rand(*AUGMENT_BATCH)
    augment_batch(x, seed=0)  # warm-up: the dihedral index table is built once per size
    augment_s = []
    for seed in range(repeats):
        start = time.perf_counter()
        augment_batch(x, seed=seed)
        augment_s.append(time.perf_counter() - start)
    ms_per_image = float(np.median(augment_s)) / AUGMENT_BATCH[0] * 1e3
    synthetic_s = []
    for seed in range(3):
        start = time.perf_counter()
        synthetic_arrays(n_classes=SYNTHETIC_SIZE[0], per_class=SYNTHETIC_SIZE[1], seed=seed)
        synthetic_s.append(time.perf_counter() - start)
    synthetic = float(np.median(synthetic_s))
    log(
        f"  augment_batch {ms_per_image:.3f} ms/image; synthetic {SYNTHETIC_SIZE[0]}x"
        f"{SYNTHETIC_SIZE[1]} images {synthetic:.2f} s"
    )
    return {
        "augment_batch_shape": list(AUGMENT_BATCH),
        "augment_ms_per_image": ms_per_image,
        "augment_batch_s": augment_s,
        "synthetic_classes_per_class": list(SYNTHETIC_SIZE),
        "synthetic_s": synthetic,
        "synthetic_runs_s": synthetic_s,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput bars and the latency distribution, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = results["training"]
    left.bar([r["learner"] for r in rows], [r["episodes_per_s"] for r in rows], color="tab:blue")
    left.set_ylabel("episodes / s")
    left.set_title(f"meta_train, 5-way 5-shot 10-query, Conv-4 64x64 ({results['device']})")
    lat = results["latency"]
    right.hist(lat["times_s"], bins=15, color="tab:orange")
    for q, style in (("p50_s", "-"), ("p90_s", "--")):
        right.axvline(lat[q], color="black", linestyle=style, label=f"{q[:3]} {lat[q]:.3f} s")
    right.set_xlabel("seconds")
    right.set_title(f"adapt (prototype) + predict {PREDICT}, {lat['threads']} CPU threads")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Measure and write bench/results/throughput.json and throughput.png."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, help="timed steps per learner (default 30 GPU, 4 CPU)")
    p.add_argument("--repeats", type=int, default=30, help="latency repetitions (>= 30)")
    p.add_argument("--learners", nargs="+", choices=META_LEARNERS, default=list(META_LEARNERS))
    p.add_argument("--threads", type=int, help="torch threads for training (default: cores)")
    p.add_argument("--name", default="throughput")
    args = p.parse_args(argv)
    device = choose_device()
    threads = set_threads(args.threads)
    steps = args.steps or (30 if device.type == "cuda" else 4)
    log = Progress()
    log(f"throughput on {device} ({threads} threads), {steps} timed steps per learner")
    training = [training_throughput(learner, steps, device, log) for learner in args.learners]
    log(f"latency on cpu ({LATENCY_THREADS} threads)")
    latency = adaptation_latency(args.repeats, log)
    log(f"data path on cpu ({threads} threads)")
    data_path = data_path_speed(args.repeats, log)
    results = {
        "device": str(device),
        "training": training,
        "latency": latency,
        "data_path": data_path,
    }
    config = {
        "episode": EPISODE.__dict__,
        "backbone": BackboneConfig().to_dict(),
        "train": TrainConfig(episode=EPISODE).to_dict(),
        "timed_steps": steps,
        "repeats": args.repeats,
        "threads": threads,
        "data": "models.synthetic.synthetic_imageset, 64x64",
    }
    path = write_result(args.name, config=config, results=results, device=device)
    plot(results, RESULTS / f"{args.name}.png")
    log(f"done: {path} and {RESULTS / args.name}.png")


if __name__ == "__main__":
    main()
