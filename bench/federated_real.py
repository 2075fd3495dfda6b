"""Federated DP on real images: three hospitals holding one modality, from a public start.

One shared modality is split by patient into four parts: three hospitals and a held-out
evaluation part (patients no site holds). The public start is a Conv-4 pre-trained, without
privacy, on the other four modalities (the operator's step, `fedfew pretrain`). Rows, each scored
on the same 3-way 5-shot episodes of the held-out patients (prototype adaptation, centred):

- ``public-start``: the starting model alone;
- ``federated-dp``: the real round loop and ClientApp handler (in process) for each parameter
  subset DP may touch and each per-site epsilon, sigma calibrated so every ledger ends there;
- ``federated-nonprivate``: the same rounds with ordinary local ProtoNet steps (no clipping, no
  noise), averaged;
- ``central-dp``: one model trained on the three parts pooled, at the same epsilon.

Run: ``python bench/federated_real.py [--modality blood_cells_bccd] [--epsilons 1 4 8]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Progress, require_shared_data, set_threads, write_result
from bench.cross_domain import SHARED_SETS, load_sets
from bench.federated_accuracy import at_epsilon, central, federated, sigma_for
from federation.demo_sites import split_evenly, write_site
from federation.inprocess_grid import set_task_identity
from federation.publishing import model_from_state
from federation.records import State
from federation.server_app import initial_state, public_eval_set
from federation.server_config import EvalConfig, ServerConfig
from models.episodes import EpisodeConfig
from models.evaluation import evaluate
from models.meta import MetaConfig
from models.networks import BackboneConfig
from models.pipeline import PipelineConfig
from models.pretraining import write_pretrained
from models.readers import load_dataset, patient_id_from_provenance
from models.training import TrainConfig, meta_train
from privacy.dp_config import DPSettings
from privacy.mechanisms import MECHANISMS

OUT = "federated_real"


def parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The run's options (shared with bench/mia_federated.py, which trains the same rows)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--modality", default="blood_cells_bccd", choices=SHARED_SETS)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    p.add_argument("--subsets", nargs="+", default=["norm-affine", "all"])
    p.add_argument("--mechanisms", nargs="+", default=["dp-episodic"], choices=sorted(MECHANISMS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--sample-rate", type=float, default=0.3)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--ways", type=int, default=3)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--augmentations", type=int, default=1, help="dp-supervised's K")
    p.add_argument("--out", default=OUT, help="results name under bench/results/")
    return p


def split_modality(folder: Path, modality: str, root: Path) -> tuple[list[dict[str, Any]], Path]:
    """Three hospitals' parts and the held-out evaluation part of one modality (by patient)."""
    keys = ("images", "labels", "classes", "provenance")  # not the 0-d `source` note
    with np.load(folder / f"{modality}.npz") as loaded:
        arrays = {k: loaded[k] for k in keys}
    *sites, held_out = split_evenly(arrays, 4)
    configs = []
    for i, part in enumerate(sites):
        name = f"site-{i + 1}"
        path = write_site(root / name / "data.npz", part)
        configs.append({"site-id": name, "data": str(path), "registry": str(root / name / "reg")})
    return configs, write_site(root / "held-out.npz", held_out)


def patients_per_site(sites: list[dict[str, Any]]) -> float:
    """Mean number of patients per site (what the operator's plan assumes)."""
    counts = []
    for site in sites:
        with np.load(site["data"]) as part:
            counts.append(
                len(np.unique([patient_id_from_provenance(str(p)) for p in part["provenance"]]))
            )
    return float(np.mean(counts))


def score(state: State, config: ServerConfig, args: argparse.Namespace) -> dict[str, float]:
    """3-way 5-shot accuracy on the held-out patients, the same episodes for every row."""
    model = model_from_state(state, config.round_plan(1)).eval()
    result = evaluate(
        model,
        public_eval_set(config),
        episode=EpisodeConfig(ways=args.ways, shots=5, queries=15),
        episodes=args.episodes,
        seed=1,
    )
    return {"accuracy": result.accuracy, "ci95": result.ci95}


