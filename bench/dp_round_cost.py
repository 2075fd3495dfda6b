"""What DP costs in time in one hospital's round at the demo's size (issue 26: <= 1.2x).

Measured as pairs, in process, on the demo's own data and run config (``app/demo_run.toml``):
three hospitals' synthetic images, ImageNet EfficientNet-Lite0 frozen at 128 px, each hospital's
features embedded once (the node's own feature store, kept under ``--workdir``). One repeat of
one hospital times its local round as the node runs it on cached features
(federation/node.py ``_run_locked``): the model from the global state, the training view
(the adapter and the site's cached features), the trainer, ``steps`` steps. Arms:

- ``dp``: the round exactly as the demo plans it: the plan's mechanism builds its trainer
  (``DPMetaTrainer``: per-episode gradients by ``vmap(grad)``, each clipped to C, Gaussian
  noise, Opacus ``DPOptimizer`` over Adam);
- ``non-private``: the same round without DP: the same episodes (the same plan and patient
  draw from the same key, the same padding), the same ProtoNet episode loss
  (``MetaLearner.episode_loss``), the same Adam and learning rate, the same steps, but a plain
  gradient: the episodes' losses (one batched forward, ``vmap`` over episodes) summed, divided
  by the episodes per step as the DP optimiser divides, one ``backward()``, ``Adam.step()``.
  No per-episode gradient, no clipping, no noise and no Opacus object exist on this path;
- ``dp machinery, no noise, no clip`` (context): the DP trainer with sigma 1e-30 and C = 1e9
  (noise std 1e-21): the per-episode machinery and Opacus without effective noise or clipping.

Every repeat runs the arms in a rotating order from the same seed (same episodes), so each DP
round has a non-private partner measured next to it. Reported per hospital and pooled: median
and mean seconds per round with 95% CIs (t), and the paired ratio DP / non-private (ratio of
means and median of per-pair ratios, each with a paired bootstrap 95% CI), for the whole local
round and for its training part alone (trainer built + ``steps`` steps; the model and feature
read before it are the same in both arms). Before timing, a check that the non-private path is
the DP path minus DP: one round of the DP trainer without noise or clipping and one of the
non-private trainer, from the same start and seed, should end at the same adapter. For context,
the round's wall time in the Flower demo is read from bench/results/federation_cost_encoder.json.

    python bench/dp_round_cost.py [--repeats 30] [--threads 1] [--workdir DIR]

One torch thread by default: the demo gives each of its three nodes ``cpu_count // 3`` (1 here).
The first run embeds the hospitals' images (1-2 minutes); later runs read the features back.
Writes ``bench/results/dp_round_cost.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch.func import vmap

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import DemoSettings, demo_run_config, public_start, server_config, site_data
from bench.common import RESULTS, Progress, set_threads, write_result
from bench.federated_encoder import NO_CLIP, NO_NOISE, site_features
from federation.demo_sites import DEMO_SITES
from federation.node import training_view
from federation.node_config import NodeConfig
from federation.plan import RoundPlan
from federation.publishing import model_from_state
from federation.records import State
from federation.server_app import initial_state
from models.freezing import frozen_parameters, trainable_parameters
from models.imageset import ImageSet
from models.meta import EpisodeBatch, MetaConfig, MetaLearner, Params, split_params
from models.pipeline import PipelineConfig
from privacy.dp_meta import DPConfig, DPMetaTrainer, merge_sets, pack

OUT = "dp_round_cost"
CACHE = RESULTS / "cache" / OUT  # the hospitals' data and feature stores (git-ignored)
DP, PLAIN, MACHINERY = "dp", "non-private", "dp machinery, no noise, no clip"
ARMS = (DP, PLAIN, MACHINERY)
TINY_SIGMA = 1e-30  # DPConfig needs sigma > 0: noise std sigma * C = 1e-21, below any gradient
TARGET = 1.2  # issue 26: a DP round <= 1.2x the same round without DP
FLOWER_COST = RESULTS / "federation_cost_encoder.json"


class PlainEpisodicTrainer:
    """The demo's local round without DP: the DP trainer's episodes and loss, a plain gradient.

    Episodes are drawn as :class:`DPMetaTrainer` draws them (the public plan and the patient
    assignment of a key; keys from the same seeded generator) and packed by
    the same ``pack``; the loss of each episode is ``MetaLearner.episode_loss``. The step is the
    ordinary one: the episodes' losses from one batched forward, summed and divided by the
    episodes per step (as ``DPOptimizer`` divides its noisy sum), ``backward()``, optimiser step.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sets: Sequence[ImageSet],
        *,
        dp: DPConfig,
        meta: MetaConfig,
        lr: float,
        seed: int,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
    ) -> None:
        self.model = model
        self.data, self.class_sets = merge_sets(sets)
        self.dp = dp
        self.learner = MetaLearner(meta)
        self._rng = np.random.default_rng(seed)
        self.optimizer = base_optimizer(model.parameters(), lr=lr)

    # the episodes of one step for a key, drawn as the DP trainer draws them (same attributes)
    draw = DPMetaTrainer.draw

    def step(self) -> None:
        """One plain step on one step's episodes."""
        key = int(self._rng.integers(2**63))  # DPMetaTrainer._key with a seed
        packed = pack(self.data, self.draw(key), self.dp, augment_seed=None)  # features: none
        params: Params = dict(trainable_parameters(self.model))  # live: autograd tracks them
        _, buffers = split_params(self.model)
        constants = {**buffers, **{k: v.detach() for k, v in frozen_parameters(self.model).items()}}

        def loss(*episode: torch.Tensor) -> torch.Tensor:
            batch = EpisodeBatch(*episode)
            return self.learner.episode_loss(self.model, params, constants, batch, self.dp.ways)

        losses = vmap(loss)(*(t for t in packed if t is not None))
        self.optimizer.zero_grad()
        (losses.sum() / self.dp.episodes).backward()
        self.optimizer.step()

    def train(self, steps: int) -> None:
        """``steps`` plain steps; the model keeps the last iterate (the demo's default)."""
        self.model.train()
        for _ in range(steps):
            self.step()


