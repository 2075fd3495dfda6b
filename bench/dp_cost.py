"""DP cost: time and peak memory of one DP episodic meta-training step against the same step
without privacy (same model, same packed episodes, same optimiser), measured side by side.

The non-private step sums the episodes' losses and backpropagates once; the DP step computes
per-episode gradients with ``vmap(grad)``, clips, adds noise (Opacus ``DPOptimizer``). Each
variant runs in its own fresh process so peak memory (max RSS on CPU, max allocated on CUDA) is
its own. Run: ``python bench/dp_cost.py [--learners protonet fomaml] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, choose_device, set_threads, write_result
from models.meta import EpisodeBatch, MetaConfig, MetaLearner, split_params
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import synthetic_imageset
from privacy.dp_meta import DPConfig, DPMetaTrainer, pack, per_episode_grads


def _measure(variant: str, learner: str, repeats: int, threads: int, queue: Any) -> None:
    set_threads(threads)
    device = choose_device()
    torch.manual_seed(0)
    data = synthetic_imageset(config=PipelineConfig(), n_classes=6, per_class=40, seed=0)
    config = DPConfig(
        noise_multiplier=1.0, sample_rate=0.5, episodes=8, ways=3, max_shots=5, max_queries=5
    )
    model = build_backbone(BackboneConfig()).to(device)
    trainer = DPMetaTrainer(
        model, [data], dp=config, meta=MetaConfig(learner=learner), seed=0, augment=False
    )
    packed = pack(data, trainer.draw(key=1), config, augment_seed=None)
    packed = EpisodeBatch(*(t.to(device) for t in packed))
    meta = MetaLearner(MetaConfig(learner=learner))
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        if variant == "dp":
            params = {k: v.detach() for k, v in model.named_parameters()}
            _, buffers = split_params(model)
            grads = per_episode_grads(model, meta, params, buffers, packed, config.ways)
            for name, p in model.named_parameters():
                p.grad_sample = grads[name]
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
        else:
            plain.zero_grad()
            params = dict(model.named_parameters())
            _, buffers = split_params(model)
            total = sum(
                meta.episode_loss(
                    model, params, buffers, EpisodeBatch(*(t[e] for t in packed)), config.ways
                )
                for e in range(config.episodes)
            )
            (total / config.episodes).backward()
            plain.step()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        (torch.cuda.max_memory_allocated() - base) / 2**20
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    queue.put(
        {
            "variant": variant,
            "learner": learner,
            "seconds": statistics.median(times[1:]),
            "times": times[1:],
            "peak_extra_mib": peak,
            "device": str(device),
        }
    )


def main(argv: list[str] | None = None) -> None:
    """Measure and write bench/results/dp_cost.json (+ .png)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--learners", nargs="+", default=["protonet", "fomaml"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for learner in args.learners:
        pair = {}
        for variant in ("non-private", "dp"):
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_measure, args=(variant, learner, args.repeats, args.threads, queue)
            )
            proc.start()
            pair[variant] = queue.get()
            proc.join()
            print(
                f"{learner:9s} {variant:12s} {pair[variant]['seconds']:.3f} s/step, "
                f"peak +{pair[variant]['peak_extra_mib']:.0f} MiB",
                flush=True,
            )
        rows.append(
            {
                "learner": learner,
                **{f"{v}_{k}": pair[v][k] for v in pair for k in ("seconds", "peak_extra_mib")},
                "time_ratio": pair["dp"]["seconds"] / pair["non-private"]["seconds"],
                "memory_ratio": pair["dp"]["peak_extra_mib"]
                / max(pair["non-private"]["peak_extra_mib"], 1e-9),
            }
        )
        print(
            f"{learner}: DP/non-private time x{rows[-1]['time_ratio']:.2f}, "
            f"memory x{rows[-1]['memory_ratio']:.2f}",
            flush=True,
        )
    config = {
        **vars(args),
        "episodes": 8,
        "ways": 3,
        "shots": 5,
        "queries": 5,
        "backbone": BackboneConfig().to_dict(),
    }
    write_result("dp_cost", config=config, results={"rows": rows}, device=choose_device())
    _plot(rows, RESULTS / "dp_cost.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["time_ratio"] for r in rows], 0.4, label="time DP / non-private")
    ax.bar(x + 0.2, [r["memory_ratio"] for r in rows], 0.4, label="peak memory DP / non-private")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(x, [r["learner"] for r in rows])
    ax.set_ylabel("ratio")
    ax.set_title("Cost of one DP meta-training step (8 episodes, Conv-4, 64x64)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
