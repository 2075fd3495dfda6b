"""The demo's preparation steps (the federated run itself is covered by tests/e2e)."""

import numpy as np
import pytest

from app.demo import MARKER, DemoSettings, node_config, prepare_workdir, server_config, site_data
from federation.errors import DeploymentError
from federation.node_config import NodeConfig
from models.synthetic import write_synthetic_npz


def test_a_folder_not_made_by_the_demo_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DeploymentError, match="was not made by `fedfew demo`"):
        prepare_workdir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_previous_demo_folder_is_replaced(tmp_path):
    first = prepare_workdir(tmp_path / "demo")
    (first / "old.txt").write_text("x")
    second = prepare_workdir(tmp_path / "demo")
    assert (second / MARKER).is_file() and not (second / "old.txt").exists()


def test_one_given_set_is_split_by_patient_across_three_hospitals(tmp_path):
    data = write_synthetic_npz(tmp_path / "real.npz", n_classes=3, per_class=12, size=16, seed=0)
    sites = site_data(tmp_path / "demo", [data])
    assert sorted(sites) == ["hospital-a", "hospital-b", "hospital-c"]
    total = sum(len(np.load(p)["labels"]) for p in sites.values())
    assert total == 36


def test_several_given_sets_are_one_hospital_each_and_configs_are_valid(tmp_path):
    sets = [
        write_synthetic_npz(tmp_path / f"{i}.npz", n_classes=2, per_class=4, size=16)
        for i in range(2)
    ]
    sites = site_data(tmp_path / "demo", sets)
    assert list(sites.values()) == sets
    settings = DemoSettings()
    for name, path in sites.items():
        config = NodeConfig.from_mapping(node_config(tmp_path, name, path, settings))
        assert config.budget_epsilon == settings.budget_epsilon
    server = server_config(tmp_path, len(sites), settings, "synthetic")
    assert server.min_nodes == 2 and server.min_replies == 1
