"""The command contract of issue 11, through the installed ``fedfew`` executable:
``pretrain`` -> ``adapt-domain`` -> ``evaluate --json``, and their failure paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.synthetic import write_synthetic_npz

FEDFEW = Path(sys.executable).parent / "fedfew"
TIMEOUT_S = 600  # each command imports torch, MONAI and Flower: slow on a loaded 2-core box


def _fedfew(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FEDFEW), *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contract")
    write_synthetic_npz(root / "public.npz", n_classes=4, per_class=6, seed=1)
    write_synthetic_npz(root / "target.npz", n_classes=3, per_class=12, seed=2)
    return root


def test_pretrain_then_adapt_domain_then_evaluate(work):
    done = _fedfew(
        "pretrain", "--data", "public.npz", "--out", "m0", "--objective", "self-supervised",
        "--steps", "2", "--width", "16", cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((work / "m0" / "config.json").read_text())
    assert config["private"] is False and config["backbone"]["width"] == 16
    done = _fedfew(
        "adapt-domain", "--model", "m0", "--unlabeled", "target.npz", "--out", "m1",
        "--method", "statistics", cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "local only" in done.stdout
    record = json.loads((work / "m1" / "config.json").read_text())["domain"]
    assert record["local_only"] is True and record["method"] == "statistics"
    assert (work / "m1" / "domain.safetensors").is_file()
    done = _fedfew(
        "evaluate", "--model", "m1", "--data", "target.npz", "--ways", "3", "--shots", "2",
        "--queries", "2", "--episodes", "10", "--json", cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"accuracy", "ci95", "ways", "shots", "queries", "episodes", "adapt", "dataset"}
    assert set(result) == expected
    assert 0.0 <= result["accuracy"] <= 1.0 and result["episodes"] == 10


def test_failures_are_one_line_and_non_zero(work):
    unknown = _fedfew(
        "pretrain", "--data", "public.npz", "--out", "x", "--objective", "magic", cwd=work
    )
    assert unknown.returncode == 2 and "magic" in unknown.stderr
    missing = _fedfew(
        "adapt-domain", "--model", "absent", "--unlabeled", "target.npz", "--out", "y", cwd=work
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0 and "absent" in missing.stderr
    assert not (work / "x").exists() and not (work / "y").exists()
    assert np.load(work / "target.npz")["images"].shape[0] == 36  # inputs untouched