def nonprivate_federated(config: ServerConfig, sites: list[dict[str, Any]]) -> State:
    """FedAvg of ordinary local ProtoNet steps on the same rounds and subset (no DP)."""
    plan = config.round_plan(1)
    pipeline = PipelineConfig(image_size=config.backbone.image_size)
    sets = [load_dataset(s["data"], pipeline) for s in sites]
    state = initial_state(config)
    train = TrainConfig(
        steps=config.steps,
        meta_batch=config.dp.episodes,
        lr=config.local_lr,
        episode=EpisodeConfig(ways=config.dp.ways, shots=config.dp.max_shots, queries=5),
    )
    for _ in range(config.num_rounds):
        deltas = []
        for data in sets:
            model = model_from_state(state, plan)
            meta_train(model, [data], config=train, meta=MetaConfig())
            local = model.state_dict()
            deltas.append({k: local[k].numpy() - state[k] for k in state})
        state = {k: state[k] + np.mean([d[k] for d in deltas], axis=0) for k in state}
    return state


def setup(
    args: argparse.Namespace, log: Progress, *, start: Path | None = None
) -> tuple[list[dict[str, Any]], ServerConfig]:
    """The three hospitals' parts (written under a temporary folder) and the base run config:
    a public start pre-trained on the other four modalities, evaluated on the held-out part.
    ``start``: an earlier run's public start for the same modality and options (the caller
    checks it), reused instead of pre-training again."""
    folder = require_shared_data()
    root = Path(tempfile.mkdtemp(prefix="fedfew-bench-fedreal-"))
    sites, held_out = split_modality(folder, args.modality, root)
    if start is None:
        public = [s for name, s in load_sets(folder, log).items() if name != args.modality]
        log(f"public start: supervised pre-training on {[s.name for s in public]}")
        start = write_pretrained(
            root / "public-start",
            public,
            objective="supervised",
            backbone=BackboneConfig(width=args.width),
            steps=args.pretrain_steps,
        )
    else:
        log(f"public start: reusing {start}")
    base = ServerConfig(
        federation="bench-real",
        num_rounds=args.rounds,
        steps=args.local_steps,
        min_nodes=3,
        min_replies=3,
        initial_model=str(start),
        seed=0,
        workdir=str(root / "server"),
        dp=DPSettings(
            sample_rate=args.sample_rate,
            # dp-supervised's public normaliser B: q times a site's patients (the operator's
            # estimate)
            expected_patients=max(1, round(args.sample_rate * patients_per_site(sites))),
            augmentations=args.augmentations,
        ),
        backbone=BackboneConfig(width=args.width),
        # the round loop's own evaluation; rows are scored by score()
        eval=EvalConfig(data=str(held_out), ways=args.ways, episodes=20),
    )
    return sites, base


def main() -> None:
    args = parser().parse_args()
    set_threads(args.threads)
    set_task_identity()
    log = Progress()
    sites, base = setup(args, log)
    root = Path(base.workdir).parent
    rows: list[dict[str, Any]] = []

    def record(method: str, subset: str | None, epsilon: float | None, state: State) -> None:
        rows.append({"method": method, "trainable": subset, "epsilon": epsilon,
                     **score(state, base, args)})  # fmt: skip
        write_result(args.out, config=vars(args), results=rows, device=torch.device("cpu"))
        log(f"{method} {subset} eps={epsilon}: {100 * rows[-1]['accuracy']:.1f}%")

    record("public-start", None, None, initial_state(base))
    fed_steps = args.rounds * args.local_steps
    for subset in args.subsets:
        config = base.with_values({"backbone.trainable": subset})
        record("federated-nonprivate", subset, None, nonprivate_federated(config, sites))
        for mechanism, epsilon in itertools.product(args.mechanisms, args.epsilons):
            name = f"{mechanism}-{subset}-eps{epsilon:g}"
            run = at_epsilon(dataclasses.replace(config, mechanism=mechanism), epsilon,
                             steps=fed_steps, name=name, root=root)  # fmt: skip
            result = federated(run, sites, epsilon * 1.0001, root / name)
            record(f"federated-{mechanism}", subset, epsilon, result["state"])
    best = max(args.epsilons)
    pooled = base.with_values({"backbone.trainable": args.subsets[0]})
    sigma = sigma_for(pooled, best, fed_steps * len(sites))
    record("central-dp", args.subsets[0], best, central(pooled, sites, sigma))
    log(f"wrote bench/results/{args.out}.json")


if __name__ == "__main__":
    main()
