"""`fedfew node|server` through Typer, in this process: the errors an operator sees, and the
register command `node init` prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app as fedfew_app
from federation.deploy.certificates import make_ca
from federation.errors import NodeConfigError, ProvisioningError
from federation.node_config import CONFIG_FILE_KEY, NodeConfig
from models.synthetic import write_synthetic_npz


def invoke(args: list[str]):
    return CliRunner().invoke(fedfew_app, [str(a) for a in args])


@pytest.fixture
def node_args(tmp_path: Path) -> list[str]:
    ca, _ = make_ca(tmp_path / "certs")
    data = write_synthetic_npz(tmp_path / "a.npz", n_classes=3, per_class=4, seed=1)
    return ["node", "init", "--site", "hospital-a", "--data", data, "--ca", ca,
            "--superlink", "fedfew.example.org:9092", "--out", tmp_path / "a"]  # fmt: skip


def test_node_init_without_cap_fails_naming_the_option(node_args, tmp_path):
    result = invoke(node_args)
    assert isinstance(result.exception, NodeConfigError)
    assert "pass --budget-epsilon" in str(result.exception)
    assert not (tmp_path / "a").exists()


def test_node_init_prints_the_key_and_the_operators_commands(node_args, tmp_path):
    result = invoke([*node_args, "--budget-epsilon", "4"])
    assert result.exit_code == 0, result.output
    line = (tmp_path / "a" / "hospital-a.pub").read_text().strip()
    assert line in result.output
    assert f'fedfew server register --config server.toml "{line}" --name hospital-a' in (
        result.output
    )
    assert "flwr supernode register hospital-a.pub fedfew --name hospital-a" in result.output
    assert f"fedfew node run --config {tmp_path / 'a' / 'node.toml'}" in result.output
    assert "cap epsilon 4 at delta 1e-05" in result.output


def test_node_run_without_config_names_node_init(tmp_path):
    result = invoke(["node", "run", "--config", tmp_path / "node.toml"])
    assert isinstance(result.exception, ProvisioningError)
    assert "does not exist: create it with `fedfew node init --out DIR`" in str(result.exception)


def test_server_register_with_a_bad_key_names_what_to_give(tmp_path):
    assert invoke(["server", "init", "--out", tmp_path / "server"]).exit_code == 0
    config = tmp_path / "server" / "server.toml"
    result = invoke(["server", "register", "--config", config, "nope.pub", "--name", "x"])
    assert isinstance(result.exception, FileNotFoundError)
    assert "neither a file nor a key line" in str(result.exception)


def test_node_init_writes_the_sites_policy_as_installed_and_refuses_a_bad_one(node_args, tmp_path):
    fedfew = Path(sys.executable).parent / "fedfew"
    policy = ["--allowed-mechanisms", "dp-episodic,dp-supervised", "--max-sample-rate", "0.3",
              "--budget-epsilon", "8", "--secure-aggregation"]  # fmt: skip
    argv = [str(a) for a in (fedfew, *node_args, *policy, "required")]

    made = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    refused = invoke([*node_args[:-1], tmp_path / "b", *policy, "sometimes"])

    assert made.returncode == 0, made.stderr
    node = NodeConfig.from_mapping({CONFIG_FILE_KEY: str(tmp_path / "a" / "node.toml")})
    assert node.allowed_mechanisms == ("dp-episodic", "dp-supervised")
    assert node.max_sample_rate == 0.3 and node.secure_aggregation == "required"
    assert isinstance(refused.exception, NodeConfigError)
    assert "secure-aggregation" in str(refused.exception) and not (tmp_path / "b").exists()
