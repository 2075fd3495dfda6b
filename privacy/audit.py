"""Empirical membership-inference audit of trained few-shot models.

Two attacks on a per-record score (logit-scaled confidence of the true class under a prototype
classifier built from a fixed reference set the auditor holds):

- loss threshold (Yeom et al. 2018): members score higher;
- LiRA-style likelihood ratio (Carlini et al. 2022, "Membership Inference Attacks From First
  Principles", online variant): shadow models trained on random halves of the pool give, per record,
  Gaussian fits of its score when in and when out of training; the target's score is ranked by the
  log likelihood ratio.

An audit only means something if the non-private model is shown attackable first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn

from models.episodes import EpisodeConfig
from models.evaluation import embed_all
from models.imageset import ImageSet
from models.meta import MetaConfig, prototype_logits, prototypes
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import synthetic_imageset
from models.training import TrainConfig, meta_train
from privacy.accounting import calibrate_noise_multiplier
from privacy.dp_meta import EPISODIC_SENSITIVITY, DPConfig, DPMetaTrainer

Trainer = Callable[[ImageSet, int], nn.Module]  # (member set, seed) -> trained backbone


@dataclass(frozen=True)
class AttackResult:
    """Success of one attack: ROC AUC and TPR at a low false-positive rate."""

    attack: str
    auc: float
    tpr_at_low_fpr: float
    low_fpr: float  # the FPR actually reachable with this many non-members (<= 1%)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


def record_scores(model: nn.Module, pool: ImageSet, reference: ImageSet) -> np.ndarray:
    """Logit-scaled confidence ``log p / (1 - p)`` of each pool record's own class, under the
    prototype classifier of ``reference`` (same classes, never trained on)."""
    with torch.no_grad():
        ref = embed_all(model, reference.images)
        protos = prototypes(
            ref, torch.from_numpy(reference.labels).to(ref.device), len(reference.classes)
        )
        logp = torch.log_softmax(prototype_logits(embed_all(model, pool.images), protos), dim=-1)
        own = logp[torch.arange(len(pool)), torch.from_numpy(pool.labels).to(ref.device)]
        log_rest = torch.log1p(-own.exp().clamp(max=1 - 1e-7))
        return (own - log_rest).double().cpu().numpy()


def auc_and_tpr(
    scores: np.ndarray, is_member: np.ndarray, *, max_fpr: float = 0.01
) -> tuple[float, float, float]:
    """ROC AUC (Mann-Whitney U) and the TPR at the largest reachable FPR <= ``max_fpr``."""
    members, others = scores[is_member], scores[~is_member]
    u = stats.mannwhitneyu(members, others, alternative="two-sided").statistic
    auc = float(u / (len(members) * len(others)))
    allowed = int(np.floor(max_fpr * len(others)))  # false positives we may accept
    threshold = np.sort(others)[::-1][allowed] if allowed < len(others) else -np.inf
    return auc, float((members > threshold).mean()), allowed / len(others)


def split_members(pool: ImageSet, seed: int) -> np.ndarray:
    """A random half of the pool's patients as members (boolean mask over records)."""
    rng = np.random.default_rng(seed)
    patients = np.unique(pool.patients)
    chosen = rng.choice(patients, size=len(patients) // 2, replace=False)
    return np.isin(pool.patients, chosen)


def subset(pool: ImageSet, mask: np.ndarray) -> ImageSet:
    """The records of ``pool`` selected by ``mask``."""
    return ImageSet(
        pool.images[mask], pool.labels[mask], pool.classes, pool.patients[mask], pool.name
    )


def audit(
    train: Trainer,
    pool: ImageSet,
    reference: ImageSet,
    *,
    shadows: int = 8,
    seed: int = 0,
) -> list[AttackResult]:
    """Train a target on a random half of ``pool`` and attack it with both attacks.

    Args:
        train: trains a model on a member set (the mechanism under audit).
        pool: candidate records (members and non-members).
        reference: held-out images of the same classes, for the score's prototypes.
        shadows: shadow models for the likelihood-ratio attack (each on a random half); 0 runs
            the loss-threshold attack only.
        seed: split and training seeds.
    """
    is_member = split_members(pool, seed)
    target_scores = record_scores(train(subset(pool, is_member), seed), pool, reference)
    results = [AttackResult("loss-threshold", *auc_and_tpr(target_scores, is_member))]
    if shadows == 0:
        return results
    in_scores: list[list[float]] = [[] for _ in range(len(pool))]
    out_scores: list[list[float]] = [[] for _ in range(len(pool))]
    for s in range(shadows):
        mask = split_members(pool, seed + 1000 + s)
        scores = record_scores(train(subset(pool, mask), seed + 1000 + s), pool, reference)
        for i, (m, v) in enumerate(zip(mask, scores, strict=True)):
            (in_scores if m else out_scores)[i].append(float(v))
    ratio = np.array(
        [
            _log_likelihood_ratio(x, i, o)
            for x, i, o in zip(target_scores, in_scores, out_scores, strict=True)
        ]
    )
    results.append(AttackResult("lira", *auc_and_tpr(ratio, is_member)))
    return results


def _log_likelihood_ratio(x: float, ins: list[float], outs: list[float]) -> float:
    """log N(x; in) - log N(x; out), with a shared variance floor when shadows are few."""
    if not ins or not outs:
        return 0.0
    spread = max(float(np.std(ins + outs)), 1e-3)
    mu_in, mu_out = float(np.mean(ins)), float(np.mean(outs))
    sd_in = max(float(np.std(ins)), spread / 4) if len(ins) > 1 else spread
    sd_out = max(float(np.std(outs)), spread / 4) if len(outs) > 1 else spread
    return float(stats.norm.logpdf(x, mu_in, sd_in) - stats.norm.logpdf(x, mu_out, sd_out))


def attackable_setting(seed: int = 5) -> tuple[ImageSet, ImageSet]:
    """The audit's small synthetic setting (4 classes of 16x16 images, one image per patient):
    a pool of 120 candidate records and a 40-image reference set. Small and trained long, so a
    non-private model memorises its members, which an audit must show before it means anything."""
    data = synthetic_imageset(
        config=PipelineConfig(image_size=16),
        n_classes=4,
        per_class=40,
        seed=seed,
        images_per_patient=1,
    )
    rng = np.random.default_rng(0)
    reference = np.zeros(len(data), dtype=bool)
    for c in range(4):
        reference[rng.choice(np.flatnonzero(data.labels == c), 10, replace=False)] = True
    return subset(data, ~reference), subset(data, reference)


AUDIT_BACKBONE = BackboneConfig(width=8, image_size=16)  # matches attackable_setting's images


def episodic_trainer(epsilon: float, *, steps: int, sample_rate: float = 0.5) -> Trainer:
    """ProtoNet on the member set: non-private when ``epsilon`` is infinite, else DP episodic
    meta-training with sigma calibrated (RDP, delta 1e-5) for ``steps`` steps at ``sample_rate``."""

    def train(members: ImageSet, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = build_backbone(AUDIT_BACKBONE)
        if math.isinf(epsilon):
            config = TrainConfig(
                steps=steps, seed=seed, augment=False, episode=EpisodeConfig(4, 3, 3)
            )
            meta_train(model, [members], config=config)
            return model
        accounted = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=1e-5, sample_rate=sample_rate, steps=steps
        )
        dp = DPConfig(
            noise_multiplier=accounted * EPISODIC_SENSITIVITY,
            sample_rate=sample_rate,
            episodes=4,
            ways=4,
            max_shots=3,
            max_queries=3,
        )
        trainer = DPMetaTrainer(
            model, [members], dp=dp, meta=MetaConfig(), augment=False, seed=seed
        )
        trainer.train(steps)
        return model

    return train
