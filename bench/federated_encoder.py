"""Federated DP on the public encoder, real images: an adapter trained on cached features.

One shared modality is split by patient into three hospitals and a held-out quarter (patients no
site holds), as in bench/federated_real.py. The public start is ImageNet EfficientNet-Lite0 from its
wheel, frozen, with a per-feature scale adapter at identity (models/feature_adapter.py). Every
hospital embeds its images once (models/feature_store.py, the nodes' own store); what trains is
the adapter. Rows, each scored on the same 3-way 5-shot episodes of the held-out patients (the
default adaptation: ridge on centred multi-scale features):

- ``public-start``: the frozen encoder alone (what `fedfew train` installs);
- ``federated-nonprivate``: the same rounds, local steps and episodes, no clipping and no noise;
- ``federated-dp-episodic``: the real round loop and ClientApp handler (in process), sigma
  calibrated so every ledger ends at each epsilon;
- ``central-dp``: one adapter trained on the three sites' features pooled, at the largest epsilon;
- ``support-only`` and ``dp-prototypes``: a class known to the federation. Each site releases
  its patients' normalised class sums once (the registered ``dp-prototypes`` mechanism, q = 1,
  sigma calibrated to each epsilon); the default head is then fitted on an episode's support
  plus each class's released prototype (``--prototype-weight`` copies), against the support
  alone on the same episodes;
- ``federated-within-class-nonprivate`` and ``federated-dp-within-class``: the federation's
  within-class metric (mechanism ``dp-within-class``, privacy/within_class_release.py): each
  site releases its domain centre, then twice its within-class moments in a public basis (512
  principal directions of the two other modalities' images, the operator's public data), one
  sigma for the three releases, calibrated to each epsilon; the metric is applied to the
  features after the feature map (same episodes; ``draws`` noise draws at each epsilon);
- ``membership-inference``: the audit of privacy/audit.py (loss threshold and LiRA with
  ``--shadows`` shadow adapters) on an adapter trained ``--mia-steps`` steps on half of the
  sites' patients: without noise (is it attackable at all?), then at epsilon 8 and 1.

Seconds per DP step are recorded for the adapter on cached features and, for comparison, for DP
norm-affine training of the encoder itself on images (one step, ``--encoder-step-episodes``).

Run: ``python bench/federated_encoder.py --modality brain_mri [--epsilons 1 4 8]``. With
``--only ROW ...`` (and ``--mia-epsilons``) only those rows run, and they replace their namesakes
in the existing results file, whose other rows are kept; the config's ``reruns`` says which rows
were rerun, at which commit and why (``--note``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    RESULTS,
    Progress,
    environment,
    require_shared_data,
    set_threads,
    write_result,
)
from bench.cross_domain import SHARED_SETS
from bench.federated_accuracy import DELTA, at_epsilon, federated, sigma_for
from bench.federated_real import score, split_modality
from bench.report_federated_encoder import plot_federated_encoder
from federation.inprocess_grid import set_task_identity
from federation.node_config import NodeConfig
from federation.publishing import model_from_state
from federation.records import State
from federation.server_app import initial_state
from federation.server_config import EvalConfig, ServerConfig
from models.adaptation import AdaptConfig, feature_map, fit_head
from models.episodes import EpisodeConfig, sample_episode
from models.evaluation import mean_ci95
from models.feature_adapter import AdaptedEncoder, normalise_parts, public_basis
from models.feature_store import FeatureStore
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig
from models.pipeline import PipelineConfig
from models.public_start import PUBLIC_ENCODER, save_public_start, start_public_encoder
from models.readers import load_dataset
from privacy.accounting import calibrate_noise_multiplier, worst_epsilon
from privacy.audit import Trainer, audit
from privacy.dp_config import (
    WITHIN_CLASS_SENSITIVITY,
    WITHIN_CLASS_SUMS_WEIGHT,
    DPConfig,
    DPPrototypeConfig,
    DPSettings,
)
from privacy.dp_meta import DPMetaTrainer
from privacy.dp_prototypes import DPPrototypeRelease, vocabulary_labels
from privacy.mechanisms import PROTOTYPES, get_mechanism
from privacy.prototype_release import prototypes_from_sums
from privacy.within_class_release import CENTRE_WEIGHT, SHRINK, apply_metric

OUT = "federated_encoder"
# The non-private rows: the same trainer with no noise and no clipping. Opacus adds noise of std
# sigma * C to each step's summed gradient, so sigma must be tiny against 1 / C: 1e-30 * 1e9 gives
# std 1e-21 (DPConfig needs sigma > 0). The former 1e-9 gave std 1.0, 10x the demo's DP noise.
NO_NOISE = 1e-30
NO_CLIP = 1e9
# dp-within-class: public basis size, per-site releases (1 centre + 2 moments), noise draws
WITHIN_CLASS_BASIS = 512
WITHIN_CLASS_RELEASES = 3
WITHIN_CLASS_DRAWS = 3
# the modalities this bench runs (bench/results/federated_encoder_*.json): each one's public data
# for the within-class basis is the others' images
BENCH_MODALITIES = ("brain_mri", "blood_cells_bccd", "skin_dermoscopy_isic")
# what --only can select (support-only comes with dp-prototypes; seconds: the timing entries)
ROWS = (
    "public-start",
    "federated-nonprivate",
    "federated-dp-episodic",
    "central-dp",
    "dp-prototypes",
    "membership-inference",
    "dp-within-class",
    "seconds",
)


def _epsilon(text: str) -> float | None:
    """An epsilon on the command line; ``none``: without noise."""
    return None if text.lower() == "none" else float(text)


def parser() -> argparse.ArgumentParser:
    """The run's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modality", default="brain_mri", choices=SHARED_SETS)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    p.add_argument("--side", type=int, default=224)
    p.add_argument("--adapter", default="scale")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--step-episodes", type=int, default=48, help="episodes per DP step")
    p.add_argument("--sample-rate", type=float, default=0.3)
    p.add_argument("--clip", type=float, default=0.05, help="C, near the per-episode norm")
    p.add_argument("--lr", type=float, default=0.2, help="Adam on the nodes")
    p.add_argument("--ways", type=int, default=3)
    p.add_argument("--episodes", type=int, default=200, help="evaluation episodes")
    p.add_argument("--encoder-step-episodes", type=int, default=4)
    p.add_argument("--prototype-weight", type=int, default=5, help="copies of a prototype")
    p.add_argument("--mia-steps", type=int, default=200, help="the audited adapter's steps")
    p.add_argument("--shadows", type=int, default=4, help="LiRA shadow adapters")
    p.add_argument("--mia-epsilons", type=_epsilon, nargs="+", default=[None, 8.0, 1.0],
                   help="the audited adapters' epsilons ('none': without noise)")  # fmt: skip
    p.add_argument("--only", nargs="+", choices=ROWS, default=None,
                   help="run these rows only and merge them into the existing results")  # fmt: skip
    p.add_argument("--note", default="", help="why --only rows were rerun (kept in the config)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=OUT, help="results name under bench/results/")
    return p


def backbone(args: argparse.Namespace) -> BackboneConfig:
    """The public encoder at the run's side, with the run's adapter."""
    return dataclasses.replace(PUBLIC_ENCODER, image_size=args.side, adapter=args.adapter)


def base_config(args: argparse.Namespace, root: Path, start: Path, held_out: Path) -> ServerConfig:
    """The federation's run config (the demo's recipe on the public encoder)."""
    return ServerConfig(
        federation="bench-encoder",
        num_rounds=args.rounds,
        steps=args.local_steps,
        local_lr=args.lr,
        min_nodes=3,
        min_replies=3,
        initial_model=str(start),
        seed=0,
        workdir=str(root / "server"),
        dp=DPSettings(
            episodes=args.step_episodes,
            ways=args.ways,
            max_shots=3,
            max_queries=3,
            max_grad_norm=args.clip,
            sample_rate=args.sample_rate,
        ),
        backbone=backbone(args),
        # the round loop's own evaluation; rows are scored by score()
        eval=EvalConfig(data=str(held_out), ways=args.ways, episodes=20),
    )


def public_start_model(config: ServerConfig) -> AdaptedEncoder:
    """Round 0's model: the frozen public encoder with its adapter at identity."""
    model = model_from_state(initial_state(config), config.round_plan(1))
    assert isinstance(model, AdaptedEncoder)
    return model


def site_features(config: ServerConfig, sites: list[dict[str, Any]]) -> list[ImageSet]:
    """Each site's features, from the same store its node uses (embedded once)."""
    model = public_start_model(config)
    pipeline = PipelineConfig(image_size=config.backbone.image_size)
    out = []
    for site in sites:
        node = NodeConfig.from_mapping(
            {**site, "ledger": "unused.db", "budget-epsilon": 1.0, "budget-delta": 1e-5}
        )
        store = FeatureStore(node.features_dir)
        out.append(
            store.features(
                model.encoder, node.data, pipeline, lambda n=node: load_dataset(n.data, pipeline)
            )
        )
    return out


def train_adapter(
    config: ServerConfig,
    features: list[list[ImageSet]],
    *,
    sigma: float,
    clip: float,
    steps_per_round: int,
    rounds: int,
) -> State:
    """FedAvg of local adapter training on each group of feature sets (one group: central)."""
    plan = config.round_plan(1)
    state = initial_state(config)
    for r in range(rounds):
        deltas = []
        for i, sets in enumerate(features):
            model = model_from_state(state, plan)
            assert isinstance(model, AdaptedEncoder)
            dp = dataclasses.replace(plan.dp, noise_multiplier=sigma, max_grad_norm=clip)
            assert isinstance(dp, DPConfig)
            trainer = DPMetaTrainer(
                model.adapter, sets, dp=dp, meta=MetaConfig(), lr=config.local_lr, seed=r * 97 + i
            )
            trainer.train(steps_per_round)
            local = model.state_dict()
            deltas.append({k: local[k].numpy() - state[k] for k in state})
        state = {k: np.asarray(state[k] + np.mean([d[k] for d in deltas], axis=0)) for k in state}
    return state


def held_out_features(config: ServerConfig, held_out: Path, root: Path) -> ImageSet:
    """The held-out patients' features (a store of their own: never a site's)."""
    model = public_start_model(config)
    pipeline = PipelineConfig(image_size=config.backbone.image_size)
    return FeatureStore(root / "held-out-features").features(
        model.encoder, held_out, pipeline, lambda: load_dataset(held_out, pipeline)
    )


def released_prototypes(
    config: ServerConfig, features: list[ImageSet], epsilon: float | None, *, seed: int
) -> np.ndarray:
    """The summed one-shot DP prototype release of every site at ``epsilon`` (``None``: without
    noise, the non-private reference), as prototypes (K, d) in the adapter's normalised feature
    space (rows: the modality's classes)."""
    model = public_start_model(config)
    noise = NO_NOISE
    if epsilon is not None:
        accounted = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=DELTA, sample_rate=1.0, steps=1
        )
        noise = get_mechanism(PROTOTYPES).noise_for(accounted)
    dp = DPPrototypeConfig(noise_multiplier=noise, classes=features[0].classes)
    sums = sum(
        DPPrototypeRelease(model.adapter, [site], dp=dp, seed=seed + i).release()
        for i, site in enumerate(features)
    )
    return prototypes_from_sums(np.asarray(sums), clip=dp.max_grad_norm)