def episodic(plan: RoundPlan) -> DPConfig:
    """The plan's DP settings (the demo's mechanism is DP episodic meta-training)."""
    assert isinstance(plan.dp, DPConfig)
    return plan.dp


def local_round(
    arm: str, plan: RoundPlan, state: State, node: NodeConfig, seed: int
) -> tuple[float, float, torch.nn.Module]:
    """One hospital's round in ``arm``: seconds of the whole local round and of its training
    part (trainer built and run), and the trained model."""
    started = time.perf_counter()
    model = model_from_state(state, plan)
    learner, data = training_view(model, node, PipelineConfig(image_size=plan.backbone.image_size))
    trained = time.perf_counter()
    if arm == PLAIN:
        trainer: Any = PlainEpisodicTrainer(
            learner, [data], dp=episodic(plan), meta=plan.meta, lr=plan.local_lr, seed=seed
        )
    else:
        dp = episodic(plan)
        if arm == MACHINERY:
            dp = dataclasses.replace(dp, noise_multiplier=TINY_SIGMA, max_grad_norm=NO_CLIP)
        trainer = plan.dp_mechanism.build_trainer(
            learner, [data], dp=dp, meta=plan.meta, lr=plan.local_lr, seed=seed
        )
    trainer.train(plan.steps)
    ended = time.perf_counter()
    return ended - started, ended - trained, model


def adapter_of(model: torch.nn.Module) -> torch.Tensor:
    """The trained parameters, flattened."""
    return torch.cat([p.detach().flatten() for p in trainable_parameters(model).values()])


