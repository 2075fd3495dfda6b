"""DP episodic meta-training (ProtoNet, MAML, FOMAML) on Opacus's ``DPOptimizer``.

Mechanism (docs/privacy.md, "DP episodic meta-training"): Poisson-sample patients at rate q; draw
a public plan of E episodes; each sampled patient joins one episode in one role; per-episode
gradients g_e (torch.func ``vmap(grad)``), each clipped to C; update
``(sum_e clip(g_e) + N(0, sigma^2 C^2 I)) / E``. One patient changes one episode's clipped
gradient, so the L2 sensitivity of the sum is 2C and the accountant is stepped with sigma / 2.

Optionally ``train`` leaves an average of its iterates in the model instead of the last one
(:class:`IterateAveraging`): an exponential moving average or a uniform average of the last half.
The iterates are already DP outputs, so any function of them is post-processing (Dwork & Roth
2014, Prop. 2.1) and costs no privacy; De et al. 2022 ("Unlocking high-accuracy differentially
private image classification through scale") and TAN (Sander et al., ICML 2023) average DP-SGD
weights to cut the noise the last iterate carries.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.func import grad, vmap

from models.augment import augment_batch
from models.freezing import frozen_parameters, trainable_parameters
from models.imageset import ImageSet
from models.meta import EpisodeBatch, MetaConfig, MetaLearner, Params, split_params
from privacy.dp_config import EPISODIC_SENSITIVITY, DPConfig
from privacy.sampling import Assignment, assign_patients, draw_plan, fresh_key

__all__ = [
    "EPISODIC_SENSITIVITY",
    "DPConfig",
    "DPMetaTrainer",
    "IterateAveraging",
    "augment_seed_of",
    "iterate_weights",
    "merge_sets",
    "pack",
    "per_episode_grads",
]


def merge_sets(sets: Sequence[ImageSet]) -> tuple[ImageSet, list[np.ndarray]]:
    """One image set with globally unique class ids, and the class ids of each source set."""
    offsets = np.cumsum([0] + [len(s.classes) for s in sets])
    merged = ImageSet(
        images=np.concatenate([s.images for s in sets]),
        labels=np.concatenate([s.labels + o for s, o in zip(sets, offsets, strict=False)]),
        classes=tuple(f"{s.name}/{c}" for s in sets for c in s.classes),
        patients=np.concatenate([np.char.add(f"{s.name}/", s.patients.astype(str)) for s in sets]),
        name="+".join(s.name for s in sets),
    )
    return merged, [np.arange(o, o + len(s.classes)) for s, o in zip(sets, offsets, strict=False)]


def pack(
    data: ImageSet, assignments: list[Assignment], config: DPConfig, *, augment_seed: int | None
) -> EpisodeBatch:
    """Stack episodes into fixed shapes ``(E, ways * max_shots, ...)`` with 0/1 masks."""
    shape = data.images.shape[1:]

    def side(index_lists: list[np.ndarray], label_lists: list[np.ndarray], width: int):
        x = np.zeros((len(index_lists), width, *shape), dtype=np.float32)
        y = np.zeros((len(index_lists), width), dtype=np.int64)
        m = np.zeros((len(index_lists), width), dtype=np.float32)
        for e, (idx, lab) in enumerate(zip(index_lists, label_lists, strict=True)):
            x[e, : len(idx)] = data.images[idx]
            y[e, : len(idx)] = lab
            m[e, : len(idx)] = 1.0
        xt = torch.from_numpy(x)
        if augment_seed is not None:
            xt = augment_batch(xt.flatten(0, 1), seed=augment_seed).view_as(xt)
        return xt, torch.from_numpy(y), torch.from_numpy(m)

    sx, sy, sm = side(
        [a.support for a in assignments],
        [a.support_labels for a in assignments],
        config.ways * config.max_shots,
    )
    qx, qy, qm = side(
        [a.query for a in assignments],
        [a.query_labels for a in assignments],
        config.ways * config.max_queries,
    )
    return EpisodeBatch(sx, sy, qx, qy, sm, qm)


def per_episode_grads(
    model: nn.Module,
    learner: MetaLearner,
    params: Params,
    buffers: Params,
    packed: EpisodeBatch,
    ways: int,
    *,
    vectorized: bool | None = None,
) -> Params:
    """Gradient of every episode's loss, ``{name: (E, *shape)}``, with ``torch.func.grad``.

    ``vectorized`` runs ``vmap(grad(...))`` over episodes; a loop of ``grad`` gives the same
    numbers. Default: vmap on CUDA, the loop on CPU, where it measured 5x faster (vmap turns the
    convolutions into grouped ones that oneDNN runs slowly; bench/dp_cost.py).
    """
    tensors = [t for t in packed if t is not None]  # pack() always fills both masks
    if vectorized is None:
        vectorized = tensors[0].is_cuda

    def loss(p: Params, *episode: torch.Tensor) -> torch.Tensor:
        sx, sy, qx, qy, sm, qm = episode
        return learner.episode_loss(model, p, buffers, EpisodeBatch(sx, sy, qx, qy, sm, qm), ways)

    if vectorized:
        return vmap(grad(loss), in_dims=(None, 0, 0, 0, 0, 0, 0))(params, *tensors)
    per_episode = [grad(loss)(params, *(t[e] for t in tensors)) for e in range(len(tensors[0]))]
    return {k: torch.stack([g[k] for g in per_episode]) for k in params}


AVERAGING_MODES = ("none", "ema", "tail")


@dataclass(frozen=True)
class IterateAveraging:
    """Which function of a ``train`` call's iterates ends in the model (post-processing)."""

    mode: str = "none"  # "none": the last iterate; "ema"; "tail": uniform over the last half
    decay: float = 0.9  # "ema": per-step decay; 0.9 spans about one round of 10 local steps

    def __post_init__(self) -> None:
        if self.mode not in AVERAGING_MODES:
            raise ValueError(
                f"IterateAveraging.mode must be one of {AVERAGING_MODES}, got {self.mode!r}"
            )
        if not 0 <= self.decay < 1:
            raise ValueError(f"IterateAveraging.decay must be in [0, 1), got {self.decay!r}")

    def to_dict(self) -> dict[str, object]:
        """JSON-able form, saved with results."""
        return asdict(self)


