"""Which DP recipe lets the demo's hospitals improve a public start? A sweep, one row per recipe.

The demo's setting: three synthetic hospitals (``federation/demo_sites.py``: different class mixes,
disjoint patients, ``--per-class`` images per class, two per patient), a Conv-4 (width 32) public
start pre-trained with ProtoNet on the 8 public synthetic classes (``models.synthetic.public_set``,
imaged in ``--public-modality``), and 5-way 5-shot accuracy on the 8 unseen classes (the same
100 episodes for every row). Each
recipe runs ``rounds`` rounds of FedAvg over the three sites, in process and without the ledger
(the calibrated sigma is given), so the rows isolate the learning: mechanism (``episodic``:
``privacy.dp_meta``; ``supervised``: ``privacy.dp_supervised``; ``nonprivate``: ordinary ProtoNet
steps), parameter subset, sampling rate, steps, learning rate and sigma. A sigma near 0 separates
what clipping and sampling cost from what the noise costs.

Run: ``python bench/dp_recipe_sweep.py --public-steps 100 episodic:norm-affine:0.2:10:0.1:2.22:16``
(recipe = mechanism:subset:q:steps-per-round:lr:sigma[:episodes[:caps]]); bench/report.py gives each
DP row the epsilon per site its steps spend.

``--averaging none ema:0.9 tail`` runs every episodic recipe once per way of averaging each site's
local iterates (``privacy.dp_meta.IterateAveraging``: post-processing, no privacy cost), with the
same seeds, so the first (``none``) is the same-run baseline. Each row keeps its per-episode
accuracies; ``gain_vs_start`` and ``gain_vs_baseline`` are paired differences over the evaluation
episodes at the last round (mean and 95% CI half-width: the CI covers the evaluation episodes, not
the training's own randomness, which ``--seeds`` repeats).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import DemoSettings, demo_run_config
from bench.common import Progress, set_threads, write_result
from federation.demo_sites import DEMO_MIXES, split_by_patient
from models.episodes import EpisodeConfig
from models.evaluation import EpisodeLogits, evaluate, mean_ci95
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.model_dir import load_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig, preprocess_arrays
from models.pretraining import PRETRAIN_OBJECTIVES
from models.readers import patient_id_from_provenance
from models.synthetic import (
    DEMO_TRAIN_CLASSES,
    PUBLIC_MODALITIES,
    demo_sets,
    public_set,
    synthetic_arrays,
)
from models.training import TrainConfig, meta_train
from privacy.dp_config import DPConfig, DPPretrainConfig
from privacy.dp_meta import DPMetaTrainer, IterateAveraging
from privacy.dp_supervised import DPPretrainer

State = dict[str, torch.Tensor]


def hospitals(per_class: int, pipeline: PipelineConfig) -> list[ImageSet]:
    """The demo's three hospitals, each with only its own classes."""
    arrays = synthetic_arrays(n_classes=DEMO_TRAIN_CLASSES, per_class=per_class, seed=0)
    sites = []
    for part in split_by_patient(arrays, DEMO_MIXES):
        data = ImageSet(
            images=preprocess_arrays(part["images"], pipeline),
            labels=part["labels"],
            classes=tuple(str(c) for c in part["classes"]),
            patients=np.array([patient_id_from_provenance(str(p)) for p in part["provenance"]]),
            name="site",
        )
        sites.append(data.subset_classes(np.unique(part["labels"])))
    return sites


def local_steps(
    model: torch.nn.Module,
    site: ImageSet,
    recipe: dict[str, Any],
    seed: int,
    averaging: IterateAveraging = IterateAveraging(),
) -> None:
    """One site's local steps of the recipe, in place (``averaging``: episodic recipes only)."""
    q, sigma, lr, steps = recipe["q"], recipe["sigma"], recipe["lr"], recipe["steps"]
    if recipe["mechanism"] == "episodic":
        caps = recipe["caps"]
        dp = DPConfig(noise_multiplier=sigma, sample_rate=q, episodes=recipe["episodes"],
                      max_shots=caps, max_queries=caps)  # fmt: skip
        DPMetaTrainer(
            model, [site], dp=dp, meta=MetaConfig(), lr=lr, seed=seed, averaging=averaging
        ).train(steps)
    elif recipe["mechanism"] == "supervised":
        patients = max(1, int(q * len(np.unique(site.patients))))
        dp_sup = DPPretrainConfig(noise_multiplier=sigma, sample_rate=q, expected_patients=patients)
        DPPretrainer(model, [site], dp=dp_sup, lr=lr, seed=seed).train(steps)
    else:
        episode = EpisodeConfig(ways=3, shots=5, queries=5)
        train = TrainConfig(steps=steps, meta_batch=recipe["episodes"], lr=lr, seed=seed,
                            episode=episode)  # fmt: skip
        meta_train(model, [site], config=train, meta=MetaConfig())


def parse_recipe(text: str) -> dict[str, Any]:
    """``mechanism:subset:q:steps:lr:sigma[:episodes[:caps]]`` (caps: episodic records kept per
    class and role in an episode, ``DPConfig.max_shots`` and ``max_queries``)."""
    mechanism, subset, q, steps, lr, sigma, *rest = text.split(":")
    episodes = int(rest[0]) if rest else 8
    caps = int(rest[1]) if len(rest) > 1 else DPConfig.max_shots
    return {"mechanism": mechanism, "subset": subset, "q": float(q), "steps": int(steps),
            "lr": float(lr), "sigma": float(sigma), "episodes": episodes,
            "caps": caps}  # fmt: skip


