"""The demo's preparation steps (the federated run itself is covered by tests/e2e)."""

import dataclasses

import numpy as np
import pytest

from app.demo import (
    MARKER,
    RUN_CONFIG,
    DemoSettings,
    demo_run_config,
    prepare_workdir,
    public_start,
    server_config,
    set_classes,
    site_data,
    site_spec,
)
from federation.deploy.provisioning import init_node
from federation.deploy.server_provisioning import init_server
from federation.errors import DeploymentError
from federation.server_app import initial_state
from models.model_dir import load_model_dir
from models.public_start import PUBLIC_ENCODER
from models.run_config import flatten_tables
from models.synthetic import write_synthetic_npz
from models.weights import RECORD_KEY


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


def test_given_sets_name_the_release_vocabulary_in_first_seen_order(tmp_path):
    a = write_synthetic_npz(tmp_path / "a.npz", n_classes=2, per_class=2, size=16)
    b = write_synthetic_npz(tmp_path / "b.npz", n_classes=3, per_class=2, size=16)
    names = [str(c) for c in np.load(b)["classes"]]
    assert set_classes([a, b]) == ",".join(names)  # b's classes extend a's, in its order
    assert DemoSettings().run.with_values({"dp.classes": set_classes([a])}).round_plan(1).dp


def test_several_given_sets_are_one_hospital_each_and_configs_are_valid(tmp_path):
    sets = [
        write_synthetic_npz(tmp_path / f"{i}.npz", n_classes=2, per_class=4, size=16)
        for i in range(2)
    ]
    sites = site_data(tmp_path / "demo", sets)
    assert list(sites.values()) == sets
    settings = DemoSettings()
    server = init_server(tmp_path / "server", hosts=["127.0.0.1"], port=9092)
    for name, path in sites.items():  # provisioned as `fedfew node init` does
        spec = site_spec(tmp_path / "demo", name, path, settings)
        node = init_node(
            tmp_path / "nodes" / name,
            site=name,
            data=spec.data,
            superlink=server.address,
            ca=server.ca_cert,
            budget_epsilon=spec.budget_epsilon,
            budget_delta=spec.budget_delta,
            state_dir=spec.state_dir,
        ).node_file.node
        assert node.budget_epsilon == settings.budget_epsilon and node.data == path
        assert node.ledger == tmp_path / "demo" / name / "ledger.db"  # where the demo prints it
    server = server_config(tmp_path, len(sites), settings, "synthetic")
    assert server.min_nodes == 2 and server.min_replies == 1


def test_the_public_start_is_the_frozen_imagenet_encoder_with_a_public_basis(tmp_path):
    settings = DemoSettings().with_changes(side=32)
    lines: list[str] = []
    start = public_start(tmp_path, settings, lines.append)
    loaded = load_model_dir(start)
    assert loaded.config["private"] is False and loaded.config["public_start"] == "imagenet"
    assert RECORD_KEY in loaded.config  # the wheel's file, its hash recorded
    assert any("not private, no hospital data" in line for line in lines)
    config = server_config(tmp_path, 3, settings, "synthetic", start)
    assert config.initial_model == str(start) and config.backbone.adapter == "within-class"
    assert config.backbone == dataclasses.replace(
        PUBLIC_ENCODER, image_size=32, adapter="within-class"
    )
    assert config.dp == settings.run.dp and config.mechanism == "dp-within-class"
    state = initial_state(config)
    saved = loaded.model.state_dict()
    assert all(np.array_equal(state[k], saved[k].numpy()) for k in saved)
    basis = state["adapter.basis"].astype(np.float64)  # from the public images: orthonormal
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-4)
    assert int(state["adapter.stage"]) == 0 and not np.any(state["adapter.centre"])


def test_the_secure_demo_runs_a_delta_mechanism_on_a_scale_adapter():
    config = demo_run_config(secure=True)
    assert (config.mechanism, config.steps, config.backbone.adapter) == ("dp-episodic", 10, "scale")
    assert config.dp.max_grad_norm == 0.05 and config.dp.max_shots == 3


def test_the_demos_settings_are_its_run_config_file_read_strictly(tmp_path, monkeypatch):
    config = demo_run_config()
    assert (config.federation, config.num_rounds, config.steps) == ("fedfew-demo", 3, 1)
    assert config.dp.max_grad_norm == 1.0 and config.backbone.image_size == 128
    changed = DemoSettings().with_changes(rounds=1, steps=2, side=64).run
    assert (changed.num_rounds, changed.steps, changed.backbone.image_size) == (1, 2, 64)
    assert len(config.round_plan(1).dp.classes) == 16  # the hospitals' classes, all named
    assert changed.dp == config.dp  # nothing else moves
    import tomllib

    assert set(flatten_tables(tomllib.loads(RUN_CONFIG.read_text()))) <= set(config.to_dict())
    misspelt = tmp_path / "demo_run.toml"
    misspelt.write_text(RUN_CONFIG.read_text().replace("max-grad-norm", "max-grad-nrom"))
    monkeypatch.setattr("app.demo.RUN_CONFIG", misspelt)
    with pytest.raises(ValueError, match=r"unknown key\(s\) dp.max-grad-nrom"):
        demo_run_config()
