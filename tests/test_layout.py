"""The import direction of DESIGN.md section 1: app -> federation, privacy, models;
federation -> privacy, models; privacy -> models; models and privacy never import flwr/streamlit."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "models": {"models"},
    "privacy": {"privacy", "models"},
    "federation": {"federation", "privacy", "models"},
    "app": {"app", "federation", "privacy", "models"},
}
FORBIDDEN_THIRD_PARTY = {"models": {"flwr", "streamlit"}, "privacy": {"flwr", "streamlit"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = []
    for path in files:
        imported = _imports(path)
        for other in set(ALLOWED) - ALLOWED[package]:
            if other in imported:
                bad.append(f"{path.relative_to(ROOT)} imports {other}")
        for lib in FORBIDDEN_THIRD_PARTY.get(package, set()) & imported:
            bad.append(f"{path.relative_to(ROOT)} imports {lib}")
    assert not bad, "import direction violated:\n" + "\n".join(bad)


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name `path` imports, in full (`federation.deploy.processes`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_federated_algorithm_never_imports_the_process_layer():
    # federation/ holds the Flower app code; federation/deploy/ runs Flower as processes for IT,
    # the demo and the tests. The app code runs inside those processes and must not depend on them.
    algorithm = sorted(p for p in (ROOT / "federation").rglob("*.py") if "deploy" not in p.parts)
    assert (ROOT / "federation" / "deploy").is_dir() and algorithm
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in algorithm
        for name in sorted(_imported_modules(path))
        if name == "federation.deploy" or name.startswith("federation.deploy.")
    ]
    assert not bad, "the federated algorithm imports the process layer:\n" + "\n".join(bad)
