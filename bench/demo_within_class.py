"""What a DP release of the domain's within-class covariance adds to the demo's public start
(issue 26's demo target: +5 points at epsilon <= 8 per hospital).

The demo's own hospitals, public start (ImageNet EfficientNet-Lite0, frozen, 128 px, multi-scale)
and server evaluation episodes (5-way 5-shot, 10 queries, 200 episodes of the 8 synthetic classes
no hospital has, ridge head on features centred on the episode and normalised per part: the
public start row reproduces the demo's 66.8%). Each hospital's features are embedded once. Rows:

- **public start**: the demo's round 0;
- **operator's public data only**: the within-class metric from the public synthetic classes,
  imaged as another modality (contrast inverted), no hospital data;
- **no noise**: the hospitals' within-class covariance, full width and in the public basis;
- **DP**: the mechanism of ``privacy/within_class_release.py`` run at each hospital (a centre
  release, then two releases of within-class moments, as rounds 1-3 of a federation), summed over
  the three hospitals, one sigma for the three releases as the ledger charges them: the demo's
  (epsilon 7.34 per hospital), epsilon 4 and 1, each a fresh noise draw (five at the demo's, as
  its five fresh runs); and once more through the mechanism's own trainer
  (``WithinClassRelease``) and the server's post-processing, to check the two agree.

Paired differences use the same episodes. ``python bench/demo_within_class.py`` (about 3 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import DemoSettings, public_start, server_config, site_data
from bench.common import Progress, set_threads, write_result
from bench.federated_encoder import public_start_model, site_features
from federation.server_app import public_eval_set
from models.adaptation import FeatureMap, embed, ridge_head
from models.episodes import EpisodeConfig, sample_episode
from models.evaluation import mean_ci95
from models.feature_adapter import WithinClassMetric, public_basis
from models.pipeline import PipelineConfig
from models.synthetic import public_set
from privacy import within_class_release as wc
from privacy.accounting import calibrate_noise_multiplier, worst_epsilon
from privacy.dp_config import (
    WITHIN_CLASS_SENSITIVITY,
    WITHIN_CLASS_SUMS_WEIGHT,
    DPWithinClassConfig,
)

BASIS = WithinClassMetric.BASIS  # public directions the moments are released in (of 1,712)
SHRINK = wc.SHRINK  # towards the mean eigenvalue (0.1 to 0.6 tried: 0.1 best under noise)
SUMS_WEIGHT = WITHIN_CLASS_SUMS_WEIGHT  # class sums' weight: sensitivity sqrt(1.125) C
CLIP = 1.0
MOMENT_RELEASES = 2  # rounds 2 and 3; round 1 releases the centre
DELTA = 1e-5
DEMO_SIGMA = 1.26  # app/demo_run.toml's noise multiplier: epsilon 7.34 over the 3 releases
# epsilon per hospital (None: the demo's sigma) -> fresh noise draws
DRAWS: dict[float | None, int] = {None: 5, 4.0: 3, 1.0: 3}


Metric = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


class Episodes:
    """The server's evaluation episodes over mapped features, scored with a ridge head."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: np.ndarray,
        patients: np.ndarray,
        parts: tuple[int, ...],
        episodes: int,
    ) -> None:
        rng = np.random.default_rng(1)  # federation.server_app.evaluate_state's seed
        config = EpisodeConfig(ways=5, shots=5, queries=10)
        self.prepared = []
        for _ in range(episodes):
            ep = sample_episode(labels, patients, config, rng)
            support, query = features[ep.support].double(), features[ep.query].double()
            fmap = FeatureMap(mean=torch.cat([support, query]).mean(0), normalise=True, parts=parts)
            labels_s = torch.from_numpy(ep.support_labels)
            self.prepared.append((fmap(support), fmap(query), labels_s, ep.query_labels))

    def accuracies(self, metric: Metric | None) -> np.ndarray:
        """Each episode's query accuracy with the features times ``metric`` (a (d, d) matrix or
        an adapter's transform; None: as mapped)."""
        out = []
        for support, query, labels_s, labels_q in self.prepared:
            if isinstance(metric, torch.Tensor):
                support, query = wc.apply_metric(support, metric), wc.apply_metric(query, metric)
            elif metric is not None:
                support, query = metric(support), metric(query)
            head = ridge_head(support, labels_s, ways=5, penalty=1.0)
            predicted = (query @ head["head.weight"].T.double()).argmax(-1).numpy()
            out.append(float((predicted == labels_q).mean()))
        return np.array(out)


