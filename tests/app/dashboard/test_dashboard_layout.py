"""The dashboard never imports Flower or the federation package (it must run on a machine where
neither is installed or running); models/ and privacy/ never do either (tests/test_layout.py)."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[3] / "app"
FORBIDDEN = {"flwr", "federation"}


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dashboard_imports_neither_flower_nor_federation() -> None:
    files = [*sorted((APP / "dashboard").rglob("*.py")), APP / "dashboard_cli.py"]
    assert len(files) > 10
    bad = {
        str(f.relative_to(APP)): _imported(f) & FORBIDDEN for f in files if _imported(f) & FORBIDDEN
    }
    assert not bad, f"dashboard modules import {bad}"


def test_entry_file_only_routes() -> None:
    entry = (APP / "dashboard" / "main.py").read_text()
    tree = ast.parse(entry)
    calls = [
        n.func.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    ]
    assert "navigation" in calls and len(tree.body) <= 5