def known_class_accuracy(
    held_out: ImageSet,
    config: ServerConfig,
    prototypes: np.ndarray | None,
    args: argparse.Namespace,
    *,
    metric: torch.Tensor | None = None,
) -> dict[str, Any]:
    """3-way 5-shot accuracy on the held-out features with the default head (ridge on centred
    multi-scale features), the released prototype of each episode class added to its support
    ``--prototype-weight`` times when given (the same episodes for every row); with ``metric``
    (d, d), the mapped features times it (the within-class metric, after the feature map).
    ``episodes``: each episode's accuracy (for paired differences)."""
    model = public_start_model(config)
    with torch.no_grad():
        emb = model.adapter(torch.from_numpy(held_out.images))
    # a release row is a mean of L2-normalised adapter outputs; the adapter's own scale is
    # sqrt(#parts) (each part has unit norm), so this puts the prototypes beside the features
    scale = len(model.feature_parts) ** 0.5
    rng = np.random.default_rng(1)
    episode = EpisodeConfig(ways=args.ways, shots=5, queries=15)
    adapt = AdaptConfig()
    accuracies = []
    for _ in range(args.episodes):
        ep = sample_episode(held_out.labels, held_out.patients, episode, rng)
        raw = emb[np.concatenate([ep.support, ep.query])]
        fmap = feature_map(adapt, domain_mean=None, features=raw, parts=model.feature_parts)
        mapped, labels = fmap(raw), torch.from_numpy(ep.support_labels)
        if metric is not None:
            mapped = apply_metric(mapped, metric)
        support, query = mapped[: len(ep.support)], mapped[len(ep.support) :]
        if prototypes is not None:
            known = fmap(scale * torch.from_numpy(prototypes[ep.classes]).float())
            if metric is not None:
                known = apply_metric(known, metric)
            copies = int(args.prototype_weight)
            support = torch.cat([support, known.repeat(copies, 1)])
            labels = torch.cat([labels, torch.arange(args.ways).repeat(copies)])
        head = fit_head(support, labels, ways=args.ways, config=adapt)
        predicted = (query @ head["head.weight"].T + head["head.bias"]).argmax(1).numpy()
        accuracies.append(float((predicted == ep.query_labels).mean()))
    mean, ci = mean_ci95(np.array(accuracies))
    return {"accuracy": mean, "ci95": ci, "episodes": np.array(accuracies)}