def sites_release(
    sites: list[dict[str, Any]],
    *,
    basis: torch.Tensor,
    parts: tuple[int, ...],
    radius: float,
    centre_sigma: float,
    moment_sigma: float,
    releases: int,
    generator: torch.Generator | None,
    min_mass: float = wc.MIN_CLASS_MASS,
    shrink: float = SHRINK,
    sums_weight: float = SUMS_WEIGHT,
) -> torch.Tensor:
    """The federation's metric from every hospital's releases (no noise when ``generator`` is
    None): centre, then moments around it, each summed over the hospitals."""
    dim = basis.shape[1]

    def noise(shape: tuple[int, ...], sigma: float) -> torch.Tensor:
        if generator is None:
            return torch.zeros(shape, dtype=torch.float64)
        return torch.normal(0.0, sigma * CLIP, shape, generator=generator, dtype=torch.float64)

    centre = sum(
        wc.centre_sums(s["x"], s["owners"], radius=radius, clip=CLIP)
        + noise((s["x"].shape[1] + 1,), centre_sigma)
        for s in sites
    )
    centre = wc.centre_from_sums(centre, radius=radius, clip=CLIP)
    second = torch.zeros(dim, dim, dtype=torch.float64)
    sums = torch.zeros(sites[0]["classes"], dim + 1, dtype=torch.float64)
    for s in sites:
        unit = wc.unit_features(s["x"], centre=centre, parts=parts)
        m, c = wc.moment_sums(
            unit,
            s["y"],
            s["owners"],
            basis=basis,
            n_classes=s["classes"],
            clip=CLIP,
            sums_weight=sums_weight,
        )
        for _ in range(releases):
            second += m
            sums += c + noise(tuple(c.shape), moment_sigma)
            if generator is not None:
                second += wc.symmetric_noise(dim, moment_sigma * CLIP, generator)
    covariance = wc.within_class_covariance(
        second, sums, sums_weight=sums_weight, clip=CLIP, min_mass=min_mass
    )
    return wc.whitening(covariance, basis, shrink=shrink)


@dataclass
class DemoFeatures:
    """The demo's hospitals, evaluation episodes and public data, embedded once."""

    sites: list[dict[str, Any]]  # x (features as the model outputs them), y, owners, classes
    raw_sites: list[Any]  # the hospitals' cached encoder features, as ImageSets
    public: list[dict[str, Any]]  # the operator's public data, as one site
    episodes: Episodes
    parts: tuple[int, ...]

    @property
    def radius(self) -> float:
        """Every feature's norm (each part normalised to 1)."""
        return len(self.parts) ** 0.5


def as_site(features: torch.Tensor, data: Any) -> dict[str, Any]:
    """A site's features with its labels (0..K-1), patients and class count."""
    classes, labels = np.unique(np.asarray(data.labels), return_inverse=True)
    return {
        "x": features.double(),
        "y": torch.from_numpy(labels),
        "classes": len(classes),
        "owners": np.asarray(data.patients),
    }


