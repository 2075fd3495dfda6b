"""Membership-inference audit: the attack works on a non-private model, and DP blunts it."""

import numpy as np
import pytest
import torch

from models.episodes import EpisodeConfig
from models.imageset import ImageSet
from models.meta import MetaConfig
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import synthetic_imageset
from models.training import TrainConfig, meta_train
from privacy.accounting import calibrate_noise_multiplier
from privacy.audit import auc_and_tpr, audit, subset
from privacy.dp_meta import EPISODIC_SENSITIVITY, DPConfig, DPMetaTrainer

TINY = BackboneConfig(width=8, image_size=16)


def test_auc_and_tpr_match_numeric_reference():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1, 1, 2000), rng.normal(0, 1, 2000)])
    is_member = np.arange(4000) < 2000

    auc, tpr, fpr = auc_and_tpr(scores, is_member)

    # Binormal ROC with d' = 1: AUC = Phi(1 / sqrt(2)) = 0.7602
    assert auc == pytest.approx(0.7602, abs=0.02)
    assert fpr == pytest.approx(0.01)
    # TPR at 1% FPR = 1 - Phi(z_0.99 - 1) = 0.0576
    assert tpr == pytest.approx(0.0576, abs=0.025)


@pytest.fixture(scope="module")
def pool_and_reference() -> tuple[ImageSet, ImageSet]:
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
    return subset(data, ~reference), subset(data, reference)


def _nonprivate(members: ImageSet, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone(TINY)
    config = TrainConfig(steps=250, seed=seed, augment=False, episode=EpisodeConfig(4, 3, 3))
    meta_train(model, [members], config=config)
    return model


def _private(epsilon: float, steps: int = 60, q: float = 0.5):
    def train(members: ImageSet, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = build_backbone(TINY)
        accounted = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps
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


def test_nonprivate_model_is_attackable_and_dp_blunts_the_attack(pool_and_reference):
    pool, reference = pool_and_reference

    (nonprivate,) = audit(_nonprivate, pool, reference, shadows=0)
    (private,) = audit(_private(epsilon=1.0), pool, reference, shadows=0)

    assert nonprivate.auc >= 0.6, nonprivate
    assert private.auc < nonprivate.auc - 0.1, (private, nonprivate)
