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
and the episode sampling.

``--ways N`` (N > 0) scores bench/federated_real.py's task instead: the release still covers every
class of the modality (the vocabulary), but each episode draws N of them and scores those N rows.
The episodes are federated_real's own (``sample_episode`` on the held-out part with seed 1, as
``evaluate`` in its ``score``; they depend on the split and the seed only): with ``--shots 5
--queries 15 --episodes 200`` they are literally the same episodes, which the run checks by
scoring its own replica of the ``public-start`` row against ``score``. The public start is the
same only with federated_real's ``--pretrain-steps``, ``--width`` and ``--threads`` (its runs:
150 steps, 1 thread; pre-training on 2 threads gave skin 51.0% instead of 50.7%). In that mode
the 5 shots of ``blended``, ``blended-by-mass`` and ``episode-5shot`` (those shots alone, centred
as here) are the episode's support (held-out patients, as the public start's), ``local-5shot``
draws site 1's own 5 images of the episode's classes, and ``public-start`` is federated_real's
row recomputed (its centring: the episode's own features). The same modality's federated_real
rows at the same ways and pre-training steps are copied into the JSON (``federated_real``) with
their file names.

Run: ``python bench/dp_prototypes.py [--modality brain_mri] [--epsilons 1 4 8] [--ways 3]``
(about 16 min on 2 busy cores at 400 pre-training steps, 2-6 min at 150, almost all of it the
public start's pre-training; the release is seconds). ``--public-start DIR`` reuses an earlier
run's start for the same modality (its JSON's ``server_config.initial-model``, while that
temporary folder lasts), checked against this run's options: about 2 min.
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
from bench.cross_domain import SHARED_SETS
from bench.federated_accuracy import sigma_for
from bench.federated_real import parser as real_parser
from bench.federated_real import score, setup
from federation.inprocess_grid import set_task_identity
from federation.publishing import model_from_state
from federation.server_app import initial_state
from models.episodes import EpisodeConfig, sample_episode
from models.evaluation import embed_all
from models.pipeline import PipelineConfig
from models.readers import load_dataset
from privacy.dp_config import DPPrototypeConfig
from privacy.dp_prototypes import DPPrototypeRelease, embed_normalised, noisy_class_sums
from privacy.mechanisms import PROTOTYPES
from privacy.prototype_release import MIN_MASS, PrototypeRelease

OUT = "dp_prototypes"
SCORED = ("dp-prototypes", "local-5shot", "blended", "blended-by-mass")
ONCE = ("local-5shot", "episode-5shot")  # rows that do not depend on the release
PLOTTED = (
    "dp-prototypes", "nonprivate-prototypes", "blended", "blended-by-mass", "local-5shot",
    "episode-5shot", "public-start",
)  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """federated_real's options (modality, epsilons, width, pre-training) plus this run's."""
    p = real_parser(__doc__.split("\n\n")[0])
    p.set_defaults(modality="brain_mri", out=OUT, episodes=300, ways=0)
    # --ways (federated_real's option): 0 scores every class with site 1's shots (the brain_mri
    # file); N > 0 scores federated_real's N-way episodes of the held-out patients
    p.add_argument(
        "--shots",
        type=int,
        default=5,
        help="labelled images per class (site 1; --ways: and the episode)",
    )
    p.add_argument("--queries", type=int, default=10, help="held-out queries per class")
    p.add_argument("--draws", type=int, default=20, help="independent noise draws per epsilon")
    p.add_argument("--clip", type=float, default=1.0, help="C (only sigma C / signal matters)")
    p.add_argument("--plot-only", action="store_true", help="redraw the .png from the .json")
    p.add_argument(
        "--public-start",
        type=Path,
        default=None,
        help="reuse an earlier run's public start (its server_config initial-model) for the same "
        "modality; checked: supervised, seed 0, --pretrain-steps, --width, the other modalities",
    )
    return p


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)


def accuracy(protos: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, mu: torch.Tensor):
    """Nearest prototype by cosine after centring both on ``mu``."""
    scores = _unit(queries - mu) @ _unit(protos - mu).T
    return float((scores.argmax(1) == labels).double().mean())


@dataclasses.dataclass(frozen=True)
class Drawn:
    """One scored episode: the vocabulary rows scored, the 5 shots blended with the release,
    site 1's own shots of those classes, and the held-out queries."""

    chosen: np.ndarray  # vocabulary class ids, position = episode label
    support: torch.Tensor  # (ways, d) mean of the blended shots per class
    local: torch.Tensor  # (ways, d) mean of site 1's own shots per class
    query: np.ndarray  # indices into the held-out part
    labels: torch.Tensor