def demo_features(
    root: Path, episodes: int, log: Progress, images_per_class: int | None = None
) -> DemoFeatures:
    """Embed the demo's hospitals (kept under ``root``; ``images_per_class`` of each of their
    classes, default the demo's), evaluation set and public data."""
    demo = DemoSettings()
    if images_per_class:
        demo = dataclasses.replace(demo, images_per_class=images_per_class)
    paths = site_data(root, None, images_per_class=demo.images_per_class)
    config = server_config(root, 3, demo, "synthetic", public_start(root, demo, log))
    nodes = [
        {
            "site-id": n,
            "data": str(p),
            "registry": str(root / n / "registry"),
            "state-dir": str(root / n),
        }
        for n, p in paths.items()
    ]
    started = time.perf_counter()
    sets = site_features(config, nodes)
    model = public_start_model(config)
    side = PipelineConfig(image_size=config.backbone.image_size)
    evaluation = public_eval_set(config)
    public = public_set(config=side, modality="inverted")
    # the model's own features, as the server's evaluation sees them: the adapter at identity
    # normalises each part (the hospitals' cached features are the encoder's: mapped alike)
    eval_x = embed(model, torch.from_numpy(evaluation.images)).flatten(1)
    public_x = embed(model, torch.from_numpy(public.images)).flatten(1)
    with torch.no_grad():
        sites = [as_site(model.adapter(torch.as_tensor(np.asarray(s.images))), s) for s in sets]
    log(f"embedded in {time.perf_counter() - started:.0f} s")
    parts = tuple(model.feature_parts)
    return DemoFeatures(
        sites=sites,
        raw_sites=sets,
        public=[as_site(public_x, public)],
        episodes=Episodes(
            eval_x, np.asarray(evaluation.labels), np.asarray(evaluation.patients), parts, episodes
        ),
        parts=parts,
    )


def sigma_for(epsilon: float) -> float:
    """The noise multiplier of three releases (centre, two moments) spending ``epsilon``."""
    accounted = calibrate_noise_multiplier(
        target_epsilon=epsilon, delta=DELTA, sample_rate=1.0, steps=3
    )
    return accounted * WITHIN_CLASS_SENSITIVITY


