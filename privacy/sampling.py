"""Data-independent randomness of DP episodic meta-training: Poisson sampling of patients, the
public episode plan, and each sampled patient's episode and role.

Every random choice about a patient is a pseudo-random function of (step key, patient id), so it
does not depend on which other patients exist. This is what makes the sensitivity argument of
docs/privacy.md hold draw by draw: adding or removing one patient changes nothing about anyone
else's sampling, episode or role. Production keys come from the OS (``secrets``); fixed keys are
for tests only.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np

from models.imageset import ImageSet


def fresh_key() -> int:
    """A 64-bit key from the OS entropy pool, for one training step."""
    return secrets.randbits(64)


def uniform(key: int, name: str, purpose: str) -> float:
    """A uniform number in [0, 1) that is a pseudo-random function of its arguments (SHA-256)."""
    digest = hashlib.sha256(f"{key}\x00{purpose}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def poisson_sample(patient_ids: np.ndarray, *, sample_rate: float, key: int) -> np.ndarray:
    """Boolean mask: each patient included independently with probability ``sample_rate``
    (the Poisson subsampling that the accountants assume; an empty sample is allowed)."""
    return np.array([uniform(key, str(p), "sample") < sample_rate for p in patient_ids], dtype=bool)


def draw_plan(class_sets: list[np.ndarray], *, episodes: int, ways: int, key: int) -> np.ndarray:
    """The public episode plan: ``episodes`` rows of ``ways`` class ids (``-1`` pads a row when its
    set has fewer classes). Each episode first picks one set (classes of different modalities are
    trivially apart), then classes within it. Depends only on the configured class lists."""
    rng = np.random.default_rng(key)
    plan = np.full((episodes, ways), -1, dtype=np.int64)
    for e in range(episodes):
        pool = class_sets[int(rng.integers(len(class_sets)))]
        chosen = rng.choice(pool, size=min(ways, len(pool)), replace=False)
        plan[e, : len(chosen)] = chosen
    return plan


@dataclass(frozen=True)
class Assignment:
    """Records of one episode: indices into the image set and their episode-local labels."""

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


def assign_patients(
    data: ImageSet,
    plan: np.ndarray,
    *,
    sample_rate: float,
    key: int,
    support_fraction: float,
    max_shots: int,
    max_queries: int,
) -> list[Assignment]:
    """Sample patients, then send each sampled patient, with all its records, to ONE episode among
    those that contain one of its labels, in ONE role (support or query). Records whose label is
    not in that episode are left out. Per class, at most ``max_shots`` support and ``max_queries``
    query records are kept, chosen by a per-record random key (fixed shapes for ``vmap``)."""
    pools: list[dict[tuple[int, str], list[tuple[float, int]]]] = [{} for _ in plan]
    unique, inverse = np.unique(data.patients, return_inverse=True)
    by_patient = np.argsort(inverse, kind="stable")  # each patient's records, in record order
    bounds = np.searchsorted(inverse[by_patient], np.arange(len(unique) + 1))
    episodes_of = {int(c): {e for e, row in enumerate(plan) if c in row} for c in np.unique(plan)}
    for p in np.flatnonzero(poisson_sample(unique, sample_rate=sample_rate, key=key)):
        patient = unique[p]
        records = by_patient[bounds[p] : bounds[p + 1]]
        labels = data.labels[records]
        candidates = sorted(set().union(*(episodes_of.get(int(c), ()) for c in labels)))
        if not candidates:
            continue
        name = str(patient)
        episode = candidates[int(uniform(key, name, "episode") * len(candidates))]
        role = "support" if uniform(key, name, "role") < support_fraction else "query"
        for ordinal, (index, label) in enumerate(zip(records, labels, strict=True)):
            if label in plan[episode]:
                order = uniform(key, f"{name}/{ordinal}", "order")
                pools[episode].setdefault((int(label), role), []).append((order, int(index)))
    out = []
    for row, pool in zip(plan, pools, strict=True):
        parts: dict[str, tuple[list[int], list[int]]] = {"support": ([], []), "query": ([], [])}
        for local, cls in enumerate(row):
            for role, cap in (("support", max_shots), ("query", max_queries)):
                kept = sorted(pool.get((int(cls), role), []))[:cap]
                parts[role][0].extend(i for _, i in kept)
                parts[role][1].extend([local] * len(kept))
        out.append(
            Assignment(
                support=np.array(parts["support"][0], dtype=np.int64),
                support_labels=np.array(parts["support"][1], dtype=np.int64),
                query=np.array(parts["query"][0], dtype=np.int64),
                query_labels=np.array(parts["query"][1], dtype=np.int64),
            )
        )
    return out