def pooled_sites(sets: list[ImageSet]) -> ImageSet:
    """The sites' feature sets as one (same classes; patient ids are already site-unique)."""
    return ImageSet(
        images=np.concatenate([s.images for s in sets]),
        labels=np.concatenate([s.labels for s in sets]),
        classes=sets[0].classes,
        patients=np.concatenate(
            [np.char.add(f"{i}/", s.patients.astype(str)) for i, s in enumerate(sets)]
        ),
        name="sites",
    )


def cached_sites(sites: list[dict[str, Any]], modality: str, root: Path) -> None:
    """Give each site a state folder whose features store is the bench's cache for ``modality``
    (keyed by the encoder's and the data's digests), so its features are embedded once."""
    cache = RESULTS / "cache" / OUT / modality
    for site in sites:
        site["state-dir"] = str(root / site["site-id"] / "state")
        kept = cache / site["site-id"]
        kept.mkdir(parents=True, exist_ok=True)
        (Path(site["state-dir"])).mkdir(parents=True)
        (Path(site["state-dir"]) / "features").symlink_to(kept)


def public_modalities(modality: str) -> tuple[str, ...]:
    """The operator's public data for the within-class basis: the bench's other modalities."""
    return tuple(m for m in BENCH_MODALITIES if m != modality)