def mechanism_metric(
    data: DemoFeatures, basis: torch.Tensor, sigma: float, *, seed: int
) -> WithinClassMetric:
    """Three rounds of the real mechanism: each hospital's ``WithinClassRelease`` on its raw
    features, summed, then the strategy's post-processing (``released_centre``,
    ``released_metric``) into the adapter's buffers."""
    adapter = WithinClassMetric(data.parts)
    adapter.basis.copy_(basis.float())
    classes = tuple(str(c) for c in data.raw_sites[0].classes)
    dp = DPWithinClassConfig(noise_multiplier=sigma, max_grad_norm=CLIP, classes=classes)

    def releases(round_: int) -> list[dict[str, np.ndarray]]:
        return [
            wc.WithinClassRelease(adapter, [s], dp=dp, seed=seed + 10 * round_ + i).train(1)
            for i, s in enumerate(data.raw_sites)
        ]

    total = np.sum([r[wc.CENTRE].astype(np.float64) for r in releases(1)], axis=0)
    centre = wc.released_centre(total, parts=len(data.parts), clip=CLIP)
    adapter.centre.copy_(torch.from_numpy(centre).float())
    adapter.stage.fill_(wc.STAGE_CENTRE)
    moments = [r for round_ in (2, 3) for r in releases(round_)]
    second = np.sum([r[wc.SECOND].astype(np.float64) for r in moments], axis=0)
    sums = np.sum([r[wc.CLASS_SUMS].astype(np.float64) for r in moments], axis=0)
    adapter.inner.copy_(torch.from_numpy(wc.released_metric(second, sums, clip=CLIP)).float())
    adapter.stage.fill_(wc.STAGE_METRIC)
    return adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--root", default="", help="work folder (kept features are reused)")
    parser.add_argument("--images-per-class", type=int, default=DemoSettings.images_per_class)
    args = parser.parse_args()
    set_threads(args.threads)
    log = Progress()
    root = Path(args.root or tempfile.mkdtemp(prefix="fedfew-bench-within-class-"))
    data = demo_features(root, args.episodes, log, args.images_per_class)
    basis = public_basis(data.public[0]["x"], data.parts, BASIS)
    identity = torch.eye(len(basis), dtype=torch.float64)
    base = data.episodes.accuracies(None)
    rows: list[dict[str, Any]] = []

    def add(row: str, metric: Metric | None, **extra: Any) -> None:
        accuracies = data.episodes.accuracies(metric)
        mean, ci = mean_ci95(accuracies)
        diff, diff_ci = mean_ci95(accuracies - base)
        rows.append(
            {"row": row, "accuracy": mean, "ci95": ci, "gain": diff, "gain_ci95": diff_ci, **extra}
        )
        log(
            f"{row}: {100 * mean:.1f} +/- {100 * ci:.1f} (gain {100 * diff:+.1f} +/- "
            f"{100 * diff_ci:.1f}) {extra}"
        )

    add("public start", None)
    free: dict[str, Any] = {
        "parts": data.parts,
        "radius": data.radius,
        "centre_sigma": 0.0,
        "moment_sigma": 0.0,
        "releases": 1,
        "generator": None,
    }
    add(
        "operator's public data only (another modality), full width",
        sites_release(data.public, basis=identity, min_mass=1.0, **free),
    )
    add("hospitals, no noise, full width", sites_release(data.sites, basis=identity, **free))
    add(
        f"hospitals, no noise, public basis of {BASIS}",
        sites_release(data.sites, basis=basis, **free),
    )
    for epsilon, draws in DRAWS.items():
        sigma = DEMO_SIGMA if epsilon is None else sigma_for(epsilon)
        spent = worst_epsilon([(sigma / WITHIN_CLASS_SENSITIVITY, 1.0, 3)], delta=DELTA)[0]
        label = f"DP, epsilon {spent:.2f} per hospital" + (
            " (the demo's)" if epsilon is None else ""
        )
        for draw in range(draws):
            generator = torch.Generator().manual_seed(1000 * draw + int(100 * sigma))
            metric = sites_release(
                data.sites,
                basis=basis,
                parts=data.parts,
                radius=data.radius,
                centre_sigma=sigma / wc.CENTRE_WEIGHT,  # its sums are scaled by CENTRE_WEIGHT
                moment_sigma=sigma,
                releases=MOMENT_RELEASES,
                generator=generator,
            )
            add(label, metric, draw=draw, epsilon=spent, sigma=sigma)
    # the same, through the mechanism's own trainer and the server's post-processing
    adapter = mechanism_metric(data, basis, DEMO_SIGMA, seed=7)
    spent = worst_epsilon([(DEMO_SIGMA / WITHIN_CLASS_SENSITIVITY, 1.0, 3)], delta=DELTA)[0]
    add(
        "DP through WithinClassRelease and the server's post-processing",
        adapter.transform,
        epsilon=spent,
        sigma=DEMO_SIGMA,
    )
    settings = {
        "images_per_class": args.images_per_class,
        "basis": BASIS,
        "shrink": SHRINK,
        "sums_weight": SUMS_WEIGHT,
        "clip": CLIP,
        "moment_releases": MOMENT_RELEASES,
        "delta": DELTA,
        "episodes": args.episodes,
        "patients_per_site": [len(np.unique(s["owners"])) for s in data.sites],
    }
    name = "demo_within_class"
    if args.images_per_class != DemoSettings.images_per_class:
        name += f"_{args.images_per_class}"
    path = write_result(name, config=settings, results=rows, device=torch.device("cpu"))
    plot(rows, path.with_suffix(".png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy of each row with its 95% CI (one point per DP draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["row"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    for r in rows:
        y = labels.index(r["row"]) + 0.08 * r.get("draw", 0)
        ax.errorbar(100 * r["accuracy"], y, xerr=100 * r["ci95"], fmt="o", capsize=3)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.axvline(100 * rows[0]["accuracy"] + 5, ls=":", c="grey", label="public start + 5")
    ax.set_xlabel("5-way 5-shot accuracy on the 8 unseen synthetic classes (%)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