def equivalence(plan: RoundPlan, state: State, node: NodeConfig) -> dict[str, float]:
    """How far apart the arms end after one round from the same start and seed: the
    non-private path against the machinery arm (sigma 1e-30, no clip: should agree to rounding),
    against the DP trainer at ``NO_NOISE`` and ``NO_CLIP`` (the other benches' non-private rows;
    Opacus adds noise of std sigma * C there: 1e-21 now, 1e-9 * 1e9 = 1 before the fix, which
    dp_round_cost.json of 2026-12 recorded) and against the demo's DP round;
    and the round's own update, for scale."""
    start = adapter_of(model_from_state(state, plan).adapter)  # type: ignore[arg-type]
    ends = {arm: adapter_of(local_round(arm, plan, state, node, seed=7)[2]) for arm in ARMS}
    model = model_from_state(state, plan)
    learner, data = training_view(model, node, PipelineConfig(image_size=plan.backbone.image_size))
    dp = dataclasses.replace(episodic(plan), noise_multiplier=NO_NOISE, max_grad_norm=NO_CLIP)
    plan.dp_mechanism.build_trainer(
        learner, [data], dp=dp, meta=plan.meta, lr=plan.local_lr, seed=7
    ).train(plan.steps)
    bench_rows = adapter_of(model)
    plain = ends[PLAIN]
    return {
        "max_abs_nonprivate_vs_machinery": float((plain - ends[MACHINERY]).abs().max()),
        "norm_nonprivate_vs_machinery": float((plain - ends[MACHINERY]).norm()),
        "norm_round_update_nonprivate": float((plain - start).norm()),
        "max_abs_nonprivate_vs_dp": float((plain - ends[DP]).abs().max()),
        "max_abs_nonprivate_vs_NO_NOISE_NO_CLIP": float((plain - bench_rows).abs().max()),
        "max_abs_round_update_nonprivate": float((plain - start).abs().max()),
        # the noise std Opacus adds to a step's summed gradient is sigma * C
        "noise_std_on_sum_dp": plan.dp.noise_multiplier * plan.dp.max_grad_norm,
        "noise_std_on_sum_NO_NOISE_NO_CLIP": NO_NOISE * NO_CLIP,
    }


def t_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval."""
    n = len(values)
    half = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    return float(values.mean()), half


def median_ci(values: np.ndarray) -> tuple[float, float, float]:
    """Median and its distribution-free 95% interval (order statistics, binomial)."""
    s = np.sort(values)
    n = len(s)
    lo = int(stats.binom.ppf(0.025, n, 0.5))
    hi = int(stats.binom.isf(0.025, n, 0.5))
    return float(np.median(s)), float(s[max(lo - 1, 0)]), float(s[min(hi, n - 1)])


def paired_ratio(dp: np.ndarray, plain: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """DP / non-private over paired repeats: the ratio of means and the median of the per-pair
    ratios, each with a 95% percentile bootstrap interval that resamples pairs."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dp), size=(10_000, len(dp)))
    of_means = dp[idx].mean(1) / plain[idx].mean(1)
    per_pair = dp / plain
    medians = np.median(per_pair[idx], axis=1)
    return {
        "ratio_of_means": float(dp.mean() / plain.mean()),
        "ratio_of_means_ci95": [float(np.percentile(of_means, 2.5)),
                                float(np.percentile(of_means, 97.5))],
        "median_pair_ratio": float(np.median(per_pair)),
        "median_pair_ratio_ci95": [float(np.percentile(medians, 2.5)),
                                   float(np.percentile(medians, 97.5))],
        "pairs": len(dp),
    }  # fmt: skip


def summary(times: dict[str, list[float]]) -> dict[str, Any]:
    """Per arm: median and mean seconds with 95% CIs; DP / non-private paired."""
    out: dict[str, Any] = {}
    for arm, values in times.items():
        v = np.asarray(values)
        med, lo, hi = median_ci(v)
        mean, half = t_ci(v)
        out[arm] = {"median_s": med, "median_ci95": [lo, hi], "mean_s": mean,
                    "mean_ci95": [mean - half, mean + half], "repeats": len(v)}  # fmt: skip
    dp, plain = np.asarray(times[DP]), np.asarray(times[PLAIN])
    out["dp_over_nonprivate"] = paired_ratio(dp, plain)
    if MACHINERY in times:
        out["machinery_over_nonprivate"] = paired_ratio(np.asarray(times[MACHINERY]), plain)
    return out


