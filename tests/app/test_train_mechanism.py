"""`fedfew train --mechanism`: the registered DP mechanism is charged by name and trained."""

import json

from models.synthetic import write_synthetic_npz
from privacy.ledger import Ledger
from tests.app.cli_process import fedfew


def test_supervised_mechanism_is_charged_by_name_at_sensitivity_C(tmp_path):
    data = write_synthetic_npz(tmp_path / "train.npz", n_classes=3, per_class=8, seed=1)
    ledger = tmp_path / "site.db"
    Ledger.create(ledger, site="a", cap_epsilon=5.0, delta=1e-5)
    dp = f"--data {data} --epsilon 2 --ledger {ledger} --steps 2 --sample-rate 0.5"

    result = fedfew(
        "train", "--out", "m", *dp.split(), "--mechanism", "dp-supervised", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    (entry,) = Ledger.open(ledger).entries()
    assert (entry.mechanism, entry.sensitivity_factor) == ("dp-supervised", 1.0)
    assert entry.accounted_noise_multiplier == entry.noise_multiplier
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["privacy"]
    assert saved["mechanism"] == "dp-supervised" and saved["dp"]["expected_patients"] >= 1


def test_unknown_mechanism_is_one_line_and_charges_nothing(tmp_path):
    data = write_synthetic_npz(tmp_path / "train.npz", n_classes=3, per_class=4, seed=1)
    ledger = tmp_path / "site.db"
    Ledger.create(ledger, site="a", cap_epsilon=5.0, delta=1e-5)
    dp = f"--data {data} --epsilon 2 --ledger {ledger} --steps 2"

    result = fedfew("train", "--out", "m", *dp.split(), "--mechanism", "dp-magic", cwd=tmp_path)

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown DP mechanism 'dp-magic'" in lines[0], result.stderr
    assert Ledger.open(ledger).entries() == [] and not (tmp_path / "m").exists()
