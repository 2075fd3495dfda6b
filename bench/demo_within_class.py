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
  the three hospitals, at epsilon 7.45 (the demo's spend), 4 and 1 per hospital, each a fresh
  noise draw (five at 7.45, as the demo's five fresh runs).

Paired differences use the same episodes. ``python bench/demo_within_class.py`` (about 3 min).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
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
from models.pipeline import PipelineConfig
from models.synthetic import public_set
from privacy import within_class_release as wc

BASIS = 512  # public directions the moments are released in (of 1,712)
SHRINK = 0.1  # towards the mean eigenvalue (0.1 to 0.6 tried: 0.1 best under noise)
SUMS_WEIGHT = 0.25  # class sums' weight in the moment release: sensitivity sqrt(1.125) C
CLIP = 1.0
MOMENT_RELEASES = 2  # rounds 2 and 3; round 1 releases the centre
DELTA = 1e-5
DRAWS = {7.45: 5, 4.0: 3, 1.0: 3}  # epsilon per hospital -> fresh noise draws


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

    def accuracies(self, metric: torch.Tensor | None) -> np.ndarray:
        """Each episode's query accuracy with the features times ``metric`` (None: as mapped)."""
        out = []
        for support, query, labels_s, labels_q in self.prepared:
            if metric is not None:
                support, query = wc.apply_metric(support, metric), wc.apply_metric(query, metric)
            head = ridge_head(support, labels_s, ways=5, penalty=1.0)
            predicted = (query @ head["head.weight"].T.double()).argmax(-1).numpy()
            out.append(float((predicted == labels_q).mean()))
        return np.array(out)


def public_basis(features: torch.Tensor, parts: tuple[int, ...], size: int) -> torch.Tensor:
    """The top ``size`` principal directions of the public data's unit features."""
    unit = wc.unit_features(features, centre=features.double().mean(0), parts=parts)
    unit = unit - unit.mean(0)
    _, vectors = torch.linalg.eigh(unit.T @ unit / len(unit))
    return vectors[:, -size:]


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
        public=[as_site(public_x, public)],
        episodes=Episodes(
            eval_x, np.asarray(evaluation.labels), np.asarray(evaluation.patients), parts, episodes
        ),
        parts=parts,
    )


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

    def add(row: str, metric: torch.Tensor | None, **extra: Any) -> None:
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
        plan = wc.plan_for_epsilon(
            epsilon, delta=DELTA, moment_releases=MOMENT_RELEASES, sums_weight=SUMS_WEIGHT
        )
        for draw in range(draws):
            generator = torch.Generator().manual_seed(1000 * draw + int(10 * epsilon))
            metric = sites_release(
                data.sites,
                basis=basis,
                parts=data.parts,
                radius=data.radius,
                centre_sigma=plan.centre_sigma,
                moment_sigma=plan.moment_sigma,
                releases=MOMENT_RELEASES,
                generator=generator,
            )
            add(
                f"DP, epsilon {epsilon:g} per hospital",
                metric,
                draw=draw,
                epsilon=plan.epsilon,
                centre_sigma=plan.centre_sigma,
                moment_sigma=plan.moment_sigma,
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
    path = write_result(
        "demo_within_class", config=settings, results=rows, device=torch.device("cpu")
    )
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
