"""The package's front door: its public API imports from ``federation`` itself, lazily, so that
importing the package (as every ClientApp process does) costs no torch."""

import importlib
import subprocess
import sys

import pytest

import federation

HEAVY = ("torch", "opacus", "monai")


@pytest.mark.parametrize("package", ["federation", "privacy"])
def test_every_exported_name_is_its_modules_own_object(package):
    front = importlib.import_module(package)
    assert front.__all__ and front.__all__ == sorted(front.__all__)
    for name in front.__all__:
        module = importlib.import_module(front._EXPORTS[name])
        assert getattr(front, name) is getattr(module, name), name
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        _ = front.nothing_here


def test_importing_the_front_doors_imports_no_training_stack():
    probe = f"import sys, federation, privacy; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=240
    )
    assert out.stdout.strip() == "[]"
    assert (
        federation.ServerConfig is importlib.import_module("federation.server_config").ServerConfig
    )
