"""Membership-inference audit table: loss-threshold and LiRA-style attacks on a non-private model
and on DP models at several epsilons (privacy/audit.py).

The setting is chosen to make the non-private model attackable (small synthetic pool, long
training, no augmentation), as an audit must first show; then the same trainer runs with DP at
each epsilon. Runs on the CPU in minutes: ``python bench/mia_audit.py [--shadows 4]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Progress, choose_device, set_threads, write_result
from models.episodes import EpisodeConfig
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import synthetic_imageset
from models.training import TrainConfig, meta_train
from privacy.accounting import calibrate_noise_multiplier
from privacy.audit import audit, subset
from privacy.dp_meta import EPISODIC_SENSITIVITY, DPConfig, DPMetaTrainer

BACKBONE = BackboneConfig(width=8, image_size=16)
DELTA = 1e-5


def trainer(epsilon: float, steps: int, q: float):  # type: ignore[no-untyped-def]
    """Non-private (epsilon = inf) or DP episodic ProtoNet on the member set."""

    def train(members: ImageSet, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = build_backbone(BACKBONE)
        if math.isinf(epsilon):
            config = TrainConfig(
                steps=steps, seed=seed, augment=False, episode=EpisodeConfig(4, 3, 3)
            )
            meta_train(model, [members], config=config)
            return model
        accounted = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=DELTA, sample_rate=q, steps=steps
        )
        dp = DPConfig(
            noise_multiplier=accounted * EPISODIC_SENSITIVITY,
            sample_rate=q,
            episodes=4,
            ways=4,
            max_shots=3,
            max_queries=3,
        )
        DPMetaTrainer(model, [members], dp=dp, meta=MetaConfig(), augment=False, seed=seed).train(
            steps
        )
        return model

    return train


def main(argv: list[str] | None = None) -> None:
    """Run the audit and write bench/results/mia_audit.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shadows", type=int, default=4)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--sample-rate", type=float, default=0.5)
    p.add_argument("--epsilons", nargs="+", type=float, default=[math.inf, 8.0, 4.0, 1.0])
    args = p.parse_args(argv)
    set_threads(1)
    log = Progress()
    data = synthetic_imageset(
        config=PipelineConfig(image_size=16),
        n_classes=4,
        per_class=40,
        seed=5,
        images_per_patient=1,
    )
    rng = np.random.default_rng(0)
    reference = np.zeros(len(data), dtype=bool)
    for c in range(4):
        reference[rng.choice(np.flatnonzero(data.labels == c), 10, replace=False)] = True
    pool, ref = subset(data, ~reference), subset(data, reference)
    rows: list[dict[str, Any]] = []
    for epsilon in args.epsilons:
        train = trainer(epsilon, args.steps, args.sample_rate)
        for result in audit(train, pool, ref, shadows=args.shadows):
            rows.append(
                {
                    "epsilon": "inf (non-private)" if math.isinf(epsilon) else epsilon,
                    **result.to_dict(),
                }
            )
            log(
                f"epsilon {rows[-1]['epsilon']}: {result.attack} AUC {result.auc:.3f}, "
                f"TPR {result.tpr_at_low_fpr:.3f} at FPR {result.low_fpr:.3f}"
            )
        write_result(
            "mia_audit",
            config={
                **vars(args),
                "pool": len(pool),
                "reference": len(ref),
                "backbone": BACKBONE.to_dict(),
                "delta": DELTA,
            },
            results={"rows": rows},
            device=choose_device(),
        )


if __name__ == "__main__":
    main()