def flower_round() -> dict[str, Any] | None:
    """The demo's round in Flower (bench/federation_cost.py), features cached: round 2."""
    if not FLOWER_COST.is_file():
        return None
    rounds = json.loads(FLOWER_COST.read_text())["results"]["rounds"]
    cached = [r for r in rounds if r["round"] > 1]
    if not cached:
        return None
    r = cached[0]
    return {"source": str(FLOWER_COST.relative_to(RESULTS.parents[1])), "round": r["round"],
            "round_s": r["round_s"], "slowest_node_s": r["slowest_node_s"],
            "overhead_s": r["overhead_s"], "node_compute_s": r["node_compute_s"]}  # fmt: skip


def hospitals(root: Path, demo: DemoSettings) -> dict[str, Path]:
    """The demo's hospitals' data under ``root``, written once (their bytes key the features)."""
    kept = {name: root / name / "data.npz" for name in DEMO_SITES}
    if all(p.is_file() for p in kept.values()):
        return kept
    return site_data(root, None, images_per_class=demo.images_per_class)


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds per local round by arm and hospital (each repeat a dot, the median a bar with
    its 95% CI), and
    the paired ratio DP / non-private with its interval against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*result["hospitals"], "pooled"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=[3, 2])
    width = 0.8 / len(ARMS)
    for j, arm in enumerate(ARMS):
        x = np.arange(len(names)) + (j - (len(ARMS) - 1) / 2) * width
        rows = [result["round"][n][arm] for n in names]
        medians = [r["median_s"] for r in rows]
        err = np.array([[m - r["median_ci95"][0], r["median_ci95"][1] - m]
                        for m, r in zip(medians, rows, strict=True)]).T  # fmt: skip
        left.bar(x, medians, width, yerr=err, capsize=2, label=arm, alpha=0.7)
        for i, n in enumerate(names[:-1]):
            values = result["times"][n]["round"][arm]
            left.plot(np.full(len(values), x[i]), values, ".", color="black", ms=2)
    left.set_xticks(np.arange(len(names)), names)
    left.set_ylabel("seconds per local round")
    steps, episodes = result["plan"]["steps"], result["plan"]["episodes"]
    left.set_title(f"One hospital's round, cached features ({steps} steps x {episodes} episodes)")
    left.legend(fontsize=8)
    for k, part in enumerate(("round", "training")):
        ratios = [result[part][n]["dp_over_nonprivate"] for n in names]
        y = np.arange(len(names)) + (0.15 if k else -0.15)
        mid = [r["ratio_of_means"] for r in ratios]
        err = np.array([[m - r["ratio_of_means_ci95"][0], r["ratio_of_means_ci95"][1] - m]
                        for m, r in zip(mid, ratios, strict=True)]).T  # fmt: skip
        label = "whole local round" if part == "round" else "training part only"
        right.errorbar(mid, y, xerr=err, fmt="o", capsize=3, label=label)
    right.axvline(TARGET, color="red", ls="--", lw=1, label=f"target {TARGET}x")
    right.axvline(1.0, color="grey", lw=0.8)
    right.set_yticks(np.arange(len(names)), names)
    right.invert_yaxis()
    right.set_xlabel("DP / non-private (ratio of means, paired 95% CI)")
    flower = result.get("flower_round")
    if flower:
        right.set_title(
            f"for scale: the demo's round in Flower takes {flower['round_s']:.0f} s", fontsize=9
        )
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per arm, hospital")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--workdir", type=Path, default=CACHE, help="hospitals' data and features (kept)"
    )
    parser.add_argument("--out", default=OUT, help="results name under bench/results/")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    log = Progress()
    # the adapter recipe (app/demo_run_secure.toml) at the hospitals' size these results used
    demo = DemoSettings(run=demo_run_config(secure=True), images_per_class=150)
    root = Path(args.workdir)
    sites = hospitals(root, demo)
    scratch = Path(tempfile.mkdtemp(prefix="fedfew-bench-dp-round-"))
    config = server_config(scratch, 3, demo, "synthetic", public_start(scratch, demo, log))
    plan = config.round_plan(1)
    dp = episodic(plan)
    state = initial_state(config)
    nodes = [
        {"site-id": name, "data": str(path), "registry": str(scratch / name / "registry"),
         "state-dir": str(root / name)}
        for name, path in sites.items()
    ]  # fmt: skip
    started = time.perf_counter()
    site_features(config, nodes)  # embedded once into each node's store, else read back
    log(f"features ready in {time.perf_counter() - started:.1f} s")
    node_configs = {
        n["site-id"]: NodeConfig.from_mapping(
            {**n, "ledger": "unused.db", "budget-epsilon": 1.0, "budget-delta": 1e-5}
        )
        for n in nodes
    }
    first = next(iter(node_configs.values()))
    check = equivalence(plan, state, first)
    log(f"equivalence: {check}")
    times: dict[str, dict[str, dict[str, list[float]]]] = {}
    records = {}  # each hospital's feature records (images)
    for h, (name, node) in enumerate(node_configs.items()):
        model = model_from_state(state, plan)
        records[name] = len(
            training_view(model, node, PipelineConfig(image_size=plan.backbone.image_size))[
                1
            ].labels
        )
        for arm in ARMS:  # warm-up: imports, vmap's first trace, allocator
            local_round(arm, plan, state, node, seed=10**6 + h)
        times[name] = {"round": {a: [] for a in ARMS}, "training": {a: [] for a in ARMS}}
        for rep in range(args.repeats):
            order = ARMS[rep % len(ARMS) :] + ARMS[: rep % len(ARMS)]
            if rep % 2:  # alternate the direction too: DP before and after its partner
                order = order[::-1]
            for arm in order:
                whole, training, _ = local_round(arm, plan, state, node, seed=1000 * h + rep)
                times[name]["round"][arm].append(whole)
                times[name]["training"][arm].append(training)
        dp_s = np.asarray(times[name]["round"][DP])
        plain_s = np.asarray(times[name]["round"][PLAIN])
        log(
            f"{name}: DP {np.median(dp_s):.3f} s, non-private {np.median(plain_s):.3f} s a round "
            f"(medians of {args.repeats}), ratio of means {dp_s.mean() / plain_s.mean():.2f}"
        )
    times["pooled"] = {
        part: {a: [t for n in node_configs for t in times[n][part][a]] for a in ARMS}
        for part in ("round", "training")
    }
    result: dict[str, Any] = {
        "hospitals": list(node_configs),
        "plan": {"steps": plan.steps, "local_lr": plan.local_lr, "mechanism": plan.mechanism,
                 "adapter": plan.backbone.adapter, "image_size": plan.backbone.image_size,
                 **dp.to_dict()},
        "records": records,
        "round": {n: summary(times[n]["round"]) for n in times},
        "training": {n: summary(times[n]["training"]) for n in times},
        "equivalence": check,
        "flower_round": flower_round(),
        "target": TARGET,
        "times": times,
    }  # fmt: skip
    pooled = result["round"]["pooled"]["dp_over_nonprivate"]
    log(f"pooled DP / non-private: {pooled['ratio_of_means']:.3f} "
        f"{pooled['ratio_of_means_ci95']} ({pooled['pairs']} pairs)")  # fmt: skip
    config_out = {**vars(args), "workdir": str(args.workdir), "torch_threads": threads}
    path = write_result(args.out, config=config_out, results=result, device=torch.device("cpu"))
    plot(result, RESULTS / f"{args.out}.png")
    log(f"wrote {path} and {args.out}.png")


if __name__ == "__main__":
    main()
