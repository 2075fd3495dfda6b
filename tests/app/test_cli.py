"""The ``fedfew`` command line as a user runs it: real processes, synthetic data."""

import json
from pathlib import Path

import numpy as np
import pytest

from models.synthetic import write_synthetic_npz
from tests.app.cli_process import fedfew


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
        "--backbone",
        "conv4",
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


def test_private_training_charges_ledger_first_and_refuses_past_cap(synthetic_split, tmp_path):
    from dp_accounting import dp_event, rdp

    train, _ = synthetic_split
    ledger = tmp_path / "site.db"
    init = f"budget init --ledger {ledger} --site a --cap-epsilon 2.1 --delta 1e-5"
    assert fedfew(*init.split(), cwd=tmp_path).returncode == 0
    dp = f"--data {train} --epsilon 2 --ledger {ledger} --steps 2 --ways 2 --shots 2 --queries 2"

    first = fedfew("train", "--out", "m1", *dp.split(), cwd=tmp_path)
    refused = fedfew("train", "--out", "m2", *dp.split(), cwd=tmp_path)
    shown = fedfew("budget", "show", "--ledger", str(ledger), "--json", cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m2").exists()
    budget = json.loads(shown.stdout)
    kinds = [e["kind"] for e in budget["history"]]
    assert kinds == ["charge", "refusal"]
    charge = budget["history"][0]
    # An independent accountant (Google's dp_accounting) reproduces the recorded epsilon.
    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(
        charge["sample_rate"], dp_event.GaussianDpEvent(charge["accounted_noise_multiplier"])
    )
    accountant.compose(event, charge["steps"])
    independent = accountant.get_epsilon(budget["delta"])
    assert charge["epsilon_after"] == pytest.approx(independent, rel=0.01)
    assert charge["epsilon_after"] <= 2.0 + 1e-9
    assert charge["sensitivity_factor"] == 2.0
    assert charge["noise_multiplier"] == pytest.approx(2 * charge["accounted_noise_multiplier"])
    saved = json.loads((tmp_path / "m1" / "config.json").read_text())
    assert saved["private"] is True and saved["privacy"]["ledger_entry"]["id"] == charge["id"]
