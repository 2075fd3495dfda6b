"""The runbook (deploy/README.md) played on 127.0.0.1: `fedfew server init`, three
`fedfew node init`, `fedfew server run`, two registrations, three `fedfew node run` (the third
never registered: it must be refused with a message naming the fix), and `fedfew server
start-run` completing one round. Then `server run` and `node run` are stopped the way an operator
does (SIGTERM from systemd, Ctrl-C), and none of the processes they started may survive.

The services (`server run`, `node run`) are separate processes exactly as the runbook types them
(`fedfew ...`). The one-shot commands run in this process with the same arguments (CliRunner):
each process start costs 10 s of imports on 2 cores, and they run the same code.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app as cli_app
from federation.deploy.processes import ManagedProcess, free_port, group_exists, process_exists
from federation.deploy.provisioning import NODE_FILE
from federation.deploy.server_provisioning import SERVER_FILE
from models.registry import Registry
from models.synthetic import write_synthetic_npz
from privacy.ledger import Ledger

pytestmark = pytest.mark.slow
SITES = ("hospital-a", "hospital-b")
INTRUDER = "hospital-c"  # provisioned, never registered
TINY_RUN = (
    "federation='runbook' num-rounds=1 steps=2 dp.episodes=2 backbone.width=8 "
    "backbone.image-size=32 eval.episodes=5 min-nodes=2 min-replies=2 node-wait=120 "
    "round-timeout=240 max-retries=0"
)
STARTUP_S = 120.0  # a cold `fedfew` imports torch and Flower: 10-20 s on a loaded 2-core box
RUN_TIMEOUT_S = 600


def fedfew() -> list[str]:
    """The `fedfew` console script beside this interpreter (what the runbook types)."""
    return [str(Path(sys.executable).parent / "fedfew")]


def cli(args: list[str]) -> str:
    """Run one `fedfew` command in this process; return its output, failing on an error."""
    result = CliRunner().invoke(cli_app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def environment(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        OMP_NUM_THREADS="1",  # two hospitals share 2 cores
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def start(args: list[str], *, name: str, root: Path) -> ManagedProcess:
    home = root / "flwr-home" / name
    process = ManagedProcess(
        [*fedfew(), *args],
        name=name,
        log_path=root / "logs" / f"{name}.log",
        env=environment(home),
        cwd=root,
    )
    return process.start()


def test_runbook_two_hospitals_one_round_and_an_unregistered_node_refused(tmp_path):
    started: list[ManagedProcess] = []
    try:
        _play(tmp_path, started)
    finally:
        for process in reversed(started):
            process.stop()
    for process in started:
        assert not group_exists(process.pid), f"{process.name} left its process group"


def _play(root: Path, started: list[ManagedProcess]) -> None:
    port = free_port()
    server_dir = root / "server"
    config = server_dir / SERVER_FILE
    ca = server_dir / "certs" / "ca.crt"

    # Provision the server (runbook: "Provisioning the server").
    cli(["server", "init", "--out", str(server_dir), "--host", "127.0.0.1", "--port", str(port)])

    # Provision three hospitals (runbook: "Adding a hospital").
    for i, site in enumerate((*SITES, INTRUDER)):
        data = write_synthetic_npz(root / "data" / f"{site}.npz", n_classes=4, per_class=10, seed=i)
        args = ["node", "init", "--site", site, "--data", str(data), "--ca", str(ca)]
        args += ["--superlink", f"127.0.0.1:{port}", "--budget-epsilon", "8"]
        output = cli([*args, "--node-port", str(free_port()), "--out", str(root / site)])
        assert "40 images of" in output and "in 4 classes" in output
        assert f"flwr supernode register {site}.pub fedfew --name {site}" in output

    # Start the SuperLink, register two hospitals (one by file, one by pasted key line).
    server = _tracked(
        started, start(["server", "run", "--config", str(config)], name="superlink", root=root)
    )
    server.wait_for_port("127.0.0.1", port, timeout=STARTUP_S)
    key_line = (root / SITES[1] / f"{SITES[1]}.pub").read_text().strip()
    keys = {SITES[0]: str(root / SITES[0] / f"{SITES[0]}.pub"), SITES[1]: key_line}
    node_ids = []
    for site, key in keys.items():
        output = cli(["server", "register", "--config", str(config), key, "--name", site])
        assert f"registered {site} as node" in output
        node_ids.append(output.split(" as node ")[1].split(";")[0])

    # Start the nodes; the unregistered one must stop with a message naming the fix.
    nodes = {}
    for site in (*SITES, INTRUDER):
        args = ["node", "run", "--config", str(root / site / NODE_FILE)]
        nodes[site] = _tracked(started, start(args, name=f"node-{site}", root=root))
    for site in SITES:
        nodes[site].wait_for_log("SuperNode ID:", timeout=STARTUP_S)
    listed = cli(["server", "nodes", "--config", str(config)])
    for node_id in node_ids:
        assert f"node {node_id} " in listed
    assert nodes[INTRUDER].wait(timeout=STARTUP_S) == 1
    refusal = nodes[INTRUDER].read_log()
    assert f"refused node {INTRUDER} (Flower exit code 305)" in refusal
    assert (
        f"fedfew server register --config server.toml {INTRUDER}.pub --name {INTRUDER}" in refusal
    )

    # One round (runbook: "Starting a run"); the command reports the run's real status.
    output = cli(
        ["server", "start-run", "--config", str(config), "--run-config", TINY_RUN,
         "--timeout", str(RUN_TIMEOUT_S)]
    )  # fmt: skip
    assert "finished:completed" in output
    versions = Registry.open(server_dir / "state" / "server" / "registry").entries(kind="global")
    assert [v.info["round"] for v in versions][-1] == 1
    for site in SITES:
        ledger = Ledger.open(root / site / "state" / "ledger.db")
        assert [e.round for e in ledger.entries() if e.kind == "charge"] == [1]
        assert ledger.verify() >= 1
    intruder = Ledger.open(root / INTRUDER / "state" / "ledger.db")
    assert not [e for e in intruder.entries() if e.kind == "charge"]

    # A crash and an immediate restart (runbook: "Restarting a node"): accepted at once.
    nodes[SITES[1]].kill()
    args = ["node", "run", "--config", str(root / SITES[1] / NODE_FILE)]
    nodes[SITES[1]] = _tracked(started, start(args, name=f"node-{SITES[1]}-again", root=root))
    nodes[SITES[1]].wait_for_log("SuperNode ID:", timeout=STARTUP_S)
    assert f"released node {SITES[1]}'s previous activation" in nodes[SITES[1]].read_log()

    # Stop as systemd does (SIGTERM) and as a person does (Ctrl-C): nothing may be left behind.
    for process, sig in ((nodes[SITES[0]], signal.SIGINT), (server, signal.SIGTERM)):
        children = process.descendants()
        assert children, f"{process.name} started no Flower processes?"
        os.kill(process.pid, sig)
        process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(process_exists(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [c for c in children if process_exists(c)]
        assert not left, f"{process.name} left {left} after {sig.name}"


def _tracked(started: list[ManagedProcess], process: ManagedProcess) -> ManagedProcess:
    started.append(process)
    return process