def public_features(config: ServerConfig, modality: str, root: Path) -> torch.Tensor:
    """Encoder features of the public images the within-class basis is taken from: the images
    of the other modalities' three hospital parts (3/4 of each set, their cached features),
    embedded by the same encoder; no data of ``modality``."""
    folder = require_shared_data(public_modalities(modality))
    out = []
    for other in public_modalities(modality):
        sites, _ = split_modality(folder, other, root / "public" / other)
        cached_sites(sites, other, root / "public" / other)
        out += [torch.from_numpy(f.images).flatten(1) for f in site_features(config, sites)]
    return torch.cat(out).double()


def within_class_rows(
    config: ServerConfig,
    features: list[ImageSet],
    held_out: ImageSet,
    public: torch.Tensor,
    args: argparse.Namespace,
    log: Progress,
) -> list[dict[str, Any]]:
    """The federation's within-class metric (mechanism ``dp-within-class``) from the sites'
    releases, without noise and at each epsilon, scored on the held-out episodes with the metric
    after the feature map (:func:`known_class_accuracy`). Each site's features are the
    adapter's (parts normalised) and its vocabulary the modality's classes; the releases are
    those of bench/demo_within_class.py ``sites_release`` (a centre, then two moment releases
    in a public basis of ``WITHIN_CLASS_BASIS`` directions of ``public``), one sigma for the
    three as the mechanism charges them (the centre's sums are scaled by CENTRE_WEIGHT). A DP
    row's accuracy is the per-episode mean over its ``WITHIN_CLASS_DRAWS`` noise draws (each
    draw also kept); gains are paired against the public start, rescored here."""
    from bench.demo_within_class import sites_release  # it imports this module

    model = public_start_model(config)
    parts = tuple(model.feature_parts)
    classes = list(features[0].classes)
    sites = []
    for f in features:
        rows = vocabulary_labels(f, classes)
        keep = rows >= 0
        x = torch.from_numpy(np.asarray(f.images)[keep]).flatten(1).double()
        sites.append({"x": normalise_parts(x, parts), "y": torch.from_numpy(rows[keep]),
                      "owners": np.asarray(f.patients)[keep].astype(str),
                      "classes": len(classes)})  # fmt: skip
    basis = public_basis(normalise_parts(public, parts), parts, WITHIN_CLASS_BASIS)
    start = known_class_accuracy(held_out, config, None, args)
    log(f"public start, rescored: {100 * start['accuracy']:.2f}%")
    source = f"{', '.join(public_modalities(args.modality))} (the sites' parts, {len(public)} "
    source += "images)"
    common = {"public_start_rescored": start["accuracy"], "basis": WITHIN_CLASS_BASIS,
              "public_basis": source, "shrink": SHRINK, "sums_weight": WITHIN_CLASS_SUMS_WEIGHT,
              "clip": 1.0, "releases": WITHIN_CLASS_RELEASES}  # fmt: skip

    def release(sigma: float, generator: torch.Generator | None) -> torch.Tensor:
        return sites_release(sites, basis=basis, parts=parts, radius=len(parts) ** 0.5,
                             centre_sigma=sigma / CENTRE_WEIGHT, moment_sigma=sigma,
                             releases=WITHIN_CLASS_RELEASES - 1, generator=generator,
                             shrink=SHRINK, sums_weight=WITHIN_CLASS_SUMS_WEIGHT)  # fmt: skip

    def scored(episodes: np.ndarray) -> dict[str, float]:
        mean, ci = mean_ci95(episodes)
        gain, gain_ci = mean_ci95(episodes - start["episodes"])
        return {"accuracy": mean, "ci95": ci, "gain": gain, "gain_ci95": gain_ci}

    out = []
    free = known_class_accuracy(held_out, config, None, args, metric=release(0.0, None))
    out.append({"method": "federated-within-class-nonprivate", "epsilon": None,
                **scored(free["episodes"]), **common})  # fmt: skip
    log(f"within-class, no noise: {100 * out[-1]['accuracy']:.1f}%")
    for epsilon in args.epsilons:
        accounted = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=DELTA, sample_rate=1.0, steps=WITHIN_CLASS_RELEASES
        )
        sigma = accounted * WITHIN_CLASS_SENSITIVITY
        spent = worst_epsilon([(accounted, 1.0, WITHIN_CLASS_RELEASES)], delta=DELTA)[0]
        draws = []
        for draw in range(WITHIN_CLASS_DRAWS):
            seed = 1000 * draw + int(10 * epsilon)
            metric = release(sigma, torch.Generator().manual_seed(seed))
            result = known_class_accuracy(held_out, config, None, args, metric=metric)
            draws.append({"seed": seed, **scored(result["episodes"]),
                          "episodes": result["episodes"]})  # fmt: skip
            log(f"within-class eps={epsilon:g} draw {draw}: {100 * draws[-1]['accuracy']:.1f}%")
        mean = np.mean([d.pop("episodes") for d in draws], axis=0)
        out.append({"method": "federated-dp-within-class", "epsilon": epsilon, **scored(mean),
                    "site_epsilon": spent, "accounted_sigma": accounted, "sigma": sigma,
                    "centre_sigma": sigma / CENTRE_WEIGHT, "draws": draws,
                    **common})  # fmt: skip
    return out


