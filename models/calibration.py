"""Honest confidence for a few-shot classifier: probabilities calibrated on the support set itself,
an explicit "uncertain" outcome, and reliability as an interval rather than a point.

* **Leave-one-out logits.** Each support case is scored by a classifier adapted to the other
  cases; these are the only labelled scores a clinician's adapter has that it was not fitted on.
* **Temperature scaling** (Guo et al. 2017, "On calibration of modern neural networks", sec. 4.2):
  one scalar ``T`` divides the logits; it changes no prediction, only how sure it sounds. ``T`` is
  fitted to the leave-one-out logits by minimising their negative log-likelihood over a log grid,
  plus :attr:`CalibrationConfig.prior_cases` pseudo-cases of total ignorance (cross-entropy to the
  uniform distribution). Without that prior, five held-out cases that all came out right would
  drive ``T`` to its lower bound: an adapter that claims certainty from five cases.
* **Uncertain outcome.** A calibrated top probability under
  :attr:`CalibrationConfig.min_confidence` is reported as "uncertain" instead of a label.
* **Reliability interval.** The Wilson score interval (Wilson 1927; Brown, Cai & DasGupta 2001
  recommend it over the normal interval for small n) of the leave-one-out accuracy.
* **Expected calibration error** (Naeini et al. 2015; Guo et al. 2017, eq. 3) with equal-width
  bins of the top probability, for the benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from models.adaptation import (
    ADAPT_MODES,
    AdaptConfig,
    StepHook,
    adapt,
    embed,
    fit_head,
    model_feature_map,
)
from models.meta import MetaConfig

UNCERTAIN = -1  # the outcome index of a case no class is confident enough for


@dataclass(frozen=True)
class CalibrationConfig:
    """How temperatures are fitted and when a prediction is withheld."""

    t_min: float = 0.25  # allows sharpening 4x: linear heads start under-confident
    t_max: float = 100.0  # at 100 the prototype logits are near uniform for any 64 px case
    grid: int = 161  # log-spaced candidates (about 3.5% apart): finer changes no decision
    prior_cases: float = 1.0  # one pseudo-case of ignorance: a small support set cannot claim 1.0
    min_confidence: float = 0.8  # below 8 in 10 calibrated, the page says "uncertain"
    z: float = 1.96  # 95% two-sided Wilson interval
    bins: int = 10  # ECE bins, the customary 10 (Guo et al. 2017)
    # Finetune and MAML adapt once per held-out case (~5 s each for finetune, Conv-4 at 64 px on
    # 2 cores): at most this many folds, every class in turn, keep the wait near half a minute.
    slow_mode_folds: int = 5

    def __post_init__(self) -> None:
        if not 0 < self.t_min < self.t_max:
            raise ValueError(
                f"CalibrationConfig.t_min and t_max must satisfy 0 < t_min < t_max, got "
                f"{self.t_min} and {self.t_max}"
            )
        if self.grid < 2:
            raise ValueError(f"CalibrationConfig.grid must be >= 2, got {self.grid}")
        if self.prior_cases < 0:
            raise ValueError(f"CalibrationConfig.prior_cases must be >= 0, got {self.prior_cases}")
        if not 0 < self.min_confidence <= 1:
            raise ValueError(
                f"CalibrationConfig.min_confidence must be in (0, 1], got {self.min_confidence}"
            )
        if not self.z > 0:
            raise ValueError(f"CalibrationConfig.z must be > 0, got {self.z}")
        if self.bins < 1:
            raise ValueError(f"CalibrationConfig.bins must be >= 1, got {self.bins}")
        if self.slow_mode_folds < 1:
            raise ValueError(
                f"CalibrationConfig.slow_mode_folds must be >= 1, got {self.slow_mode_folds}"
            )

    def folds(self, adapt_config: AdaptConfig) -> int | None:
        """Folds to hold out for ``adapt_config``: all in frozen-backbone modes, else
        :attr:`slow_mode_folds`."""
        return None if adapt_config.frozen_backbone else self.slow_mode_folds

    def to_dict(self) -> dict[str, object]:
        """JSON-able form."""
        return asdict(self)


def held_out_order(labels: np.ndarray) -> list[int]:
    """Support indices taking each class in turn (first case of every class, then the second...),
    so any prefix holds out cases of every class."""
    per_class = [np.flatnonzero(labels == k).tolist() for k in range(int(labels.max()) + 1)]
    rounds = max(len(c) for c in per_class)
    return [c[r] for r in range(rounds) for c in per_class if r < len(c)]


@dataclass(frozen=True)
class HeldOut:
    """Leave-one-out logits: ``logits[j]`` scores support case ``indices[j]`` (true class
    ``labels[j]``) with a classifier adapted to the other cases."""

    indices: tuple[int, ...]
    logits: np.ndarray  # (m, ways)
    labels: np.ndarray  # (m,)

    @property
    def right(self) -> int:
        """Held-out cases whose top class is the true one."""
        return int((self.logits.argmax(-1) == self.labels).sum())


def fold_progress(on_fold: Callable[[int, int], None] | None, folds: int) -> StepHook:
    """The step hook of a leave-one-out fitted all at once (:class:`models.adaptation.HeldOutFit`)
    that reports to ``on_fold`` its folds done, one by one, in proportion to its steps done (a
    batched fit finishes every fold together; called with ``(1, 1)`` it reports the rest). An
    exception ``on_fold`` raises (a Cancel button) stops the fit."""
    done = [0]

    def hook(step: int, steps: int) -> None:
        upto = folds * step // max(steps, 1)
        while done[0] < upto:
            done[0] += 1
            if on_fold is not None:
                on_fold(done[0], folds)

    return hook


def held_out_logits(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    ways: int,
    config: AdaptConfig,
    meta: MetaConfig = MetaConfig(),
    domain_mean: torch.Tensor | None = None,
    embeddings: torch.Tensor | None = None,
    max_folds: int | None = None,
    on_fold: Callable[[int, int], None] | None = None,
) -> HeldOut:
    """Leave-one-out logits of a support set (folds taken class by class, see
    :func:`held_out_order`).

    Args:
        model: the base backbone (never modified).
        support_x: pipeline outputs ``(n, C, S, S)``.
        support_y: labels ``0..ways-1``; every class needs at least 2 cases.
        ways: number of classes.
        config: the adaptation; frozen-backbone modes refit only the head per fold.
        meta: the meta-learner's config (MAML modes).
        domain_mean: the domain's mean feature, for centring.
        embeddings: the support's backbone features, when already computed (frozen modes).
        max_folds: hold out at most this many cases (``None``: every case).
        on_fold: called with (folds done, folds in all) after each fold.

    Raises:
        ValueError: a class with fewer than 2 cases.
    """
    counts = torch.bincount(support_y, minlength=ways)
    if len(counts) > ways or int(counts.min()) < 2:
        raise ValueError(
            f"held_out_logits: leave-one-out needs >= 2 cases in each of the {ways} classes, "
            f"got {counts.tolist()}"
        )
    n = len(support_y)
    order = held_out_order(support_y.cpu().numpy())
    if max_folds is not None:
        order = order[:max_folds]
    if config.frozen_backbone:
        if embeddings is None:
            embeddings = embed(model, support_x, tta=config.tta, batch_limit=config.batch_limit)
        fmap = model_feature_map(config, model, domain_mean=domain_mean, features=embeddings)
        return head_held_out(
            fmap(embeddings), support_y, order, ways=ways, config=config, on_fold=on_fold
        )
    rows = []
    for done, i in enumerate(order, start=1):
        keep = torch.arange(n) != i
        fold = adapt(
            model,
            support_x[keep],
            support_y[keep],
            ways=ways,
            config=config,
            meta=meta,
            domain_mean=domain_mean,
        )
        rows.append(fold.logits(support_x[i : i + 1]).detach().double().cpu().numpy()[0])
        if on_fold is not None:
            on_fold(done, len(order))
    return HeldOut(
        indices=tuple(order),
        logits=np.stack(rows),
        labels=support_y.cpu().numpy()[order].astype(np.int64),
    )


def head_held_out(
    mapped: torch.Tensor,
    labels: torch.Tensor,
    order: Sequence[int],
    *,
    ways: int,
    config: AdaptConfig,
    extra: torch.Tensor | None = None,
    extra_labels: torch.Tensor | None = None,
    on_fold: Callable[[int, int], None] | None = None,
) -> HeldOut:
    """Leave-one-out logits of a head on features: row j scores ``mapped[order[j]]`` with the
    head fitted on every other row of ``mapped`` and every row of ``extra`` (never held out, e.g.
    a federation's prototypes). Every fold at once where the mode has it (ridge and prototypes
    in closed form, linear in one batched fit: ``ADAPT_MODES``), else one fit per fold; folds
    are reported one by one either way.
    """
    extra = mapped[:0] if extra is None else extra
    extra_labels = labels[:0] if extra_labels is None else extra_labels
    closed_form = ADAPT_MODES[config.mode].held_out
    if closed_form is not None:
        progress = fold_progress(on_fold, len(order))
        every = closed_form(
            torch.cat([mapped, extra]),
            torch.cat([labels, extra_labels]),
            ways,
            config,
            rows=order,
            on_step=progress,
        )
        progress(1, 1)
        logits = every.detach().double().cpu().numpy()
    else:
        rows = []
        for done, i in enumerate(order, start=1):
            keep = torch.arange(len(labels)) != i
            head = fit_head(
                torch.cat([mapped[keep], extra]),
                torch.cat([labels[keep], extra_labels]),
                ways=ways,
                config=config,
            )
            fold_logits = mapped[i : i + 1] @ head["head.weight"].T + head["head.bias"]
            rows.append(fold_logits.detach().double().cpu().numpy()[0])
            if on_fold is not None:
                on_fold(done, len(order))
        logits = np.stack(rows)
    return HeldOut(
        indices=tuple(order),
        logits=logits,
        labels=labels.cpu().numpy()[order].astype(np.int64),
    )


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (stable in float64)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, *, config: CalibrationConfig = CalibrationConfig()
) -> float:
    """The temperature that minimises the held-out negative log-likelihood plus
    ``config.prior_cases`` pseudo-cases of ignorance (see the module docstring).

    Args:
        logits: ``(m, ways)`` held-out logits.
        labels: ``(m,)`` their true classes.
        config: the grid and the prior.

    Returns:
        A temperature in ``[config.t_min, config.t_max]``; with no case, the prior alone
        (``t_max``).

    Raises:
        ValueError: logits and labels of different lengths, or non-finite logits.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(
            f"fit_temperature: logits must be (m, ways) with m = len(labels), got "
            f"{logits.shape} and {labels.shape}"
        )
    if not np.isfinite(logits).all():
        raise ValueError("fit_temperature: logits contain NaN or infinity")
    if len(labels) == 0:
        return config.t_max
    candidates = np.geomspace(config.t_min, config.t_max, config.grid)
    rows = np.arange(len(labels))
    best_t, best = config.t_max, math.inf
    for t in candidates:
        log_p = np.log(np.clip(softmax(logits, t), 1e-300, None))
        nll = -log_p[rows, labels].sum()
        ignorance = -log_p.mean(axis=1).mean()  # cross-entropy to uniform, one pseudo-case
        loss = nll + config.prior_cases * ignorance
        if loss < best - 1e-12:
            best_t, best = float(t), loss
    return best_t


