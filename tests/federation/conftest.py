"""Fixtures for the federation unit tests: a small model, a site's data and its node config."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federation.client_app import app as client_app
from federation.inprocess_grid import set_task_identity
from federation.records import MODEL, PLAN, to_arrays, to_config
from federation.secure_node import stage_of
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
        steps=2,
        workdir=str(tmp_path / "server"),
        seed=0,
    ).with_values(
        {"dp.episodes": 2, "backbone.width": 8, "backbone.image-size": 32, "eval.episodes": 5}
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


def message(state, plan) -> Message:
    """The train message a server sends a node: the global model and the round's plan."""
    content = RecordDict({MODEL: to_arrays(state), PLAN: to_config(plan.to_config())})
    return Message(content, dst_node_id=3, message_type=MessageType.TRAIN)


def context(node_config) -> Context:
    """The Context a SuperNode with ``node_config`` gives the ClientApp."""
    return Context(run_id=7, node_id=3, node_config=node_config, state=RecordDict(), run_config={})


def node(site):
    """A plain node: the ClientApp, routed by message type as Flower does."""
    return lambda msg: client_app(msg, context(site))


def secure_node(site: dict, node_id: int, *, drop_masked_in_attempts: tuple[int, ...] = ()):
    """A node: the ClientApp's train path (mod + handler) with the Context a SuperNode keeps
    for the run. ``drop_masked_in_attempts``: the masked-vectors stages (1st, 2nd, ...) whose
    reply is lost after the node trained, as when it dies before sending."""
    kept = Context(run_id=7, node_id=node_id, node_config=site, state=RecordDict(), run_config={})
    seen = {"masked": 0}

    def handle(msg: Message) -> Message | None:
        stage = stage_of(msg)  # before the mod: Flower's mod pops the stage from the message
        reply = client_app(msg, kept)  # the mod, then the handler of the message's type
        if stage == "collect_masked_vectors":
            seen["masked"] += 1
            if seen["masked"] in drop_masked_in_attempts:
                return None
        return reply

    return handle
