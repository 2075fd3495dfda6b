"""Accuracy of the federated DP model vs epsilon, against central training on the same data pooled.

Three hospitals hold the demo's synthetic training classes (``federation/demo_sites.py``: different
class mixes, disjoint patients). For each target epsilon, the federation runs ``--rounds`` rounds
of ``--local-steps`` DP steps per site through the real ServerApp round loop and ClientApp handler
(in process: the transport does not change accuracy), with sigma calibrated so each site's ledger
ends at that epsilon. Central baselines train one model on the pooled data for as many steps as
all sites together: DP at the same epsilon, and non-private. Every model is evaluated on the 8
unseen synthetic classes (5-way, 1 and 5 shots, prototype adaptation).

Run: ``python bench/federated_accuracy.py [--epsilons 1 2 4 8] [--rounds 5] [--local-steps 10]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Context, RecordDict

from bench.common import RESULTS, Progress, set_threads, write_result
from federation.client_app import app as client_app
from federation.demo_sites import DEMO_MIXES, DEMO_SITES, split_by_patient, write_site
from federation.inprocess_grid import InProcessGrid, set_task_identity
from federation.publishing import model_from_state
from federation.records import State
from federation.rounds import run_rounds
from federation.server_app import evaluate_state, initial_state, public_eval_set
from federation.server_config import ServerConfig
from federation.strategies import strategy_for
from models.episodes import EpisodeConfig
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from models.synthetic import DEMO_TRAIN_CLASSES, synthetic_arrays
from models.training import TrainConfig, meta_train
from privacy.accounting import calibrate_noise_multiplier
from privacy.ledger import Ledger
from privacy.mechanisms import get_mechanism

DELTA = 1e-5


def _sites(root: Path) -> list[dict[str, Any]]:
    arrays = synthetic_arrays(n_classes=DEMO_TRAIN_CLASSES, per_class=40, seed=0)
    configs = []
    for name, part in zip(DEMO_SITES, split_by_patient(arrays, DEMO_MIXES), strict=True):
        path = write_site(root / name / "data.npz", part)
        configs.append({"site-id": name, "data": str(path), "registry": str(root / name / "reg")})
    return configs


def federated(config: ServerConfig, sites: list[dict[str, Any]], cap: float, root: Path) -> dict:
    """Run the federation in process (real round loop and ClientApp handler); each site's
    ledger is created with cap ``cap``."""

    def handler(site: dict[str, Any]):
        node_config = {
            **site,
            "ledger": str(root / f"{site['site-id']}.db"),
            "budget-epsilon": cap,
            "budget-delta": DELTA,
            "min-noise": 0.01,
            "max-sample-rate": 1.0,  # the benchmark's plan chooses q
            "allowed-mechanisms": config.mechanism,  # and the mechanism
        }
        context = Context(
            run_id=1, node_id=0, node_config=node_config, state=RecordDict(), run_config={}
        )
        return lambda msg: client_app(msg, context)

    grid = InProcessGrid({i + 1: handler(s) for i, s in enumerate(sites)})
    eval_set = public_eval_set(config)
    final = run_rounds(
        grid,
        strategy_for(config, initial_state(config)),
        initial_state=initial_state(config),
        evaluate=lambda s: evaluate_state(s, config, eval_set),
        publish=lambda s, r: None,
    )
    spent = {s["site-id"]: Ledger.open(root / f"{s['site-id']}.db").epsilon_spent() for s in sites}
    return {"state": final.state, "site_epsilon": spent, "rounds": final.history}


def sigma_for(config: ServerConfig, epsilon: float, steps: int) -> float:
    """The sigma (as applied to C) with which ``steps`` steps of the config's mechanism at its
    sampling rate spend ``epsilon`` at delta 1e-5."""
    accounted = calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=DELTA, sample_rate=config.dp.sample_rate, steps=steps
    )
    return get_mechanism(config.mechanism).noise_for(accounted)


def at_epsilon(
    config: ServerConfig, epsilon: float, *, steps: int, name: str, root: Path
) -> ServerConfig:
    """A federation run of ``config`` whose ``steps`` DP steps per site spend ``epsilon``."""
    return dataclasses.replace(
        config, federation=f"bench-{name}", workdir=str(root / f"server-{name}")
    ).with_values({"dp.noise-multiplier": sigma_for(config, epsilon, steps)})


def central(config: ServerConfig, sites: list[dict[str, Any]], sigma: float | None) -> State:
    """One model trained from the config's start on the sites' data pooled: DP at ``sigma``
    (as applied to C) for as many steps as all sites together, or non-private (``None``)."""
    pipeline = PipelineConfig(image_size=config.backbone.image_size)
    sets = [load_dataset(s["data"], pipeline) for s in sites]
    model = model_from_state(initial_state(config), config.round_plan(1))
    steps = config.num_rounds * config.steps * len(sites)
    if sigma is None:
        train = TrainConfig(
            steps=steps,
            meta_batch=config.dp.episodes,
            episode=EpisodeConfig(ways=config.dp.ways, shots=config.dp.max_shots, queries=5),
        )
        meta_train(model, sets, config=train)
    else:
        plan = config.with_values({"dp.noise-multiplier": sigma}).round_plan(1)
        trainer = plan.dp_mechanism.build_trainer(
            model, sets, dp=plan.dp, meta=plan.meta, lr=config.local_lr, seed=None
        )
        trainer.train(steps)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--eval-episodes", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    set_task_identity()
    progress = Progress()
    root = Path(tempfile.mkdtemp(prefix="fedfew-bench-fedacc-"))
    sites = _sites(root)
    base = ServerConfig(
        federation="bench",
        num_rounds=args.rounds,
        steps=args.local_steps,
        min_nodes=3,
        min_replies=3,
        seed=0,
    ).with_values({"backbone.width": args.width, "eval.episodes": args.eval_episodes})
    eval_set = public_eval_set(base)
    rows: list[dict[str, Any]] = []

    def record(method: str, epsilon: float | None, state: State, **extra: Any) -> None:
        metrics = evaluate_state(state, base, eval_set)
        rows.append({"method": method, "target_epsilon": epsilon, **metrics, **extra})
        write_result("federated_accuracy", config=vars(args) | {"server": base.to_dict()},
                     results=rows, device=torch.device("cpu"))  # fmt: skip
        progress(f"{method} eps={epsilon}: {metrics}")

    record("random-init", None, initial_state(base))
    fed_steps = args.rounds * args.local_steps
    central_steps = fed_steps * len(sites)
    for epsilon in args.epsilons:
        config = at_epsilon(base, epsilon, steps=fed_steps, name=f"eps{epsilon:g}", root=root)
        result = federated(config, sites, epsilon * 1.0001, root / f"eps{epsilon:g}")
        record("federated-dp", epsilon, result["state"], site_epsilon=result["site_epsilon"],
               sigma=config.dp.noise_multiplier)  # fmt: skip
        sigma = sigma_for(base, epsilon, central_steps)
        record("central-dp", epsilon, central(base, sites, sigma), sigma=sigma)
    record("central-nonprivate", None, central(base, sites, None))
    _plot(rows)
    progress(f"wrote {RESULTS / 'federated_accuracy.json'}")


def _plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = next(k for k in rows[0] if k.startswith("accuracy-") and k.endswith("5shot"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("federated-dp", "o-"), ("central-dp", "s--")):
        pts = [(r["target_epsilon"], r[key]) for r in rows if r["method"] == method]
        if pts:
            ax.plot(*np.array(pts).T, style, label=method)
    for method, colour in (("central-nonprivate", "green"), ("random-init", "grey")):
        for r in rows:
            if r["method"] == method:
                ax.axhline(r[key], color=colour, linestyle=":", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon per site (delta 1e-5)")
    ax.set_ylabel(f"{key} on unseen classes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "federated_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