def iterate_weights(averaging: IterateAveraging, steps: int) -> np.ndarray:
    """The weight of each iterate theta_1..theta_T (after each step; they sum to 1).

    ``ema`` starts at theta_1 (not at the round's start) and then
    ``avg <- decay * avg + (1 - decay) * theta_t``; ``tail`` weighs the last ``ceil(T / 2)``
    iterates equally; ``none`` keeps theta_T.
    """
    if steps < 1:
        return np.zeros(0)
    weights = np.zeros(steps)
    if averaging.mode == "ema":
        d = averaging.decay
        weights[:] = (1 - d) * d ** np.arange(steps - 1, -1, -1, dtype=float)
        weights[0] = d ** (steps - 1)
    elif averaging.mode == "tail":
        kept = math.ceil(steps / 2)
        weights[steps - kept :] = 1.0 / kept
    else:
        weights[-1] = 1.0
    return weights


class DPMetaTrainer:
    """Runs DP episodic meta-training steps on one site's data. Call ``Ledger.charge`` for the
    planned steps BEFORE constructing this; it computes nothing until ``step``."""

    def __init__(
        self,
        model: nn.Module,
        sets: Sequence[ImageSet],
        *,
        dp: DPConfig,
        meta: MetaConfig,
        lr: float = 1e-3,
        augment: bool = True,
        seed: int | None = None,
        base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam,
        averaging: IterateAveraging = IterateAveraging(),
    ) -> None:
        """``seed=None`` (production) draws keys and noise from the OS; a seed is for tests.
        ``base_optimizer`` turns the noisy mean gradient into the update (Adam; plain SGD where
        the update must be linear in the noisy sum, as under distributed noise). ``averaging``
        chooses what ``train`` leaves in the model (default: the last iterate)."""
        self.model = model
        self.averaging = averaging
        self.data, self.class_sets = merge_sets(sets)
        self.dp = dp
        self.learner = MetaLearner(meta)
        # Feature vectors (a frozen encoder's, shaped (d, 1, 1)) are not images: never augmented,
        # and their per-episode gradients vectorise well (no convolutions: vmap, 10x the loop).
        self.features = self.data.images.shape[-1] == 1
        self.augment = augment and not self.features
        self._rng = np.random.default_rng(seed) if seed is not None else None
        noise_gen = torch.Generator(device=next(model.parameters()).device)
        noise_gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        self.optimizer = DPOptimizer(
            base_optimizer(model.parameters(), lr=lr),
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=dp.episodes,
            generator=noise_gen,
        )

    def _key(self) -> int:
        return fresh_key() if self._rng is None else int(self._rng.integers(2**63))

    def draw(self, key: int) -> list[Assignment]:
        """The episodes of one step for a given key (public plan, then patient assignment)."""
        plan = draw_plan(self.class_sets, episodes=self.dp.episodes, ways=self.dp.ways, key=key)
        return assign_patients(
            self.data,
            plan,
            sample_rate=self.dp.sample_rate,
            key=key,
            support_fraction=self.dp.support_fraction,
            max_shots=self.dp.max_shots,
            max_queries=self.dp.max_queries,
        )

    def step(self) -> None:
        """One DP step: sample, per-episode gradients, clip, noise, update."""
        key = self._key()
        device = next(self.model.parameters()).device
        augment_seed = augment_seed_of(key) if self.augment else None
        packed = pack(self.data, self.draw(key), self.dp, augment_seed=augment_seed)
        packed = EpisodeBatch(*(t.to(device) for t in packed if t is not None))
        # Only trainable parameters are differentiated, clipped and noised (models/freezing.py);
        # frozen ones enter the loss as constants beside the buffers.
        trainable = trainable_parameters(self.model)
        params = {k: v.detach() for k, v in trainable.items()}
        _, buffers = split_params(self.model)
        frozen = {k: v.detach() for k, v in frozen_parameters(self.model).items()}
        grads = per_episode_grads(
            self.model,
            self.learner,
            params,
            {**buffers, **frozen},
            packed,
            self.dp.ways,
            vectorized=True if self.features else None,
        )
        for name, p in trainable.items():
            p.grad_sample = grads[name]  # type: ignore[attr-defined]  # Opacus reads it
        self.optimizer.step()
        self.optimizer.zero_grad()

    def train(self, steps: int, *, on_step: Callable[[int], None] | None = None) -> None:
        """Run ``steps`` steps (the number the ledger was charged for), then leave the average
        of this call's iterates that ``averaging`` names in the trainable parameters.

        ``on_step(i)`` sees iterate ``i`` before any average is written. Averaging adds no
        step and no noise: the optimizer (and any accountant hooked to it) steps ``steps`` times.
        """
        self.model.train()
        averaged = self.averaging.mode != "none" and steps > 0
        weights = iterate_weights(self.averaging, steps)
        trainable = trainable_parameters(self.model) if averaged else {}
        average = {k: torch.zeros_like(p) for k, p in trainable.items()}
        for i in range(steps):
            self.step()
            if averaged and weights[i] != 0.0:
                with torch.no_grad():
                    for k, p in trainable.items():
                        average[k].add_(p, alpha=float(weights[i]))
            if on_step is not None:
                on_step(i)
        with torch.no_grad():
            for k, p in trainable.items():
                p.copy_(average[k])


def augment_seed_of(key: int) -> int:
    """A 31-bit augmentation seed derived from a step key (augmentation is data-independent)."""
    return key % (2**31 - 1)