def draw_all(args, local_rows, held_out, local_features, held_features) -> list[Drawn]:
    """The scored episodes, the same for every release setting."""
    shots, drawn = args.shots, []
    if not args.ways:  # every class; site 1's shots, random held-out queries
        rng = np.random.default_rng(1)
        held_rows = [np.flatnonzero(held_out.labels == c) for c in range(len(local_rows))]
        if min(map(len, held_rows)) < args.queries:
            raise SystemExit(f"a class has fewer than {args.queries} held-out images")
        for _ in range(args.episodes):
            support = [rng.choice(r, shots, replace=False) for r in local_rows]
            query = [rng.choice(r, args.queries, replace=False) for r in held_rows]
            local = torch.stack([local_features[s].mean(0) for s in support])
            n = len(local_rows)
            drawn.append(Drawn(np.arange(n), local, local, np.concatenate(query),
                               torch.arange(n).repeat_interleave(args.queries)))  # fmt: skip
        return drawn
    rng = np.random.default_rng(1)  # federated_real's score(): evaluate(..., seed=1)
    site_rng = np.random.default_rng(2)  # site 1's shots, apart from the episodes' stream
    shape = EpisodeConfig(ways=args.ways, shots=shots, queries=args.queries)
    for _ in range(args.episodes):
        ep = sample_episode(held_out.labels, held_out.patients, shape, rng)
        support = held_features[ep.support].view(args.ways, shots, -1).mean(1)
        own = [site_rng.choice(local_rows[c], shots, replace=False) for c in ep.classes]
        local = torch.stack([local_features[s].mean(0) for s in own])
        drawn.append(Drawn(ep.classes, support, local, ep.query,
                           torch.from_numpy(ep.query_labels)))  # fmt: skip
    return drawn


def replica(model, held_out, args) -> float:
    """federated_real's public-start accuracy recomputed on this run's episodes (centred on each
    episode's own raw features, then normalised; squared-distance prototypes)."""
    raw = embed_all(model, held_out.images).double()
    rng = np.random.default_rng(1)
    shape = EpisodeConfig(ways=args.ways, shots=args.shots, queries=args.queries)
    values = []
    for _ in range(args.episodes):
        ep = sample_episode(held_out.labels, held_out.patients, shape, rng)
        feats = raw[np.concatenate([ep.support, ep.query])]
        mapped = _unit(feats - feats.mean(0))
        n = len(ep.support)
        protos = mapped[:n].view(args.ways, args.shots, -1).mean(1)
        logits = 2 * mapped[n:] @ protos.T - (protos**2).sum(-1)
        hits = logits.argmax(1) == torch.from_numpy(ep.query_labels)
        values.append(float(hits.double().mean()))
    return float(np.mean(values))


def federated_real_rows(modality: str, ways: int, pretrain_steps: int) -> list[dict[str, Any]]:
    """The same modality's federated_real rows at the same ways and pre-training."""
    out = []
    for path in sorted(RESULTS.glob("federated_real*.json")):
        saved = json.loads(path.read_text())
        c = saved["config"]
        if (c["modality"], c["ways"], c["pretrain_steps"]) == (modality, ways, pretrain_steps):
            out += [{**r, "source": path.name, "episodes": c["episodes"],
                     "rounds": c["rounds"], "local_steps": c["local_steps"]}
                    for r in saved["results"]]  # fmt: skip
    return out


def checked_start(path: Path, args: argparse.Namespace) -> Path:
    """``path`` if it is the public start setup() would pre-train for this run, else exit."""
    saved = json.loads((path / "config.json").read_text())
    want = {
        "data": sorted(m for m in SHARED_SETS if m != args.modality),
        "pretrain": {"objective": "supervised", "seed": 0, "steps": args.pretrain_steps},
        "width": args.width,
        "private": False,
    }
    found = {
        "data": sorted(saved.get("data", [])),
        "pretrain": saved.get("pretrain"),
        "width": saved.get("backbone", {}).get("width"),
        "private": saved.get("private"),
    }
    if found != want:
        raise SystemExit(f"--public-start {path}: {found}, this run needs {want}")
    return path


