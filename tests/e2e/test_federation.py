"""The federation as real processes on 127.0.0.1: SuperLink, SuperNodes (TLS, node keys) and this
project's ServerApp and ClientApp run with `flwr run`. Small model and data keep each run short."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from federation.checkpoint import load_checkpoint
from federation.deploy.flower_project import (
    EXIT_CODE_NODE_REFUSED,
    RunResult,
    flower_exit_code,
    write_app_project,
)
from federation.deploy.local_deployment import LocalFederation, SiteSpec
from federation.deploy.processes import group_exists
from federation.deploy.services import NODE_ID_FILE
from federation.publishing import DIGEST_KEY
from federation.server_config import ServerConfig
from models.registry import Registry
from models.synthetic import write_synthetic_npz
from privacy.ledger import Ledger

pytestmark = pytest.mark.slow
RUN_TIMEOUT = 720.0  # slow only when the machine is: live nodes answer in seconds


def tiny_config(workdir: Path, **changes) -> ServerConfig:
    values = {
        "federation": "e2e",
        "num_rounds": 2,
        "min_nodes": 3,
        "min_replies": 2,
        "node_wait": 60.0,
        # A live node answers in seconds, but on a 2-core machine busy with other tests its
        # ClientApp's cold start and steps took over 90 s; a dead node's tests set their own.
        "round_timeout": 180.0,
        "max_retries": 1,
        "steps": 2,
        "workdir": str(workdir / "server"),
        **changes,
    }
    small = {"dp.episodes": 2, "backbone.width": 8, "backbone.image-size": 32, "eval.episodes": 5}
    return ServerConfig(**values).with_values(small)


def sites(root: Path, caps: dict[str, float]) -> dict[str, SiteSpec]:
    specs = {}
    for i, (site, cap) in enumerate(caps.items()):
        data = write_synthetic_npz(root / site / "data.npz", n_classes=4, per_class=10, seed=i)
        specs[site] = SiteSpec(data=data, budget_epsilon=cap, state_dir=root / site / "state")
    return specs


def ledger(root: Path, site: str) -> Ledger:
    """The site's ledger where `fedfew node init --state` put it."""
    return Ledger.open(root / site / "state" / "ledger.db")


def app(root: Path, config: ServerConfig) -> Path:
    folder = root / "app"
    write_app_project(
        folder,
        serverapp="federation.server_app:app",
        clientapp="federation.client_app:app",
        config=config.to_dict(),
    )
    return folder


def charged_rounds(root: Path, site: str) -> list[int]:
    return [e.round for e in ledger(root, site).entries() if e.kind == "charge"]


def deployment(root: Path, specs: dict[str, SiteSpec]) -> LocalFederation:
    return LocalFederation(root / "deployment", sites=specs, env={"OMP_NUM_THREADS": "1"})


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
    problems = versions[2].info["problems"]
    assert any("(hospital-c) refused or failed: budget-exhausted" in p for p in problems)
    assert charged_rounds(tmp_path, "hospital-a") == [1, 2]
    assert charged_rounds(tmp_path, "hospital-c") == [1]
    refusals = [e for e in ledger(tmp_path, "hospital-c").entries() if e.kind == "refusal"]
    assert [e.round for e in refusals] == [2]  # quorum met by a and b: no retry
    final = versions[-1].info[DIGEST_KEY]
    for site in nodes:  # each node kept the models it received and the final one, uncharged
        kept = Registry.open(tmp_path / site / "state" / "registry").entries(kind="global")
        assert kept[-1].info[DIGEST_KEY] == final and kept[-1].info["round"] == 2
    for process in processes:  # every process the deployment started is gone
        assert not group_exists(process.pid)


def test_a_node_killed_mid_round_and_a_server_restart_neither_corrupt_nor_double_charge(tmp_path):
    nodes = sites(tmp_path, {"hospital-a": 8.0, "hospital-b": 8.0, "hospital-c": 8.0})
    # 90 s: a restarted node cold-starts its ClientApp (imports torch, Opacus, MONAI) in the round.
    config = tiny_config(tmp_path, num_rounds=2, round_timeout=90.0)
    status = config.root / "status.json"
    with deployment(tmp_path, nodes) as federation:
        folder = app(tmp_path, config)
        # Run 1: kill hospital-c as soon as round 1 starts; stop the SuperLink after round 1.
        runs: list[object] = []
        thread = threading.Thread(
            target=lambda: runs.append(_run_quietly(federation, folder)), daemon=True
        )
        thread.start()
        # Kill it once it has charged its ledger for round 1, before it can reply.
        _wait_for(lambda: 1 in charged_rounds(tmp_path, "hospital-c"), 240, poll=0.05)
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
    assert final is not None and final.round == 2
    assert [r["round"] for r in final.history] == [0, 1, 2]
    for site in ("hospital-a", "hospital-b"):
        assert charged_rounds(tmp_path, site) == [1, 2]  # once per round
    # hospital-c was charged for round 1 before it died (that charge stands: nothing is
    # refunded), then once for the round after its restart.
    assert charged_rounds(tmp_path, "hospital-c") == [1, 2]
    versions = Registry.open(config.root / "registry").entries(kind="global")
    assert [v.info["round"] for v in versions] == [0, 1, 2]
    assert "hospital-c" not in versions[1].privacy
    assert set(versions[2].privacy) == set(nodes)
    for site in nodes:
        assert ledger(tmp_path, site).verify() >= 1


def test_a_node_killed_between_rounds_and_restarted_at_once_is_in_the_next_round(tmp_path):
    # min-replies = 3: round 2 cannot finish without hospital-b, so the run itself shows that
    # the restarted node was accepted and answered (a refused restart fails at start_node).
    nodes = sites(tmp_path, {"hospital-a": 8.0, "hospital-b": 8.0, "hospital-c": 8.0})
    config = tiny_config(tmp_path, num_rounds=2, min_replies=3, max_retries=2)
    status = config.root / "status.json"
    with deployment(tmp_path, nodes) as federation:
        folder = app(tmp_path, config)
        runs: list[object] = []
        thread = threading.Thread(
            target=lambda: runs.append(_run_quietly(federation, folder)), daemon=True
        )
        thread.start()
        _wait_for(lambda: _rounds_done(status) >= 1, 300, poll=0.05)
        old_id = federation.node_ids["hospital-b"]
        federation.kill_node("hospital-b")
        began = time.monotonic()
        federation.start_node("hospital-b")  # NodeRefusedError if the SuperLink refused it
        restart_s = time.monotonic() - began
        thread.join(timeout=RUN_TIMEOUT)
    assert runs and isinstance(runs[0], RunResult), runs
    runs[0].check()
    assert restart_s < 45, f"restart took {restart_s:.0f} s"
    assert remembered_node_id(tmp_path, "hospital-b") == old_id  # same registration
    versions = Registry.open(config.root / "registry").entries(kind="global")
    assert [v.info["round"] for v in versions] == [0, 1, 2]
    assert set(versions[2].privacy) == set(nodes)
    assert charged_rounds(tmp_path, "hospital-b") == [1, 2]


def remembered_node_id(root: Path, site: str) -> int:
    return int((root / site / "state" / NODE_ID_FILE).read_text())


def _run_quietly(federation: LocalFederation, folder: Path):
    try:
        return federation.run(folder, timeout=RUN_TIMEOUT)
    except Exception as exc:  # the SuperLink is stopped under it on purpose
        return exc


def _wait_for(condition, timeout: float, *, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(poll)


def _rounds_done(status: Path) -> int:
    try:
        return int(json.loads(status.read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0
