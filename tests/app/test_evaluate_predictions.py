"""``fedfew evaluate --predictions FILE``, run as the installed command: one JSON line per query
with calibrated probabilities that agree with the accuracy the command prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.train_cli import (
    PREDICTION_EPISODE,
    PREDICTION_PROBABILITIES,
    PREDICTION_QUERY,
    PREDICTION_TRUE,
)
from models.meta import MetaConfig
from models.model_dir import save_model_dir
from models.networks import BackboneConfig, build_backbone
from models.pipeline import PipelineConfig
from models.synthetic import write_synthetic_npz

FEDFEW = Path(sys.executable).with_name("fedfew")  # the entry point pip installed in the venv
WAYS, SHOTS, QUERIES, EPISODES = 3, 3, 2, 4


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FEDFEW), *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small random Conv-4 model directory (32 px) and a synthetic test set of 4 classes."""
    if not FEDFEW.is_file():
        pytest.skip(f"no installed fedfew command at {FEDFEW} (pip install -e .)")
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    backbone = BackboneConfig(image_size=32, width=8)
    save_model_dir(
        root / "model",
        build_backbone(backbone),
        backbone=backbone,
        pipeline=PipelineConfig(image_size=32),
        meta=MetaConfig(),
    )
    data = write_synthetic_npz(root / "test.npz", n_classes=4, per_class=8, size=32, seed=1)
    return root / "model", data


def test_predictions_file_has_one_calibrated_line_per_query(model_and_data, tmp_path) -> None:
    model, data = model_and_data
    out = tmp_path / "out" / "predictions.jsonl"
    shape = ["--ways", str(WAYS), "--shots", str(SHOTS), "--queries", str(QUERIES)]

    result = run(
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(data),
        *shape,
        "--episodes",
        str(EPISODES),
        "--predictions",
        str(out),
        "--json",
        "--adapt",
        "prototype",  # the sharp raw scores the last assertion is about
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == EPISODES * WAYS * QUERIES
    assert {tuple(sorted(r)) for r in records} == {
        tuple(
            sorted(
                (PREDICTION_EPISODE, PREDICTION_QUERY, PREDICTION_TRUE, PREDICTION_PROBABILITIES)
            )
        )
    }
    assert sorted({r[PREDICTION_EPISODE] for r in records}) == list(range(EPISODES))
    assert {r[PREDICTION_TRUE] for r in records} <= set(range(WAYS))
    probabilities = np.array([r[PREDICTION_PROBABILITIES] for r in records])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # Calibration never changes the ranking: the file's top classes give the printed accuracy.
    truth = np.array([r[PREDICTION_TRUE] for r in records])
    accuracy = json.loads(result.stdout)["accuracy"]
    assert (probabilities.argmax(axis=1) == truth).mean() == pytest.approx(accuracy, abs=1e-6)
    # A random network's raw prototype scores are sharp; calibrated on held-out cases they are
    # not (no query may look certain when the support set's own cases are mostly wrong).
    assert probabilities.max() < 0.95
