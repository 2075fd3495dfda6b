"""Helpers shared by the benchmarks: device, shared-data location, result files, progress lines."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATA_ENV = "FEDFEW_SHARED_DATA"  # overrides the default ../shared/data beside the checkout
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_SETS = (  # the five real sets of ../shared/data (one modality each)
    "brain_mri",
    "lung_histo_lc25000",
    "blood_cells_bccd",
    "skin_dermoscopy_isic",
    "fundus_odir",
)


def choose_device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``None``: all cores, at most 16) and return the number used."""
    n = threads if threads is not None else min(16, os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def shared_data_dir() -> Path:
    """Where the shared real sets are: ``$FEDFEW_SHARED_DATA`` or ``../shared/data``."""
    return Path(os.environ.get(DATA_ENV) or SHARED_DATA)


def require_shared_data(names: tuple[str, ...] = SHARED_SETS) -> Path:
    """Return the shared data folder, or print why the benchmark is skipped and exit 0.

    The sets are not part of the project, so their absence is not a failure.
    """
    folder = shared_data_dir()
    missing = [n for n in names if not (folder / f"{n}.npz").is_file()]
    if missing:
        print(
            f"SKIP: shared data not found ({len(missing)} of {len(names)} sets missing in "
            f"{folder}, e.g. {missing[0]}.npz); set {DATA_ENV} to the folder holding them"
        )
        sys.exit(0)
    return folder


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": name or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_result(
    name: str,
    *,
    config: Mapping[str, Any],
    results: Any,
    device: torch.device,
    folder: Path = RESULTS,
) -> Path:
    """Write ``folder/NAME.json`` with the resolved config, the environment and the results.

    Written to a temporary file and renamed, so a run killed mid-write keeps the last good file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"config": dict(config), "environment": environment(device), "results": results}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


class Progress:
    """Prints progress lines prefixed with the elapsed time, flushed at once (for long runs)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since construction."""
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        """Print ``[mm:ss] message``."""
        seconds = int(self.elapsed())
        print(f"[{seconds // 60:3d}:{seconds % 60:02d}] {message}", flush=True)


def fold_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean accuracy over held-out folds per (method, variant, ways, shots), from result rows.

    Rows with an ``error`` are left out; ``folds`` says how many folds each mean covers.
    """
    groups: dict[tuple[str, str, int, int], list[float]] = {}
    for row in rows:
        if row.get("error") is None:
            key = (row["method"], row["variant"], row["ways"], row["shots"])
            groups.setdefault(key, []).append(float(row["accuracy"]))
    return [
        {
            "method": method,
            "variant": variant,
            "ways": ways,
            "shots": shots,
            "accuracy": sum(values) / len(values),
            "folds": len(values),
        }
        for (method, variant, ways, shots), values in groups.items()
    ]
