"""The ``fedfew`` command line as a user runs it: real processes, synthetic data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.synthetic import write_synthetic_npz


def fedfew(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def synthetic_split(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic classes 0-7 for training, 8-11 (never seen in training) for testing."""
    root = tmp_path_factory.mktemp("data")
    full = write_synthetic_npz(root / "all.npz", n_classes=12, per_class=16, seed=3)
    data = dict(np.load(full))
    for name, keep in (("train", range(8)), ("test", range(8, 12))):
        mask = np.isin(data["labels"], list(keep))
        np.savez(
            root / f"{name}.npz",
            images=data["images"][mask],
            labels=data["labels"][mask] - min(keep),
            classes=data["classes"][list(keep)],
            provenance=data["provenance"][mask],
        )
    return root / "train.npz", root / "test.npz"


def test_train_then_evaluate_beats_chance_on_unseen_classes(synthetic_split, tmp_path):
    train, test = synthetic_split
    model = tmp_path / "model"

    trained = fedfew(
        "train",
        "--data",
        str(train),
        "--out",
        str(model),
        "--steps",
        "25",
        "--ways",
        "3",
        "--shots",
        "2",
        "--queries",
        "3",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr
    assert {p.name for p in model.iterdir()} == {
        "weights.safetensors",
        "config.json",
        "pipeline.json",
    }
    evaluated = fedfew(
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(test),
        "--ways",
        "3",
        "--shots",
        "3",
        "--queries",
        "5",
        "--episodes",
        "100",
        "--json",
        cwd=tmp_path,
    )

    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert {"accuracy", "ci95", "ways", "shots", "episodes"} <= result.keys()
    assert result["episodes"] == 100 and result["ways"] == 3
    assert result["accuracy"] - result["ci95"] > 1 / 3 + 0.1, result


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "missing.npz", "--out", "m"], "missing.npz"),
        (["train", "--data", "bad.npz", "--out", "m"], "bad.npz"),
        (["train", "--data", "{train}", "--out", "m", "--meta-learner", "reptile"], "learner"),
        (
            ["evaluate", "--model", "nowhere", "--data", "{test}", "--ways", "2", "--shots", "1"],
            "not a fedfew model directory",
        ),
        (["evaluate", "--model", "m", "--ways", "2"], "Missing option"),
        (["train", "--data", "{train}", "--out", "m", "--steps", "zero"], "steps"),
    ],
)
def test_bad_input_gives_one_line_error(args, message, synthetic_split, tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    train, test = synthetic_split
    args = [a.format(train=train, test=test) for a in args]

    result = fedfew(*args, cwd=tmp_path)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not (tmp_path / "m").exists()
