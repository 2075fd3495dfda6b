"""The federation as real processes on 127.0.0.1: SuperLink, SuperNodes (TLS, node keys) and this
project's ServerApp and ClientApp run with `flwr run`. Small model and data keep each run short."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from federation.checkpoint import load_checkpoint
from federation.deploy.flower_project import EXIT_CODE_NODE_REFUSED, flower_exit_code, write_app_project
from federation.deploy.local_deployment import LocalFederation
from federation.deploy.processes import group_exists
from federation.server_config import ServerConfig
from models.registry import Registry
from models.synthetic import write_synthetic_npz
from privacy.ledger import Ledger

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 420.0


def tiny_config(workdir: Path, **changes) -> ServerConfig:
    values = {
        "federation": "e2e",
        "num_rounds": 2,
        "min_nodes": 3,
        "min_replies": 2,
        "node_wait": 60.0,
        "round_timeout": 90.0,
        "max_retries": 1,
        "local_steps": 2,
        "episodes": 2,
        "width": 8,
        "image_size": 32,
        "eval_episodes": 5,
        "workdir": str(workdir / "server"),
        **changes,
    }
    return ServerConfig(**values)


def sites(root: Path, caps: dict[str, float]) -> dict[str, dict[str, object]]:
    nodes = {}
    for i, (site, cap) in enumerate(caps.items()):
        data = write_synthetic_npz(root / site / "data.npz", n_classes=4, per_class=10, seed=i)
        nodes[site] = {
            "site-id": site,
            "data": str(data),
            "ledger": str(root / site / "ledger.db"),
            "registry": str(root / site / "registry"),
            "budget-epsilon": cap,
            "budget-delta": 1e-5,
        }
    return nodes


def app(root: Path, config: ServerConfig) -> Path:
    folder = root / "app"
    write_app_project(
        folder,
        serverapp="federation.server_app:app",
        clientapp="federation.client_app:app",
        config=config.to_dict(),
    )
    return folder


def charged_rounds(node: dict[str, object]) -> list[int]:
    return [e.round for e in Ledger.open(str(node["ledger"])).entries() if e.kind == "charge"]


def deployment(root: Path, nodes) -> LocalFederation:
    return LocalFederation(root / "deployment", nodes=nodes, env={"OMP_NUM_THREADS": "1"})


def test_two_rounds_three_nodes_with_one_out_of_budget_and_an_unregistered_node(tmp_path):
    # hospital-c affords round 1 only: 2 steps at accounted sigma 1, q 0.1 cost 2.41; 4 cost 2.76.
    nodes = sites(tmp_path, {"hospital-a": 8.0, "hospital-b": 8.0, "hospital-c": 2.6})
    config = tiny_config(tmp_path)
    with deployment(tmp_path, nodes) as federation:
        intruder = federation.start_unregistered_node("intruder")
        result = federation.run(app(tmp_path, config), timeout=RUN_TIMEOUT)
        intruder.wait(timeout=60)
        processes = federation.processes
    result.check()
    assert "intruder" not in json.dumps(result.output)
    assert flower_exit_code(intruder.read_log()) == EXIT_CODE_NODE_REFUSED
    versions = Registry.open(config.root / "registry").entries(kind="global")
    assert [v.info["round"] for v in versions] == [0, 1, 2]
    assert set(versions[1].privacy) == {"hospital-a", "hospital-b", "hospital-c"}
    assert set(versions[2].privacy) == {"hospital-a", "hospital-b"}
    assert any("hospital-c refuses round 2" in p for p in versions[2].info["problems"])
    assert charged_rounds(nodes["hospital-a"]) == [1, 2]
    assert charged_rounds(nodes["hospital-c"]) == [1]
    refusals = [
        e for e in Ledger.open(str(nodes["hospital-c"]["ledger"])).entries() if e.kind == "refusal"
    ]
    assert [e.round for e in refusals] == [2]  # quorum met by a and b: no retry
    for site in nodes.values():  # each node kept the global models it received
        assert len(Registry.open(str(site["registry"])).entries(kind="global")) >= 1
    for process in processes:  # every process the deployment started is gone
        assert not group_exists(process.pid)


def test_a_node_killed_mid_round_and_a_server_restart_neither_corrupt_nor_double_charge(tmp_path):
    nodes = sites(tmp_path, {"hospital-a": 8.0, "hospital-b": 8.0, "hospital-c": 8.0})
    config = tiny_config(tmp_path, num_rounds=3, round_timeout=45.0)
    status = config.root / "status.json"
    with deployment(tmp_path, nodes) as federation:
        folder = app(tmp_path, config)
        # Run 1: kill hospital-c as soon as round 1 starts; stop the SuperLink after round 1.
        runs: list[object] = []
        thread = threading.Thread(
            target=lambda: runs.append(_run_quietly(federation, folder)), daemon=True
        )
        thread.start()
        _wait_for(lambda: _clientapp_started(tmp_path / "deployment", "hospital-c"), 240)
        federation.kill_node("hospital-c")
        _wait_for(lambda: _rounds_done(status) >= 1, 300)
        federation.stop_superlink()
        thread.join(timeout=120)
        kept = load_checkpoint(config.root / "checkpoint", federation=config.federation)
        assert kept is not None and kept.round >= 1
        assert "hospital-c" not in kept.history[1]["sites"]
        # Run 2: the SuperLink comes back on its database, hospital-c restarts, the run resumes.
        federation.start_superlink()
        federation.start_node("hospital-c")
        result = federation.run(folder, timeout=RUN_TIMEOUT)
    result.check()
    final = load_checkpoint(config.root / "checkpoint", federation=config.federation)
    assert final is not None and final.round == 3
    assert [r["round"] for r in final.history] == [0, 1, 2, 3]
    for site in ("hospital-a", "hospital-b"):
        rounds = charged_rounds(nodes[site])
        assert rounds == sorted(set(rounds)) and set(rounds) == {1, 2, 3}  # once per round
    assert set(charged_rounds(nodes["hospital-c"])) <= {1, 2, 3}
    assert len(charged_rounds(nodes["hospital-c"])) == len(set(charged_rounds(nodes["hospital-c"])))
    versions = Registry.open(config.root / "registry").entries(kind="global")
    assert [v.info["round"] for v in versions] == [0, 1, 2, 3]
    for site in nodes.values():
        assert Ledger.open(str(site["ledger"])).verify() >= 1


def _run_quietly(federation: LocalFederation, folder: Path):
    try:
        return federation.run(folder, timeout=RUN_TIMEOUT)
    except Exception as exc:  # the SuperLink is stopped under it on purpose
        return exc


def _wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(0.5)


def _clientapp_started(root: Path, node: str) -> bool:
    log = root / "nodes" / node / "supernode.log"
    return log.is_file() and "flwr-clientapp" in log.read_text(errors="replace")


def _rounds_done(status: Path) -> int:
    try:
        return int(json.loads(status.read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0