def parse_averaging(text: str) -> IterateAveraging:
    """``none``, ``tail``, ``ema`` or ``ema:DECAY``."""
    mode, *decay = text.split(":")
    return IterateAveraging(mode, decay=float(decay[0])) if decay else IterateAveraging(mode)


def paired_gain(after: list[float], before: list[float]) -> dict[str, float]:
    """Mean and 95% CI half-width of per-episode differences (the same episodes in both)."""
    mean, ci = mean_ci95(np.asarray(after) - np.asarray(before))
    return {"mean": mean, "ci95": ci}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", type=parse_recipe)
    p.add_argument("--public-steps", type=int, default=100)
    # the adapter recipe (app/demo_run_secure.toml) at the hospitals' size these results used
    demo = DemoSettings(run=demo_run_config(secure=True), images_per_class=150)
    p.add_argument(  # the Conv-4 demo's public data: another modality (inverted contrast)
        "--public-modality", default="inverted", choices=sorted(PUBLIC_MODALITIES)
    )
    p.add_argument("--per-class", type=int, default=demo.images_per_class)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--out", default="dp_recipe_sweep")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--averaging", nargs="+", type=parse_averaging, default=[IterateAveraging()])
    p.add_argument("--seeds", type=int, default=1, help="training seeds per row")
    p.add_argument("--first-seed", type=int, default=0, help="the first training seed")
    p.add_argument(
        "--initial-model",
        type=Path,
        help="a public start model directory (the demo's operator step) instead of pre-training",
    )
    args = p.parse_args()
    if any(a.mode != "none" for a in args.averaging) and any(
        r["mechanism"] != "episodic" for r in args.recipes
    ):
        p.error("--averaging other than none applies to episodic recipes only")
    set_threads(args.threads)
    log = Progress()
    pipeline = PipelineConfig()
    sites = hospitals(args.per_class, pipeline)
    unseen = demo_sets(config=pipeline)[1]

    def score(model: torch.nn.Module) -> list[float]:
        """Accuracy of each of the same 100 episodes (5-way 5-shot, 10 queries per class)."""
        episode = EpisodeConfig(ways=5, shots=5, queries=10)
        per_episode: list[float] = []

        def keep(e: EpisodeLogits) -> None:
            per_episode.append(float((e.query_logits.argmax(-1) == e.query_labels).mean()))

        result = evaluate(
            model.eval(), unseen, episode=episode, episodes=100, seed=1, on_logits=keep
        )
        if not np.isclose(np.mean(per_episode), result.accuracy):
            raise RuntimeError("per-episode accuracies do not match the evaluation's mean")
        return per_episode

    if args.initial_model is not None:  # written by the demo's operator step (`write_pretrained`)
        loaded = load_model_dir(args.initial_model)
        if loaded.backbone.width != args.width:
            p.error(f"--initial-model has width {loaded.backbone.width}, not --width {args.width}")
        model = loaded.model
    else:
        torch.manual_seed(0)
        model = build_backbone(BackboneConfig(width=args.width))
        public = public_set(config=pipeline, modality=args.public_modality)
        PRETRAIN_OBJECTIVES["protonet"].train(model, [public], steps=args.public_steps, seed=0)
    start: State = {k: v.clone() for k, v in model.state_dict().items()}
    round0 = score(model)
    log(f"public start: {100 * np.mean(round0):.1f}%")
    rows: list[dict[str, Any]] = []
    config = vars(args) | {"averaging": [a.to_dict() for a in args.averaging]}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for recipe in args.recipes:
            baseline: list[float] | None = None
            for averaging in args.averaging:
                by_episode = run_recipe(recipe, averaging, seed, start, round0, args, sites, score)
                accuracies = [float(np.mean(a)) for a in by_episode]
                name = f"{recipe} averaging {averaging.mode}"
                log(f"{name} seed {seed}: " + ", ".join(f"{100 * a:.1f}" for a in accuracies))
                row = {**recipe, "averaging": averaging.to_dict(), "seed": seed,
                       "accuracy_by_round": accuracies,
                       "episode_accuracy_by_round": [[round(x, 4) for x in a] for a in by_episode],
                       "gain_vs_start": paired_gain(by_episode[-1], round0),
                       "gain_vs_baseline": None if baseline is None
                       else paired_gain(by_episode[-1], baseline)}  # fmt: skip
                if averaging.mode == "none":
                    baseline = by_episode[-1]
                rows.append(row)
                write_result(args.out, config=config, results=rows, device=torch.device("cpu"))


def run_recipe(
    recipe: dict[str, Any],
    averaging: IterateAveraging,
    seed: int,
    start: State,
    round0: list[float],
    args: argparse.Namespace,
    sites: list[ImageSet],
    score: Callable[[torch.nn.Module], list[float]],
) -> list[list[float]]:
    """FedAvg rounds of one recipe from the public start; per-episode accuracies by round."""
    subset = BackboneConfig(width=args.width, trainable=recipe["subset"])
    state, by_episode = dict(start), [round0]
    model = build_backbone(BackboneConfig(width=args.width))
    for r in range(args.rounds):
        deltas = []
        for i, site in enumerate(sites):
            local = build_backbone(subset)
            local.load_state_dict(state)
            local_steps(local, site, recipe, seed=1000 * seed + 10 * r + i, averaging=averaging)
            deltas.append({k: v - state[k] for k, v in local.state_dict().items()})
        state = {k: state[k] + sum(d[k] for d in deltas) / len(deltas) for k in state}
        model.load_state_dict(state)
        by_episode.append(score(model))
    return by_episode


if __name__ == "__main__":
    main()