def adapter_trainer(config: ServerConfig, epsilon: float | None, steps: int) -> Trainer:
    """Trains the adapter on a member set for the audit: without noise or clipping (``None``),
    or at ``epsilon`` over its ``steps`` (the run's q and C)."""
    plan = config.round_plan(1)

    def train(members: ImageSet, seed: int) -> nn.Module:
        model = public_start_model(config)
        sigma, clip = (
            (NO_NOISE, NO_CLIP)
            if epsilon is None
            else (sigma_for(config, epsilon, steps), config.dp.max_grad_norm)
        )
        dp = dataclasses.replace(plan.dp, noise_multiplier=sigma, max_grad_norm=clip)
        assert isinstance(dp, DPConfig)
        trainer = DPMetaTrainer(
            model.adapter, [members], dp=dp, meta=MetaConfig(), lr=config.local_lr, seed=seed
        )
        trainer.train(steps)
        return model.adapter

    return train


def encoder_step_seconds(args: argparse.Namespace, sites: list[dict[str, Any]]) -> float:
    """Seconds of one DP norm-affine step of the encoder itself on images (the alternative the
    adapter avoids: the encoder's forward and backward per episode)."""
    net = dataclasses.replace(PUBLIC_ENCODER, image_size=args.side, trainable="norm-affine")
    model = start_public_encoder(net).model
    data = load_dataset(sites[0]["data"], PipelineConfig(image_size=args.side))
    dp = DPConfig(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=args.sample_rate,
        episodes=args.encoder_step_episodes,
        ways=args.ways,
        max_shots=3,
        max_queries=3,
    )
    trainer = DPMetaTrainer(model, [data], dp=dp, meta=MetaConfig(), lr=1e-3, seed=0)
    started = time.perf_counter()
    trainer.train(1)
    return (time.perf_counter() - started) * args.step_episodes / args.encoder_step_episodes


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return row["method"], row.get("epsilon"), row.get("attack")


