"""The default recipe as a user runs it (issue 23's command contract): ``fedfew train`` writes the
frozen public encoder, ``adapt-domain`` takes the modality's statistics, ``evaluate`` scores it
with the default adaptation mode and prints one JSON object on its last line."""

import json
from pathlib import Path

import numpy as np

from models.model_dir import DOMAIN, load_model_dir
from models.public_start import PUBLIC_ENCODER
from models.public_weights import PUBLIC_WEIGHTS
from models.synthetic import write_synthetic_npz
from tests.app.cli_process import fedfew


def _split(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Training classes, and a new set split into an unlabelled pool and an evaluation part."""
    train = write_synthetic_npz(tmp_path / "train.npz", n_classes=4, per_class=6, seed=3)
    new = dict(
        np.load(write_synthetic_npz(tmp_path / "all.npz", n_classes=3, per_class=16, seed=4))
    )
    pool = np.arange(len(new["labels"])) % 2 == 0
    np.savez(tmp_path / "pool.npz", images=new["images"][pool])  # no labels at all
    np.savez(
        tmp_path / "eval.npz",
        images=new["images"][~pool],
        labels=new["labels"][~pool],
        classes=new["classes"],
        provenance=new["provenance"][~pool],
    )
    return train, tmp_path / "pool.npz", tmp_path / "eval.npz"


def test_train_adapt_domain_evaluate_runs_the_public_encoder(tmp_path: Path) -> None:
    train, pool, evaluation = _split(tmp_path)

    trained = fedfew("train", "--data", str(train), "--out", "m", "--seed", "1", cwd=tmp_path)
    prepared = fedfew(
        "adapt-domain", "--model", "m", "--unlabeled", str(pool), "--out", "m2", cwd=tmp_path
    )
    evaluated = fedfew(
        "evaluate", "--model", "m2", "--data", str(evaluation), "--ways", "3", "--shots", "2",
        "--queries", "3", "--episodes", "30", "--json", "--predictions", "p.jsonl", cwd=tmp_path,
    )  # fmt: skip

    assert trained.returncode == 0, trained.stderr
    assert "nothing trained" in trained.stdout
    model = load_model_dir(tmp_path / "m")
    assert model.backbone == PUBLIC_ENCODER and model.pipeline.image_size == 224
    assert model.config["weights"]["sha256"] == PUBLIC_WEIGHTS["imagenet"].sha256
    assert prepared.returncode == 0, prepared.stderr
    assert "statistics" in prepared.stdout and (tmp_path / "m2" / DOMAIN).is_file()
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["adapt"] == "ridge" and result["episodes"] == 30
    assert result["accuracy"] - result["ci95"] > 1 / 3, result
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 30 * 3 * 3


def test_dp_training_without_a_backbone_trains_conv4(tmp_path: Path) -> None:
    """--epsilon needs parameters to train: the frozen public start has none, so DP keeps
    training Conv-4 unless told otherwise (DP on the public encoder's features is issue 26)."""
    train = write_synthetic_npz(tmp_path / "train.npz", n_classes=3, per_class=8, seed=1)
    ledger = tmp_path / "site.db"
    init = f"budget init --ledger {ledger} --site a --cap-epsilon 5 --delta 1e-5"
    assert fedfew(*init.split(), cwd=tmp_path).returncode == 0
    dp = f"--data {train} --epsilon 2 --ledger {ledger} --steps 2 --ways 2 --shots 2 --queries 2"

    result = fedfew("train", "--out", "m", *dp.split(), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert load_model_dir(tmp_path / "m").backbone.name == "conv4"
