"""`fedfew train --backbone NAME --weights FILE`: public weights from a local file, recorded."""

import hashlib
import json

import torch
from safetensors.torch import load_file

from models.freezing import FrozenBatchNorm2d
from models.networks import BackboneConfig, build_backbone
from models.synthetic import write_synthetic_npz
from privacy.ledger import Ledger
from tests.app.cli_process import fedfew


def test_train_from_public_batchnorm_weights_keeps_statistics_and_records_the_file(tmp_path):
    data = write_synthetic_npz(tmp_path / "train.npz", n_classes=3, per_class=6, seed=1)
    public = build_backbone(BackboneConfig(name="resnet10", norm="batch"))
    for module in public.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    weights = tmp_path / "imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in public.state_dict().items()}}, weights)
    small = ["--steps", "2", "--ways", "2", "--shots", "1", "--queries", "1"]

    result = fedfew(
        "train", "--data", str(data), "--out", "m", "--backbone", "resnet10",
        "--weights", str(weights), *small, cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["backbone"]["name"] == "resnet10" and config["backbone"]["norm"] == "batch"
    assert config["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert config["weights"]["file"] == "imagenet.pth" and config["weights"]["missing"] == []
    trained = load_file(str(tmp_path / "m" / "weights.safetensors"))
    stats = [k for k in public.state_dict() if k.endswith("running_mean")]
    assert stats and all(torch.equal(trained[k], public.state_dict()[k]) for k in stats)
    assert not torch.equal(trained["conv1.weight"], public.state_dict()["conv1.weight"])


def test_unusable_weights_fail_in_one_line_before_the_ledger_is_charged(tmp_path):
    data = write_synthetic_npz(tmp_path / "train.npz", n_classes=3, per_class=4, seed=1)
    ledger = tmp_path / "site.db"
    Ledger.create(ledger, site="a", cap_epsilon=5.0, delta=1e-5)
    weights = tmp_path / "other.pt"
    torch.save({"decoder.weight": torch.zeros(3)}, weights)

    result = fedfew(
        "train", "--data", str(data), "--out", "m", "--epsilon", "2", "--ledger", str(ledger),
        "--steps", "2", "--weights", str(weights), cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no tensor fits" in lines[0], result.stderr
    assert Ledger.open(ledger).entries() == [] and not (tmp_path / "m").exists()
