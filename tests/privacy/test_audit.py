"""Membership-inference audit: the attack works on a non-private model, and DP blunts it."""

import math

import numpy as np
import pytest

from privacy.audit import attackable_setting, auc_and_tpr, audit, episodic_trainer


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


def test_nonprivate_model_is_attackable_and_dp_blunts_the_attack():
    pool, reference = attackable_setting()

    (nonprivate,) = audit(episodic_trainer(math.inf, steps=250), pool, reference, shadows=0)
    (private,) = audit(episodic_trainer(1.0, steps=60), pool, reference, shadows=0)

    assert nonprivate.auc >= 0.6, nonprivate
    assert private.auc < nonprivate.auc - 0.1, (private, nonprivate)
