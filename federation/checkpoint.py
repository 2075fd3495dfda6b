"""The server's per-round checkpoint: global model, round counter and history in ONE file.

One safetensors file (weights plus JSON metadata) written to a temporary name, fsynced, then
``os.replace``d over the old one: a crash at any point leaves the previous checkpoint or the new
one, never a mix of a new model and an old round counter.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from federation.errors import CheckpointError
from federation.records import contiguous

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    """The state a federation resumes from."""

    federation: str
    round: int  # last completed round (0: initial model)
    state: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed round


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically to ``folder/checkpoint.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", dir=folder)
    os.close(fd)
    try:
        save_file(
            {k: contiguous(v) for k, v in checkpoint.state.items()},
            tmp,
            metadata={
                "federation": checkpoint.federation,
                "round": str(checkpoint.round),
                "history": json.dumps(checkpoint.history),
            },
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_checkpoint(folder: Path, *, federation: str) -> Checkpoint | None:
    """The checkpoint in ``folder``, or None when there is none yet.

    Raises:
        CheckpointError: the file is unreadable or belongs to another federation.
    """
    path = folder / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        found = meta["federation"]
        round_number = int(meta["round"])
        history = json.loads(meta["history"])
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({exc}); move it away to start over"
        ) from exc
    if found != federation:
        raise CheckpointError(
            f"checkpoint {path} belongs to federation {found!r}, not {federation!r}; "
            "use another checkpoint-dir or the same federation name"
        )
    return Checkpoint(federation=found, round=round_number, state=state, history=history)