def calibrate(
    held: HeldOut, logits: np.ndarray, *, config: CalibrationConfig = CalibrationConfig()
) -> tuple[np.ndarray, float]:
    """Probabilities of ``logits`` under the temperature fitted to ``held``; and the temperature."""
    t = fit_temperature(held.logits, held.labels, config=config)
    return softmax(logits, t), t


def decide(probabilities: np.ndarray, *, min_confidence: float) -> np.ndarray:
    """Index of the top class per row, or :data:`UNCERTAIN` where it is below
    ``min_confidence``."""
    probabilities = np.asarray(probabilities)
    top = probabilities.argmax(axis=-1)
    return np.where(probabilities.max(axis=-1) >= min_confidence, top, UNCERTAIN)


@dataclass(frozen=True)
class Interval:
    """A proportion's confidence interval."""

    low: float
    high: float


def wilson_interval(right: int, cases: int, *, z: float = 1.96) -> Interval:
    """Wilson score interval of ``right`` successes in ``cases`` trials (Wilson 1927).

    Raises:
        ValueError: ``cases`` < 1 or ``right`` outside ``0..cases``.
    """
    if cases < 1 or not 0 <= right <= cases:
        raise ValueError(
            f"wilson_interval: need 0 <= right <= cases, cases >= 1; got {right}/{cases}"
        )
    p = right / cases
    denominator = 1 + z * z / cases
    centre = (p + z * z / (2 * cases)) / denominator
    half = z * math.sqrt(p * (1 - p) / cases + z * z / (4 * cases * cases)) / denominator
    # Exact at the ends: the score interval's bound is 0 (or 1) when nothing (or all) was right.
    low = 0.0 if right == 0 else max(0.0, centre - half)
    high = 1.0 if right == cases else min(1.0, centre + half)
    return Interval(low=low, high=high)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, *, bins: int = 10
) -> float:
    """ECE: the case-weighted mean gap between top-class confidence and accuracy over ``bins``
    equal-width confidence bins (Guo et al. 2017, eq. 3).

    Raises:
        ValueError: no case, or probabilities and labels of different lengths.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if len(probabilities) == 0 or len(probabilities) != len(labels):
        raise ValueError(
            f"expected_calibration_error: need as many labels as rows, at least one; got "
            f"{len(probabilities)} rows and {len(labels)} labels"
        )
    confidence = probabilities.max(axis=-1)
    right = probabilities.argmax(axis=-1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(confidence[mask].mean() - right[mask].mean())
    return float(total / len(labels))


def reliability_sentence(
    right: int, cases: int, *, of: int = 0, z: float = 1.96, enough: float = 0.3
) -> str:
    """The leave-one-out accuracy as an interval in plain words, e.g. "Between 48% and 100% of
    held-out cases were right (5 of 5); too few cases to rely on this estimate."

    Args:
        right: held-out cases predicted right.
        cases: held-out cases checked.
        of: cases in the support set (when fewer were held out, the sentence says so).
        z: the interval's normal quantile.
        enough: an interval wider than this is called too wide to rely on.
    """
    interval = wilson_interval(right, cases, z=z)
    low, high = round(100 * interval.low), round(100 * interval.high)
    partial = f"; {cases} of the {of} cases were held out, to save time" if of > cases else ""
    text = (
        f"Between {low}% and {high}% of new cases like these would be classified right "
        f"({right} of {cases} held-out cases were right, each predicted by a model adapted to "
        f"the others{partial})"
    )
    if interval.high - interval.low > enough:
        return text + "; too few cases to rely on this estimate: add cases to narrow it."
    return text + "."


def summarise_decisions(decisions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Share of uncertain outcomes, and accuracy over all and over the confident ones."""
    d = np.asarray(decisions)
    y = np.asarray(labels)
    confident = d != UNCERTAIN
    return {
        "uncertain_share": float(1 - confident.mean()) if len(d) else math.nan,
        "confident_accuracy": float((d[confident] == y[confident]).mean())
        if confident.any()
        else math.nan,
    }