def main() -> None:
    args = parser().parse_args()
    if args.plot_only:
        saved = json.loads((RESULTS / f"{args.out}.json").read_text())
        plot(saved["results"], args.out, saved["config"])
        return
    set_threads(args.threads)
    set_task_identity()
    log = Progress()
    # federated_real's setup (the site split, held-out part and public start); its eval_ways
    # is the round loop's own evaluation, unused here
    start = None if args.public_start is None else checked_start(args.public_start, args)
    sites, base = setup(
        argparse.Namespace(**{**vars(args), "ways": args.ways or 3}), log, start=start
    )
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
    if min(map(len, local_rows)) < args.shots:
        raise SystemExit(f"a class has fewer than {args.shots} site-1 images")
    drawn = draw_all(args, local_rows, held_out, local_features, held_features)
    resolved = {**vars(args), "classes": list(classes), "server_config": config.to_dict()}
    rows: list[dict[str, Any]] = []
    if args.ways:
        start = score(initial_state(config), config, args)
        mine = replica(model, held_out, args)
        same = (args.shots, args.queries) == (5, 15) and abs(mine - start["accuracy"]) < 1e-6
        resolved["episodes_as_federated_real"] = same
        resolved["federated_real"] = federated_real_rows(args.modality, args.ways,
                                                         args.pretrain_steps)  # fmt: skip
        rows.append({"method": "public-start", "release": "nonprivate", "epsilon_per_site": None,
                     "sigma": 0.0, **start, "replica": mine, "episodes": args.episodes,
                     "draws": 1})  # fmt: skip
        log(f"public-start {100 * start['accuracy']:.1f} (replica {100 * mine:.1f}): "
            f"episodes {'literally' if same else 'NOT'} federated_real's")  # fmt: skip

    settings: list[tuple[str, float | None, float]] = [("nonprivate", None, 0.0)]
    for epsilon in args.epsilons:
        sigma = sigma_for(config, epsilon, 1)
        settings.append((f"eps{epsilon:g}", epsilon, sigma))
    scored = (*SCORED, "episode-5shot") if args.ways else SCORED
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
        scores: dict[str, list[float]] = {m: [] for m in scored}
        for episode, d in enumerate(drawn):
            q, y = held_features[d.query], d.labels
            dp_all, mass_all = releases[episode % len(releases)]
            dp_protos, mass = dp_all[d.chosen], mass_all[d.chosen]  # the episode's N rows
            blended = mu + _unit(d.support - mu) + _unit(dp_protos - mu)
            # pooled mean: the shots and the release's noisy patient mass as counts
            shots = args.shots
            pooled = (shots * d.support + mass[:, None] * dp_protos) / (shots + mass[:, None])
            scores["dp-prototypes"].append(accuracy(dp_protos, q, y, mu))
            scores["local-5shot"].append(accuracy(d.local, q, y, mu))
            scores["blended"].append(accuracy(blended, q, y, mu))
            scores["blended-by-mass"].append(accuracy(pooled, q, y, mu))
            if args.ways:
                scores["episode-5shot"].append(accuracy(d.support, q, y, mu))
        names = {m: m for m in scored}
        names["dp-prototypes"] = "dp-prototypes" if sigma > 0 else "nonprivate-prototypes"
        for method, values in scores.items():
            if not values or (method in ONCE and sigma > 0):
                continue  # the shots-alone rows do not depend on the release: scored once
            rows.append({
                "method": names[method], "release": label, "epsilon_per_site": epsilon,
                "sigma": sigma, "accuracy": float(np.mean(values)),
                "ci95": 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)),
                "episodes": len(values), "draws": len(releases),
            })  # fmt: skip
            log(f"{label:10s} {rows[-1]['method']:22s} {100 * rows[-1]['accuracy']:.1f} "
                f"+- {100 * rows[-1]['ci95']:.1f}")  # fmt: skip
        write_result(args.out, config=resolved, results=rows, device=torch.device("cpu"))
    plot(rows, args.out, resolved)
    log(f"wrote bench/results/{args.out}.json and .png")


def plot(rows: list[dict[str, Any]], out: str, config: dict[str, Any]) -> None:
    """Accuracy with 95% CIs per release setting and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["release"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    scored_ways = any(r["method"] == "public-start" for r in rows)  # a --ways N run
    ways = config["ways"] if scored_ways else len(config["classes"])
    present = [m for m in PLOTTED if any(r["method"] == m for r in rows)]
    for i, method in enumerate(present):
        mine = [r for r in rows if r["method"] == method]
        xs = [labels.index(r["release"]) + 0.1 * (i - (len(present) - 1) / 2) for r in mine]
        ys, errors = [100 * r["accuracy"] for r in mine], [100 * r["ci95"] for r in mine]
        ax.errorbar(xs, ys, yerr=errors, fmt="o", capsize=3, label=method)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel(f"{ways}-way accuracy, held-out patients (%)")
    ax.set_title(config["modality"], fontsize=9)
    ax.set_xlabel("release (per-site epsilon, delta 1e-5)")
    ax.axhline(100 / ways, color="grey", lw=0.5, ls=":")
    best: dict[str, float] = {}  # federated_real's rows on this task, when there are any
    for r in config.get("federated_real", []):
        if r["method"] in ("public-start", "federated-nonprivate"):
            best[r["method"]] = max(best.get(r["method"], 0.0), r["accuracy"])
    for method, style in (("public-start", "--"), ("federated-nonprivate", "-.")):
        if method in best:
            name = f"federated_real {method}" + (" (best)" if "non" in method else "")
            ax.axhline(100 * best[method], color="black", lw=0.8, ls=style, label=name)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=120)


if __name__ == "__main__":
    main()
