"""The code version recorded with every model and ledger entry (no heavy imports: the ledger and
the ``fedfew budget`` commands need it without torch)."""

from __future__ import annotations

import contextlib
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path


@lru_cache(maxsize=1)
def code_version() -> str:
    """The installed fedfew version plus the checkout's git short hash when there is one
    (recorded with every model and ledger entry)."""
    try:
        version = metadata.version("fedfew")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        version = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip():
            version += "+g" + done.stdout.strip()
    return version
