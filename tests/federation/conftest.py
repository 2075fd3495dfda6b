"""Fixtures for the federation unit tests: a small model, a site's data and its node config."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.supercore.task_identity import TaskIdentity

from federation.inprocess import set_task_identity
from federation.server_app import initial_state
from federation.server_config import ServerConfig
from models.synthetic import write_synthetic_npz


@pytest.fixture(autouse=True)
def task_identity():
    """What Flower's runtime sets before any Message is built in a process."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    set_task_identity(run_id=7)
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    """Two sites, a tiny network and 2 local steps: seconds per round on 2 cores."""
    return ServerConfig(
        federation="unit",
        num_rounds=2,
        min_nodes=2,
        min_replies=2,
        node_wait=5,
        round_timeout=5,
        max_retries=1,
        local_steps=2,
        episodes=2,
        width=8,
        image_size=32,
        eval_episodes=5,
        workdir=str(tmp_path / "server"),
        seed=0,
    )


@pytest.fixture
def global_state(server_config: ServerConfig):
    return initial_state(server_config)


def make_site(root: Path, site: str, *, cap: float = 8.0, seed: int = 1) -> dict[str, object]:
    """A site's node config (as --node-config would give it) with its own synthetic data."""
    folder = root / site
    folder.mkdir(parents=True, exist_ok=True)
    data = write_synthetic_npz(folder / "data.npz", n_classes=4, per_class=10, seed=seed)
    return {
        "site-id": site,
        "data": str(data),
        "ledger": str(folder / "ledger.db"),
        "registry": str(folder / "registry"),
        "budget-epsilon": cap,
        "budget-delta": 1e-5,
    }


def write_key(path: Path) -> Path:
    """An ECDSA P-384 node key pair in OpenSSH formats (``path`` and ``path.pub``), as
    `fedfew node init` writes it."""
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name(path.name + ".pub").write_bytes(public)
    return path
