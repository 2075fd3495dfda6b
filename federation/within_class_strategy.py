"""The strategy of ``dp-within-class``: each round's releases are gated and summed, and the sum
sets the global model's within-class metric (the adapter's buffers; no weight trains).

While the global model has no centre (its adapter's ``stage`` is 0) the sites release centre
sums, and the round sets the centre; every later round the sites release moments around it, and
the round sets the metric from the moments of every such round so far (kept in the server's
work folder, one entry per round, so a resumed round replaces its own entry). Everything here is
post-processing of DP releases (privacy/within_class_release.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from federation.records import State
from federation.release_strategy import ReleaseGate
from federation.server_config import ServerConfig
from federation.strategy import AcceptedReply
from privacy.dp_config import DPWithinClassConfig
from privacy.within_class_release import (
    CENTRE,
    CLASS_SUMS,
    SECOND,
    STAGE_CENTRE,
    STAGE_METRIC,
    STAGE_NONE,
    released_centre,
    released_metric,
)

ADAPTER = "within-class"  # the BackboneConfig.adapter this mechanism releases through
BASIS, CENTRE_KEY, INNER, STAGE = (
    "adapter.basis",
    "adapter.centre",
    "adapter.inner",
    "adapter.stage",
)
MOMENTS_FILE = "within-class-moments.npz"  # per round: the summed moment releases


class WithinClassStrategy(ReleaseGate):
    """Gate each release, sum them, and set the centre or the metric from the sums."""

    def __init__(self, config: ServerConfig, reference: State) -> None:
        """
        Raises:
            ValueError: the run config's backbone has no within-class adapter.
        """
        super().__init__(config, reference)
        if config.backbone.adapter != ADAPTER or BASIS not in reference:
            raise ValueError(
                f"dp-within-class needs backbone.adapter = {ADAPTER!r} (and an initial model "
                "with its public basis)"
            )
        self._stage = int(reference[STAGE])
        self._moments_path = config.root / MOMENTS_FILE
        self._part_count: int | None = None

    def _dp(self) -> DPWithinClassConfig:
        dp = self.round_plan(1).dp
        if not isinstance(dp, DPWithinClassConfig):
            raise TypeError(f"no within-class release for {type(dp).__name__}")
        return dp

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """As every strategy, noting what the sites release this round (the global model's
        stage)."""
        self._stage = int(np.asarray(arrays[STAGE].numpy()))
        return super().configure_train(server_round, arrays, config, grid)

    def release_shapes(self) -> dict[str, tuple[int, ...]]:
        """The arrays a site's release must hold this round."""
        width, basis = self.reference[BASIS].shape
        if self._stage == STAGE_NONE:
            return {CENTRE: (width + 1,)}
        return {SECOND: (basis, basis), CLASS_SUMS: (len(self._dp().classes), basis + 1)}

    def aggregate(self, state: State, accepted: Iterable[AcceptedReply]) -> State:
        """``state`` with the centre (first round) or the metric set from the summed releases;
        unchanged when no class has enough noisy mass yet."""
        releases = [r.gate.delta for r in accepted]
        clip = self._dp().max_grad_norm
        out = dict(state)
        if int(state[STAGE]) == STAGE_NONE:
            total = np.sum([np.asarray(r[CENTRE], dtype=np.float64) for r in releases], axis=0)
            centre = released_centre(total, parts=self._parts(), clip=clip)
            out[CENTRE_KEY] = centre.astype(state[CENTRE_KEY].dtype)
            out[STAGE] = np.asarray(STAGE_CENTRE, dtype=state[STAGE].dtype)
            return out
        second, sums = self._add_moments(
            np.sum([np.asarray(r[SECOND], dtype=np.float64) for r in releases], axis=0),
            np.sum([np.asarray(r[CLASS_SUMS], dtype=np.float64) for r in releases], axis=0),
        )
        try:
            inner = released_metric(second, sums, clip=clip)
        except ValueError:
            return out  # too little mass so far: the metric waits for more rounds
        out[INNER] = inner.astype(state[INNER].dtype)
        out[STAGE] = np.asarray(STAGE_METRIC, dtype=state[STAGE].dtype)
        return out

    def _parts(self) -> int:
        """How many parts the adapter normalises (every feature's norm is their square root)."""
        if self._part_count is None:
            from federation.publishing import model_from_state  # torch: server side only

            model = model_from_state(self.reference, self.round_plan(1))
            self._part_count = len(model.adapter.parts)  # type: ignore[union-attr,arg-type]
        return self._part_count

    def _add_moments(self, second: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keep this round's summed moments (replacing an earlier attempt's) and return the sum
        over every round kept."""
        kept: dict[str, np.ndarray] = {}
        if self._moments_path.is_file():
            with np.load(self._moments_path) as f:
                kept = {k: f[k] for k in f.files}
        kept[f"{SECOND}-{self._round}"] = second
        kept[f"{CLASS_SUMS}-{self._round}"] = sums
        _save_atomic(self._moments_path, kept)
        rounds = [k.removeprefix(f"{SECOND}-") for k in kept if k.startswith(f"{SECOND}-")]
        return (
            np.sum([kept[f"{SECOND}-{r}"] for r in rounds], axis=0),
            np.sum([kept[f"{CLASS_SUMS}-{r}"] for r in rounds], axis=0),
        )


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
