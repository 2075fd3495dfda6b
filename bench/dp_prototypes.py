"""DP prototype release on real images: three hospitals release their class sums once.

The setup is bench/federated_real.py's (reused, not copied): one shared modality split by patient
into three hospitals and a held-out part, and a public start (Conv-4) pre-trained without privacy
on the other four modalities. Each site runs the registered ``dp-prototypes`` release (the code a
node runs: ``DPPrototypeRelease.noiseless_sums`` plus ``noisy_class_sums``) with sigma calibrated
so the one release spends the per-site epsilon at delta 1e-5 (RDP, as the ledger's default); the
server's sum and prototypes are ``PrototypeRelease`` (post-processing). Transport and ledger are
tested in tests/federation/test_prototype_round.py, not timed here.

Rows, scored on the same K-way episodes (every class of the modality; queries from held-out
patients), nearest prototype by cosine after centring on site 1's own mean feature (its
unlabelled images: local, no privacy cost, as ``fedfew adapt-domain``):

- ``dp-prototypes``: the federation's DP prototypes alone, no labelled image at the clinic;
- ``nonprivate-prototypes``: the same sums without noise;
- ``local-5shot``: site 1's own 5 labelled images per class (its clinicians' support set);
- ``blended``: the local 5-shot direction plus the DP prototype's, each unit-length after
  centring (equal weight: the choice made before the first run);
- ``blended-by-mass``: the pooled mean, shots and the release's noisy patient mass
  ``max(S[c, d] / C, 1)`` as counts (added after the first run showed equal weight below the DP
  prototypes alone at epsilon 4 and 8).

Each episode uses one of ``--draws`` independent noise draws, so the 95% CIs cover the noise
and the episode sampling. Run:
``python bench/dp_prototypes.py [--modality brain_mri] [--epsilons 1 4 8]`` (about 16 min on 2
busy cores, almost all of it the public start's pre-training; the release is seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, Progress, set_threads, write_result
from bench.federated_accuracy import sigma_for
from bench.federated_real import parser as real_parser
from bench.federated_real import setup
from federation.inprocess import set_task_identity
from federation.server_app import initial_state
from federation.versions import model_from_state
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from privacy.dp_config import DPPrototypeConfig
from privacy.dp_prototypes import DPPrototypeRelease, embed_normalised, noisy_class_sums
from privacy.mechanisms import PROTOTYPES
from privacy.prototype_release import MIN_MASS, PrototypeRelease

OUT = "dp_prototypes"
SCORED = ("dp-prototypes", "local-5shot", "blended", "blended-by-mass")
PLOTTED = ("dp-prototypes", "nonprivate-prototypes", "blended", "blended-by-mass", "local-5shot")


def parser() -> argparse.ArgumentParser:
    """federated_real's options (modality, epsilons, width, pre-training) plus this run's."""
    p = real_parser(__doc__.split("\n\n")[0])
    p.set_defaults(modality="brain_mri", out=OUT, episodes=300)
    p.add_argument("--shots", type=int, default=5, help="site 1's labelled images per class")
    p.add_argument("--queries", type=int, default=10, help="held-out queries per class")
    p.add_argument("--draws", type=int, default=20, help="independent noise draws per epsilon")
    p.add_argument("--clip", type=float, default=1.0, help="C (only sigma C / signal matters)")
    p.add_argument("--plot-only", action="store_true", help="redraw the .png from the .json")
    return p


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)


def accuracy(protos: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor):
    """Nearest prototype by cosine after centring both on ``mu``."""
    scores = _unit(queries - mu) @ _unit(protos - mu).T
    return float((scores.argmax(1) == labels).double().mean())


def main() -> None:
    args = parser().parse_args()
    if args.plot_only:
        saved = json.loads((RESULTS / f"{args.out}.json").read_text())
        plot(saved["results"], args.out, tuple(saved["config"]["classes"]))
        return
    set_threads(args.threads)
    set_task_identity()
    log = Progress()
    sites, base = setup(args, log)
    pipeline = PipelineConfig(image_size=base.image_size)
    sets = [load_dataset(s["data"], pipeline) for s in sites]
    held_out = load_dataset(base.eval_data, pipeline)
    classes = tuple(held_out.classes)
    config = dataclasses.replace(
        base, mechanism=PROTOTYPES, prototype_classes=",".join(classes), clip=args.clip,
        sample_rate=1.0,
    )  # fmt: skip
    model = model_from_state(initial_state(config), config.round_plan(1)).eval()
    dp0 = DPPrototypeConfig(noise_multiplier=1.0, max_grad_norm=args.clip, classes=classes)
    noiseless = [DPPrototypeRelease(model, [s], dp=dp0).noiseless_sums() for s in sets]
    log(f"{len(sets)} sites embedded; release shape {tuple(noiseless[0].shape)}")

    local = sets[0]
    local_features = embed_normalised(model, local.images)
    mu = local_features.mean(0)  # site 1's own mean feature (its unlabelled images)
    local_rows = [np.flatnonzero(local.labels == c) for c in range(len(classes))]
    held_features = embed_normalised(model, held_out.images)
    held_rows = [np.flatnonzero(held_out.labels == c) for c in range(len(classes))]
    shots, queries = args.shots, args.queries
    if min(map(len, local_rows)) < shots or min(map(len, held_rows)) < queries:
        raise SystemExit(f"a class has fewer than {shots} site-1 or {queries} held-out images")

    settings: list[tuple[str, float | None, float]] = [("nonprivate", None, 0.0)]
    for epsilon in args.epsilons:
        sigma = sigma_for(config, epsilon, 1)
        settings.append((f"eps{epsilon:g}", epsilon, sigma))
    rows: list[dict[str, Any]] = []
    for label, epsilon, sigma in settings:
        releases = []
        for draw in range(args.draws if sigma > 0 else 1):
            generator = torch.Generator().manual_seed(1000 * draw + 7)
            noisy = [
                noisy_class_sums(s, noise_multiplier=sigma, clip=args.clip, generator=generator)
                if sigma > 0 else s
                for s in noiseless
            ]  # fmt: skip
            release = PrototypeRelease.summed(
                [n.numpy() for n in noisy], classes=classes, clip=args.clip,
                noise_multiplier=sigma, sites=[s["site-id"] for s in sites],
            )  # fmt: skip
            mass = np.maximum(release.sums[:, -1] / args.clip, MIN_MASS)  # noisy patients
            releases.append((torch.from_numpy(release.prototypes()), torch.from_numpy(mass)))
        rng = np.random.default_rng(1)  # the same episodes for every setting
        scores: dict[str, list[float]] = {m: [] for m in SCORED}
        for episode in range(args.episodes):
            support = [rng.choice(r, shots, replace=False) for r in local_rows]
            query = [rng.choice(r, queries, replace=False) for r in held_rows]
            q = held_features[np.concatenate(query)]
            y = torch.arange(len(classes)).repeat_interleave(queries)
            shot_protos = torch.stack([local_features[s].mean(0) for s in support])
            dp_protos, mass = releases[episode % len(releases)]
            blended = mu + _unit(shot_protos - mu) + _unit(dp_protos - mu)
            # pooled mean: the shots and the release's noisy patient mass as counts
            pooled = (shots * shot_protos + mass[:, None] * dp_protos) / (shots + mass[:, None])
            scores["dp-prototypes"].append(accuracy(dp_protos, q, y, mu))
            scores["local-5shot"].append(accuracy(shot_protos, q, y, mu))
            scores["blended"].append(accuracy(blended, q, y, mu))
            scores["blended-by-mass"].append(accuracy(pooled, q, y, mu))
        names = {"dp-prototypes": "dp-prototypes" if sigma > 0 else "nonprivate-prototypes",
                 "blended": "blended", "blended-by-mass": "blended-by-mass",
                 "local-5shot": "local-5shot"}  # fmt: skip
        for method, values in scores.items():
            if not values or (method == "local-5shot" and sigma > 0):
                continue  # the local row does not depend on the release: scored once
            rows.append({
                "method": names[method], "release": label, "epsilon_per_site": epsilon,
                "sigma": sigma, "accuracy": float(np.mean(values)),
                "ci95": 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)),
                "episodes": len(values), "draws": len(releases),
            })  # fmt: skip
            log(f"{label:10s} {rows[-1]['method']:22s} {100 * rows[-1]['accuracy']:.1f} "
                f"+- {100 * rows[-1]['ci95']:.1f}")  # fmt: skip
        resolved = {**vars(args), "classes": list(classes), "server_config": config.to_dict()}
        write_result(args.out, config=resolved, results=rows, device=torch.device("cpu"))
    plot(rows, args.out, classes)
    log(f"wrote bench/results/{args.out}.json and .png")


def plot(rows: list[dict[str, Any]], out: str, classes: tuple[str, ...]) -> None:
    """Accuracy with 95% CIs per release setting and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["release"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, method in enumerate(PLOTTED):
        mine = [r for r in rows if r["method"] == method]
        xs = [labels.index(r["release"]) + 0.15 * (i - 2) for r in mine]
        ys, errors = [100 * r["accuracy"] for r in mine], [100 * r["ci95"] for r in mine]
        ax.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, label=method)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(f"{len(classes)}-way accuracy, held-out patients (%)")
    ax.set_xlabel("release (per-site epsilon, delta 1e-5)")
    ax.axhline(100 / len(classes), color="grey", lw=0.5, ls=":")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    main()
