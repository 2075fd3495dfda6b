"""Does the Classify page flag cases unlike the labelled ones? Detection of pure noise, colour
photographs and another modality against false flags on in-distribution cases (issue 14, item 7).

Each episode draws a ``ways``-way ``shots``-shot support set from one condition (the synthetic
demo's unseen classes, and each shared set when ``../shared/data`` is there) and scores, with
:mod:`models.ood` (nearest support case / the support's own spread), ``queries`` cases of each kind:

- ``in-distribution``: other images of the support's classes (a flag here is a false flag);
- ``other class``: images of the same modality from classes not in the support (reported apart:
  a new finding of the same kind of study should not be flagged either);
- ``noise``: uniform colour noise, grey Gaussian noise and salt-and-pepper, a third each;
- ``photograph``: random crops of the colour photographs that ship with matplotlib (only two
  source pictures: a lower bound on variety);
- ``another modality``: images of the other shared sets (needs the shared data).

Base models: Conv-4 at 64 px, ``random`` (untrained, as in the dashboard's tests) and ``synthetic``
(supervised pre-training on the demo's public synthetic classes, as the demo's operator does).
Features are the frozen backbone's (prototype and linear modes; finetune adapts the backbone
first). Scorings: each feature distance alone, the pixel statistics alone (threshold: the 95th
percentile of the pooled in-distribution scores), and each distance together with the pixel
statistics, a case flagged when either exceeds its threshold (both thresholds at the lowest
common quantile that flags at most 5% of the in-distribution cases: the dashboard's rule, whose
thresholds ``models.ood.OODConfig`` takes from the ``synthetic`` model's ``euclidean+pixel`` row).
The pooled thresholds are chosen on the same in-distribution scores they are evaluated on; the
``held_out_condition`` entry repeats the dashboard's rule with each condition's thresholds chosen
on the other conditions only (out of sample).

    python bench/ood.py                        # what was run
    python bench/ood.py --episodes 5 --models random   # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_SETS, Progress, set_threads, shared_data_dir, write_result
from models.adaptation import embed
from models.imageset import ImageSet
from models.networks import BackboneConfig, build_backbone
from models.ood import (
    OOD_DISTANCES,
    STAT_FLOOR,
    OODConfig,
    image_statistics,
    ood_scores,
    reference_of,
)
from models.pipeline import PipelineConfig, preprocess_arrays
from models.pretraining import PretrainConfig, supervised_pretrain
from models.readers import load_npz
from models.synthetic import demo_sets, public_set

FALSE_FLAG_TARGET = 0.05  # at most 1 in 20 ordinary cases flagged
KINDS = ("in-distribution", "other class", "noise", "photograph", "another modality")
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")  # matplotlib's sample data


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Resolved settings, saved with the results."""

    models: tuple[str, ...]
    ways: int
    shots: int
    queries: int
    episodes: int
    per_class: int  # images per class kept of each shared set (embedding time)
    pretrain_steps: int
    seed: int
    threads: int


