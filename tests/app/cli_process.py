"""Running the CLI as a separate process from the source tree (the tests of app/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def fedfew(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m app.cli ARGS`` in ``cwd`` with a minimal environment."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"},
    )