def save(args: argparse.Namespace, rows: list[dict[str, Any]], timing: dict[str, float]) -> None:
    """Write the results; with ``--only``, merged into the existing file (rows replaced in place
    by key, new ones appended, other rows and the original config and environment kept; once,
    at the end of the run)."""
    cpu = torch.device("cpu")
    path = RESULTS / f"{args.out}.json"
    if args.only is None or not path.exists():
        write_result(args.out, config=vars(args), results={"rows": rows, "seconds": timing},
                     device=cpu)  # fmt: skip
        return
    payload = json.loads(path.read_text())
    new = {_key(r): r for r in rows}
    kept = [new.pop(_key(r), r) for r in payload["results"]["rows"]]
    payload["results"]["rows"] = kept + list(new.values())
    payload["results"]["seconds"] = {**payload["results"].get("seconds", {}), **timing}
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True, cwd=RESULTS).stdout.strip()  # fmt: skip
    rerun = {
        "rows": args.only,
        "mia_epsilons": args.mia_epsilons,
        "commit": commit,
        "threads": args.threads,
        "note": args.note,
        "environment": environment(cpu),
    }
    payload["config"].setdefault("reruns", []).append(rerun)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def main() -> None:
    args = parser().parse_args()
    set_threads(args.threads)
    set_task_identity()
    log = Progress()
    folder = require_shared_data((args.modality,))
    root = Path(tempfile.mkdtemp(prefix="fedfew-bench-encoder-"))
    sites, held_out = split_modality(folder, args.modality, root)
    cached_sites(sites, args.modality, root)  # one state folder per site for every row
    start = save_public_start(root / "public-start", backbone=backbone(args))
    base = base_config(args, root, start, held_out)
    rows: list[dict[str, Any]] = []
    timing: dict[str, float] = {}

    def wanted(row: str) -> bool:
        return args.only is None or row in args.only

    def record(method: str, epsilon: float | None, state: State, **extra: Any) -> None:
        rows.append({"method": method, "epsilon": epsilon, **score(state, base, args), **extra})
        if args.only is None:
            save(args, rows, timing)
        log(f"{method} eps={epsilon}: {100 * rows[-1]['accuracy']:.1f}%")

    started = time.perf_counter()
    features = site_features(base, sites)
    embedded = time.perf_counter() - started
    if wanted("seconds"):
        timing["embed-sites"] = embedded
    if wanted("public-start"):
        record("public-start", None, initial_state(base))
    steps = args.rounds * args.local_steps
    if wanted("federated-nonprivate"):
        state = train_adapter(base, [[f] for f in features], sigma=NO_NOISE, clip=NO_CLIP,
                              steps_per_round=args.local_steps, rounds=args.rounds)  # fmt: skip
        record("federated-nonprivate", None, state)
    for epsilon in args.epsilons if wanted("federated-dp-episodic") else ():
        name = f"dp-episodic-eps{epsilon:g}"
        run = at_epsilon(base, epsilon, steps=steps, name=name, root=root)
        started = time.perf_counter()
        result = federated(run, sites, epsilon * 1.0001, root / name)
        seconds = (time.perf_counter() - started) / args.rounds
        record("federated-dp-episodic", epsilon, result["state"], seconds_per_round=seconds,
               site_epsilon=result["site_epsilon"])  # fmt: skip
    if wanted("central-dp"):
        best = max(args.epsilons)
        sigma = sigma_for(base, best, steps * len(sites))
        state = train_adapter(base, [features], sigma=sigma, clip=args.clip,
                              steps_per_round=steps * len(sites), rounds=1)  # fmt: skip
        record("central-dp", best, state)
    if wanted("dp-prototypes") or wanted("membership-inference") or wanted("dp-within-class"):
        held = held_out_features(base, held_out, root)
    if wanted("dp-prototypes"):
        alone = known_class_accuracy(held, base, None, args)
        alone.pop("episodes")
        rows.append({"method": "support-only", "epsilon": None, **alone})
        log(f"support-only: {100 * alone['accuracy']:.1f}%")
        for epsilon in (None, *args.epsilons):  # None: the same release without noise
            protos = released_prototypes(base, features, epsilon, seed=int((epsilon or 0) * 1000))
            scored = known_class_accuracy(held, base, protos, args)
            scored.pop("episodes")
            rows.append({"method": "dp-prototypes", "epsilon": epsilon, **scored})
            log(f"dp-prototypes eps={epsilon}: {100 * scored['accuracy']:.1f}%")
    if wanted("dp-within-class"):
        public = public_features(base, args.modality, root)
        rows += within_class_rows(base, features, held, public, args, log)
    pool = pooled_sites(features)
    for epsilon in args.mia_epsilons if wanted("membership-inference") else ():
        trainer = adapter_trainer(base, epsilon, args.mia_steps)
        for attack in audit(trainer, pool, held, shadows=args.shadows):
            rows.append({"method": "membership-inference", "epsilon": epsilon,
                         **attack.to_dict()})  # fmt: skip
            log(f"membership inference eps={epsilon} {attack.attack}: AUC {attack.auc:.3f}")
    if wanted("seconds"):
        started = time.perf_counter()
        train_adapter(base, [features], sigma=1.0, clip=args.clip, steps_per_round=1, rounds=1)
        timing["adapter-dp-step"] = time.perf_counter() - started
        timing["encoder-norm-affine-dp-step"] = encoder_step_seconds(args, sites)
    save(args, rows, timing)
    log(f"seconds: {timing}; wrote bench/results/{args.out}.json")
    payloads = {
        path.stem.removeprefix(f"{OUT}_"): json.loads(path.read_text())
        for path in sorted(RESULTS.glob(f"{OUT}_*.json"))
    }
    plot_federated_encoder(payloads, RESULTS / f"{OUT}.png")


if __name__ == "__main__":
    main()