def noise_images(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uint8 ``(side, side, 3)`` noise images: uniform colour, grey Gaussian and
    salt-and-pepper."""
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out[i] = rng.integers(0, 256, (side, side, 3))
        elif kind == 1:
            grey = np.clip(rng.normal(128, 50, (side, side)), 0, 255)
            out[i] = grey[..., None].astype(np.uint8)
        else:
            grey = np.where(rng.random((side, side)) < 0.5, 0, 255)
            out[i] = grey[..., None].astype(np.uint8)
    return out


def photo_images(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random crops (30-100% of the shorter side, maybe mirrored) of matplotlib's sample
    photographs, resized to ``side``."""
    import matplotlib.cbook

    sources = []
    for name in PHOTOS:
        with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as img:
            sources.append(img.convert("RGB"))
    out = np.empty((n, side, side, 3), dtype=np.uint8)
    for i in range(n):
        img = sources[i % len(sources)]
        short = min(img.size)
        crop = int(short * rng.uniform(0.3, 1.0))
        x, y = rng.integers(0, img.size[0] - crop + 1), rng.integers(0, img.size[1] - crop + 1)
        piece = img.crop((x, y, x + crop, y + crop)).resize((side, side), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(piece)
    return out


def cap(data: ImageSet, per_class: int, rng: np.random.Generator) -> ImageSet:
    """At most ``per_class`` random images of each class."""
    keep = np.sort(
        np.concatenate(
            [
                rng.permutation(np.flatnonzero(data.labels == c))[:per_class]
                for c in range(len(data.classes))
            ]
        )
    )
    return dataclasses.replace(
        data, images=data.images[keep], labels=data.labels[keep], patients=data.patients[keep]
    )


def conditions(config: BenchConfig, log: Progress) -> dict[str, ImageSet]:
    """The synthetic unseen classes and, when present, every shared set."""
    rng = np.random.default_rng(config.seed)
    _, unseen = demo_sets(per_class=40)
    found = {"synthetic": unseen}
    folder = shared_data_dir()
    for name in SHARED_SETS:
        path = folder / f"{name}.npz"
        if path.is_file():
            found[name] = cap(load_npz(path), config.per_class, rng)
    log(f"conditions: {', '.join(f'{k} ({len(v.images)})' for k, v in found.items())}")
    return found


def base_model(name: str, config: BenchConfig, log: Progress) -> torch.nn.Module:
    """A Conv-4: untrained, or pre-trained on the demo's public synthetic classes."""
    torch.manual_seed(config.seed)
    model = build_backbone(BackboneConfig())
    if name == "synthetic":
        supervised_pretrain(
            model,
            [public_set(per_class=40)],
            config=PretrainConfig(steps=config.pretrain_steps, seed=config.seed),
        )
        log(f"pre-trained on the public synthetic classes, {config.pretrain_steps} steps")
    return model.eval()


def episode_scores(
    views: dict[str, dict[str, torch.Tensor]],
    sets: dict[str, ImageSet],
    condition: str,
    config: BenchConfig,
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """Both views' scores of every query kind in ``config.episodes`` episodes of one condition.

    ``views`` holds per source (each condition, ``noise``, ``photograph``) the network
    ``features`` and the raw :func:`models.ood.image_statistics` ``stats`` of every image."""
    data = sets[condition]
    other = [n for n in sets if n not in (condition, "synthetic")]
    rows = []
    for episode in range(config.episodes):
        chosen = rng.permutation(len(data.classes))[: config.ways]
        support, queries = [], []
        for c in chosen:
            idx = rng.permutation(np.flatnonzero(data.labels == c))
            support.extend(idx[: config.shots])
            queries.extend(idx[config.shots :])
        rest = np.flatnonzero(~np.isin(data.labels, chosen))
        picks: dict[str, tuple[str, np.ndarray]] = {
            "in-distribution": (condition, rng.permutation(queries)[: config.queries]),
            "other class": (condition, rng.permutation(rest)[: config.queries]),
        }
        for kind in ("noise", "photograph"):
            picks[kind] = (kind, rng.permutation(len(views[kind]["stats"]))[: config.queries])
        cases: dict[str, dict[str, torch.Tensor]] = {
            kind: {v: views[src][v][idx] for v in ("features", "stats")}
            for kind, (src, idx) in picks.items()
        }
        if other:
            source = [(n, i) for n in other for i in range(len(views[n]["stats"]))]
            drawn = [source[i] for i in rng.permutation(len(source))[: config.queries]]
            cases["another modality"] = {
                v: torch.stack([views[n][v][i] for n, i in drawn]) for v in ("features", "stats")
            }
        mine = {v: views[condition][v][support] for v in ("features", "stats")}
        scale = mine["stats"].std(0, unbiased=False).clamp_min(STAT_FLOOR)
        pixel_ref = reference_of(mine["stats"] / scale)
        refs = {
            d: reference_of(mine["features"], config=OODConfig(distance=d)) for d in OOD_DISTANCES
        }
        for kind, case in cases.items():
            pixel = ood_scores(pixel_ref, case["stats"] / scale).tolist()
            by_distance = {d: ood_scores(r, case["features"]).tolist() for d, r in refs.items()}
            for i, p in enumerate(pixel):
                rows.append(
                    {
                        "condition": condition,
                        "episode": episode,
                        "kind": kind,
                        "pixel": p,
                        **{d: by_distance[d][i] for d in OOD_DISTANCES},
                    }
                )
    return rows


def thresholds(rows: list[dict[str, Any]], view: str) -> tuple[float, float]:
    """The feature (``view``) and pixel thresholds at one quantile of their in-distribution
    scores, the lowest quantile at which at most :data:`FALSE_FLAG_TARGET` of the
    in-distribution cases exceed either."""
    ind = [r for r in rows if r["kind"] == "in-distribution"]
    feat = np.array([r[view] for r in ind])
    pix = np.array([r["pixel"] for r in ind])
    for q in np.linspace(1 - FALSE_FLAG_TARGET, 1.0, 201):
        t_feat, t_pix = float(np.quantile(feat, q)), float(np.quantile(pix, q))
        if np.mean((feat > t_feat) | (pix > t_pix)) <= FALSE_FLAG_TARGET:
            return t_feat, t_pix
    return float(feat.max()), float(pix.max())


def rates(rows: list[dict[str, Any]], flag: Any) -> dict[str, Any]:
    """Share flagged per kind, overall and per condition."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        mine = [flag(r) for r in rows if r["kind"] == kind]
        if mine:
            out[kind] = {"flagged": float(np.mean(mine)), "cases": len(mine)}
    out["per_condition"] = {
        c: {
            kind: float(np.mean(hits))
            for kind in KINDS
            if (hits := [flag(r) for r in rows if r["condition"] == c and r["kind"] == kind])
        }
        for c in dict.fromkeys(r["condition"] for r in rows)
    }
    return out


def held_out(rows: list[dict[str, Any]], distance: str) -> dict[str, Any]:
    """The dashboard's rule with thresholds chosen without the condition it is measured on: for
    each condition, thresholds from the other conditions' in-distribution scores, rates on its
    own cases; then the mean over conditions (an out-of-sample check of the pooled rates)."""
    per: dict[str, dict[str, float]] = {}
    for condition in dict.fromkeys(r["condition"] for r in rows):
        t_feat, t_pix = thresholds([r for r in rows if r["condition"] != condition], distance)
        mine = [r for r in rows if r["condition"] == condition]
        per[condition] = {
            kind: float(np.mean([r[distance] > t_feat or r["pixel"] > t_pix for r in hits]))
            for kind in KINDS
            if (hits := [r for r in mine if r["kind"] == kind])
        }
    mean = {
        kind: float(np.mean([v[kind] for v in per.values() if kind in v]))
        for kind in KINDS
        if any(kind in v for v in per.values())
    }
    return {"mean_over_conditions": mean, "per_condition": per}


def summarise(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """Rates of each scoring: each distance alone, pixels alone, and each distance with pixels
    (the dashboard's rule), every threshold set for at most 5% in-distribution flags."""
    out = []
    ind = [r for r in rows if r["kind"] == "in-distribution"]
    for view in (*OOD_DISTANCES, "pixel"):
        t = float(np.quantile([r[view] for r in ind], 1 - FALSE_FLAG_TARGET))
        out.append(
            {
                "model": model,
                "scoring": view,
                "threshold": t,
                **rates(rows, lambda r, v=view, t=t: r[v] > t),
            }
        )
    for distance in OOD_DISTANCES:
        t_feat, t_pix = thresholds(rows, distance)
        out.append(
            {
                "model": model,
                "scoring": f"{distance}+pixel",
                "threshold": t_feat,
                "pixel_threshold": t_pix,
                **rates(
                    rows,
                    lambda r, d=distance, a=t_feat, b=t_pix: r[d] > a or r["pixel"] > b,
                ),
                "held_out_condition": held_out(rows, distance),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """Measure and write bench/results/ood.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["random", "synthetic"])
    p.add_argument("--ways", type=int, default=3)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="ood")
    args = p.parse_args(argv)
    config = BenchConfig(
        models=tuple(args.models),
        ways=args.ways,
        shots=args.shots,
        queries=args.queries,
        episodes=args.episodes,
        per_class=args.per_class,
        pretrain_steps=args.pretrain_steps,
        seed=args.seed,
        threads=set_threads(args.threads),
    )
    log = Progress()
    sets = conditions(config, log)
    pipeline = PipelineConfig()
    rng = np.random.default_rng(config.seed)
    pool = 3 * config.queries * config.episodes // 10 + 30  # enough distinct images to draw from
    raw = {"noise": noise_images(pool, 128, rng), "photograph": photo_images(pool, 128, rng)}
    extra_images = {k: preprocess_arrays(v, pipeline) for k, v in raw.items()}
    results = []
    images = {k: torch.from_numpy(v.images) for k, v in sets.items()}
    images.update({k: torch.from_numpy(v) for k, v in extra_images.items()})
    stats = {k: image_statistics(v) for k, v in images.items()}
    for model_name in config.models:
        model = base_model(model_name, config, log)
        views = {k: {"features": embed(model, v), "stats": stats[k]} for k, v in images.items()}
        rows = []
        for condition in sets:
            rows.extend(episode_scores(views, sets, condition, config, rng))
        for entry in summarise(rows, model_name):
            results.append(entry)
            log(
                f"{model_name} {entry['scoring']}: threshold {entry['threshold']:.2f}"
                + (f"/{entry['pixel_threshold']:.2f}" if "pixel_threshold" in entry else "")
                + "; flagged "
                + ", ".join(f"{k} {100 * entry[k]['flagged']:.0f}%" for k in KINDS if k in entry)
            )
            if "held_out_condition" in entry:
                mean = entry["held_out_condition"]["mean_over_conditions"]
                log(
                    "  thresholds from the other conditions, mean over conditions: "
                    + ", ".join(f"{k} {100 * v:.0f}%" for k, v in mean.items())
                )
    path = write_result(
        args.name,
        config={
            **dataclasses.asdict(config),
            "false_flag_target": FALSE_FLAG_TARGET,
            "backbone": BackboneConfig().to_dict(),
            "conditions": list(sets),
            "photographs": list(PHOTOS),
        },
        results=results,
        device=torch.device("cpu"),
    )
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
