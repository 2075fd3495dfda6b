"""The Flower processes of a deployment, started one way: what `fedfew server run`, `fedfew node
run` and `fedfew server start-run` run (deploy/README.md), and what the demo and the e2e tests
drive through `LocalFederation`.

- `superlink_process` / `supernode_process` / `run_process`: one builder per command line, with
  its environment, log file and working folder (from `server.toml` / `node.toml`).
- `follow`: the one wait loop (a log copy, a deadline), `wait_run` the one timeout/stop path of a
  run and `run_status` (server_provisioning) the one status parser.
- `release_node`: a node restart. The SuperLink refuses to activate a node it still counts online
  (Flower 1.42 `LinkState.activate_node` only accepts REGISTERED or OFFLINE nodes), and a killed
  SuperNode counts online until `HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL` = 2 x 30 s
  after its last heartbeat; neither is a SuperNode option, and `--max-retries`/`--max-wait-time`
  do not help: the refusal is HTTP 412, which the SuperNode never retries (exit code 305). So
  before a SuperNode starts, the node deactivates its own previous activation: a Fleet
  `DeactivateNode` call for the node id it was last accepted under (kept in the state folder),
  signed with its own key, which the SuperLink accepts only for the node id of that key.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from federation.deploy.flower_project import (
    EXIT_CODE_NODE_REFUSED,
    ConfigValue,
    RunResult,
    flower_exit_code,
    parse_run_id,
)
from federation.deploy.processes import ManagedProcess
from federation.deploy.provisioning import NodeFile, node_env, node_log, supernode_command
from federation.deploy.server_provisioning import (
    CONNECTION,
    ServerFile,
    flwr_json,
    run_command,
    run_status,
    server_env,
    superlink_command,
    write_flower_home,
)
from federation.errors import DeploymentError, NodeRefusedError

logger = logging.getLogger(__name__)

NODE_READY = "SuperNode ID:"  # what flower-supernode logs once the SuperLink accepted it
NODE_ID_FILE = "supernode-id"  # in the node's state folder: the id it was last accepted under
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_POLL_S = 0.2
_STOP_RUN_GRACE_S = 3.0
# After `flwr run --stream` exits, how often the run's status is read until it has finished: the
# log stream can end while the run goes on (seen on a loaded machine, with a first round that
# logged nothing for minutes), and its outcome is the run's, not the stream's.
_RUN_STATUS_POLL_S = 2.0
_FINISHED = "finished"
_RELEASE_TIMEOUT_S = 10.0


def superlink_process(
    server: ServerFile, *, base_env: Mapping[str, str] | None = None
) -> ManagedProcess:
    """The SuperLink of `server.toml`, not started (`fedfew server run`).

    Args:
        server: The parsed server file.
        base_env: Environment to start from (default: this process's).
    """
    write_flower_home(server)
    return ManagedProcess(
        superlink_command(server),
        name="superlink",
        log_path=server.log_dir / "superlink.log",
        env=server_env(server, base_env),
        cwd=server.database.parent,
    )


def supernode_process(
    node_file: NodeFile, *, base_env: Mapping[str, str] | None = None
) -> ManagedProcess:
    """The SuperNode of `node.toml`, not started (`fedfew node run`).

    Args:
        node_file: The parsed node file.
        base_env: Environment to start from (default: this process's).
    """
    return ManagedProcess(
        supernode_command(node_file),
        name=f"node {node_file.node.site_id}",
        log_path=node_log(node_file),
        env=node_env(node_file, base_env),
        cwd=node_file.state_dir,
    )


def run_process(
    server: ServerFile,
    values: Mapping[str, ConfigValue],
    *,
    app: Path | None = None,
    base_env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """`flwr run <app> fedfew --stream --run-config ...`, not started (`fedfew server start-run`).

    Args:
        server: The parsed server file.
        values: The run config to send.
        app: The Flower app folder (default: the server's `app/`).
        base_env: Environment to start from (default: this process's).
    """
    write_flower_home(server)
    app_dir = server.app if app is None else Path(app).absolute()
    return ManagedProcess(
        run_command(server, values, app=app_dir),
        name="flwr run",
        log_path=server.log_dir / "flwr-run.log",
        env=server_env(server, base_env),
        cwd=app_dir,
    )


def follow(
    process: ManagedProcess,
    *,
    sink: Callable[[str], None] | None = None,
    stop_when: Callable[[], bool] = lambda: False,
) -> str:
    """Start `process` and wait until it exits or `stop_when()` holds.

    Args:
        process: A process, not started.
        sink: Receives what the process logs, as it comes (e.g. stdout in the foreground).
        stop_when: Checked after each read; True stops the wait (not the process).

    Returns:
        What the process logged during this start.
    """
    log_path = process.log_path
    start = log_path.stat().st_size if log_path.exists() else 0
    process.start()
    seen: list[bytes] = []
    with log_path.open("rb") as log:
        log.seek(start)
        try:
            while True:
                running = process.alive
                chunk = log.read()  # only what is new: a node's log grows for months
                if chunk:
                    seen.append(chunk)
                    if sink is not None:
                        sink(chunk.decode("utf-8", errors="replace"))
                if not running or stop_when():
                    break
                time.sleep(_POLL_S)
        except KeyboardInterrupt:
            process.stop()
            raise
        finally:
            if not process.alive:
                process.stop()  # the command exited: stop what it left behind
    return b"".join(seen).decode("utf-8", errors="replace")


def wait_run(
    server: ServerFile,
    process: ManagedProcess,
    *,
    timeout: float | None,
    sink: Callable[[str], None] | None = None,
) -> RunResult:
    """Start a `run_process`, wait for it, and return the run's outcome from the SuperLink.

    Past `timeout`, `flwr run` is stopped and the run itself too (`flwr stop`), else the
    ServerApp would go on in the SuperLink.

    Raises:
        DeploymentError: The run did not finish within `timeout` (and was stopped).
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    output = follow(
        process, sink=sink, stop_when=lambda: deadline is not None and time.monotonic() > deadline
    )
    run_id = parse_run_id(output)
    if process.alive:
        process.stop(grace=_STOP_RUN_GRACE_S)
        if run_id is not None:
            flwr_json(server, ["stop", str(run_id), CONNECTION])
        raise DeploymentError(
            f"run {run_id} did not finish within {timeout:g} s and was stopped; output ends "
            f"with:\n{process.log_tail()}"
        )
    status, details = run_status(server, run_id) if run_id is not None else (None, "")
    while run_id is not None and status is not None and not status.startswith(_FINISHED):
        if deadline is not None and time.monotonic() > deadline:
            flwr_json(server, ["stop", str(run_id), CONNECTION])
            raise DeploymentError(
                f"run {run_id} did not finish within {timeout:g} s and was stopped (status "
                f"{status!r} after its log stream ended); output ends with:\n"
                f"{process.log_tail()}"
            )
        time.sleep(_RUN_STATUS_POLL_S)
        status, details = run_status(server, run_id)
    wall = time.monotonic() - started
    return RunResult(process.returncode or 0, output, run_id, status, details, wall)


def remember_node_id(node_file: NodeFile, log: str) -> int | None:
    """Keep the node id the SuperNode logged on acceptance (for `release_node` after a crash)."""
    found = _NODE_ID.findall(log)
    if not found:
        return None
    node_id = int(found[-1])
    node_file.state_dir.mkdir(parents=True, exist_ok=True)
    (node_file.state_dir / NODE_ID_FILE).write_text(f"{node_id}\n", encoding="utf-8")
    return node_id


def release_node(node_file: NodeFile) -> bool:
    """Deactivate this node's previous activation on the SuperLink, so that it may start again.

    Signed with the node's own key: the SuperLink accepts it only for that key's node id, and
    only while it counts the node online. Harmless when the node is offline or never ran.

    Returns:
        Whether the SuperLink deactivated a stale activation.
    """
    id_file = node_file.state_dir / NODE_ID_FILE
    try:
        node_id = int(id_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return False  # never accepted here: nothing to release
    # Flower's own Fleet client and signing interceptor (flwr 1.42, pinned): the call is made
    # exactly as flower-supernode makes its own DeactivateNode on a graceful exit.
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    connection = node_file.connection
    private_key = load_ssh_private_key(connection.key.read_bytes(), password=None)
    interceptors: list[Any] = [
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(private_key, private_key.public_key()),  # type: ignore[arg-type]
    ]
    try:
        with FleetHttpClient.from_server_address(
            connection.superlink, False, connection.ca.read_bytes(), interceptors=interceptors
        ) as client:
            client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    except (httpx.HTTPError, RuntimeError) as err:  # offline already, or SuperLink not up
        logger.debug("node %s: nothing to release (%s)", node_file.node.site_id, err)
        return False
    logger.info(
        "node %s: released its previous activation (node id %d)", node_file.node.site_id, node_id
    )
    return True


def refusal_message(node_file: NodeFile) -> str:
    """What to do when the SuperLink refused this node (Flower exit code 305)."""
    connection = node_file.connection
    site = node_file.node.site_id
    return (
        f"the SuperLink {connection.superlink} refused node {site} (Flower exit code 305): "
        f"its public key {connection.public_key} is not registered. Send that key to the "
        "federation operator, who runs `fedfew server register --config server.toml "
        f"{connection.public_key.name} --name {site}`; then run `fedfew node run` again"
    )


def check_node_exit(node_file: NodeFile, process: ManagedProcess, log: str) -> None:
    """Raise the typed error of a SuperNode that exited (nothing if it exited with 0).

    Raises:
        NodeRefusedError: The SuperLink refused it (Flower exit code 305).
        DeploymentError: It failed otherwise.
    """
    code = process.returncode
    if code == 0:
        return
    if flower_exit_code(log) == EXIT_CODE_NODE_REFUSED:
        raise NodeRefusedError(refusal_message(node_file))
    raise DeploymentError(
        f"flower-supernode exited with status {code} (Flower exit code "
        f"{flower_exit_code(log)}); see {process.log_path}"
    )


def wait_node_accepted(node_file: NodeFile, process: ManagedProcess, *, timeout: float) -> int:
    """Wait until the SuperLink accepted a started SuperNode; remember its node id.

    Raises:
        NodeRefusedError: The SuperLink refused it.
        DeploymentError: It exited otherwise or did not connect within `timeout` seconds.
    """
    try:
        process.wait_for_log(NODE_READY, timeout=timeout)
    except DeploymentError:
        if not process.alive:
            check_node_exit(node_file, process, process.read_log())
        raise
    node_id = remember_node_id(node_file, process.read_log())
    if node_id is None:
        raise DeploymentError(f"{process.name} logged no node id; see {process.log_path}")
    return node_id
