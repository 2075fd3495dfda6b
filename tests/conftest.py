"""Test order for the two pytest-xdist workers (`--dist loadfile --no-loadscope-reorder`): the
longest files first, so neither worker is left running a long end-to-end file alone at the end.
Durations are from `pytest --durations` on a loaded 2-core machine; any file not listed keeps its
place after them."""

from __future__ import annotations

import pytest

LONGEST_FIRST = (
    "tests/e2e/test_federation.py",  # three federations of real processes: about 16 min loaded
    "tests/privacy/test_audit.py",  # trains 310 episodic steps on CPU: about 10 min loaded
    "tests/e2e/test_container_image.py",  # builds the image (cold 3-4 min), a federation in it
    "tests/e2e/test_runbook.py",
    "tests/e2e/test_secure_aggregation.py",
    "tests/e2e/test_egress.py",
    "tests/e2e/test_dashboard_browser.py",
    "tests/e2e/test_local_deployment.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the longest files first (a stable sort keeps every file's own order)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
