"""A real Flower deployment on 127.0.0.1, provisioned and run the way the runbook does it.

`LocalFederation` is a thin orchestrator for the demo and the e2e tests. Every step is the
function behind a runbook command (deploy/README.md):

| step | runbook command | function |
|---|---|---|
| CA, server certificate, `server.toml` | `fedfew server init` | `init_server` |
| a site's `node.toml`, key pair, ledger | `fedfew node init` | `init_node` |
| the SuperLink | `fedfew server run` | `superlink_process` |
| registering a node's key | `fedfew server register` | `flwr_json(... supernode register)` |
| a SuperNode (and its restart) | `fedfew node run` | `release_node`, `supernode_process` |
| a run, its timeout and status | `fedfew server start-run` | `run_process`, `wait_run` |

It adds only what one machine needs: free ports, one work folder, and an environment for every
process (e.g. `OMP_NUM_THREADS`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from federation.deploy.flower_project import ConfigValue, RunResult
from federation.deploy.processes import ManagedProcess, free_port, stop_processes
from federation.deploy.provisioning import DEFAULT_BUDGET_DELTA, NodeFile, init_node
from federation.deploy.server_provisioning import (
    CONNECTION,
    ServerFile,
    flwr_json,
    init_server,
    run_status,
)
from federation.deploy.services import (
    release_node,
    run_process,
    superlink_process,
    supernode_process,
    wait_node_accepted,
    wait_run,
)
from federation.errors import DeploymentError
from models.synthetic import write_synthetic_npz

HOST = "127.0.0.1"
# A cold start imports flwr, grpc, fastapi and uvicorn: 3-5 s here, more on a loaded machine.
DEFAULT_STARTUP_TIMEOUT_S = 60.0
_UNREGISTERED_DIR = "unregistered"


@dataclass(frozen=True)
class SiteSpec:
    """What `fedfew node init` is given for one site.

    Attributes:
        data: The site's training set.
        budget_epsilon: The site's total epsilon cap.
        budget_delta: Delta of every charge.
        state_dir: Folder of its ledger, registry and logs (`--state`; default beside node.toml).
        policy: Its DP policy where it departs from the defaults (`--allowed-mechanisms`, ...).
    """

    data: Path
    budget_epsilon: float
    budget_delta: float = DEFAULT_BUDGET_DELTA
    state_dir: Path | None = None
    policy: Mapping[str, ConfigValue] = field(default_factory=dict)


class LocalFederation:
    """A SuperLink and one SuperNode per site on 127.0.0.1, TLS and node keys, as processes.

    Use as a context manager; everything it started is stopped on exit, nodes first.

    Args:
        workdir: Folder of the server (`server/`) and of each site (`nodes/<site>/`).
        sites: Site name -> what `fedfew node init` is given.
        env: Extra environment variables for every process (added to `os.environ`).
        startup_timeout: Seconds each process may take to come up.
        federation: The federation's name (`fedfew server init --federation`).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        sites: Mapping[str, SiteSpec],
        env: Mapping[str, str] | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
        federation: str = "fedfew-local",
    ) -> None:
        if not sites:
            raise ValueError("sites is empty: give at least one site name and its data")
        self.workdir = Path(workdir).absolute()
        self.sites = dict(sites)
        self.startup_timeout = startup_timeout
        self.federation = federation
        self.node_ids: dict[str, int] = {}
        self.node_files: dict[str, NodeFile] = {}
        self._server: ServerFile | None = None
        self._base_env = {**os.environ, **(env or {})}
        self._base_env.pop("FLWR_HOME", None)  # each process gets its own, as on its own host
        self._superlink: ManagedProcess | None = None
        self._node_processes: dict[str, ManagedProcess] = {}
        self._started: list[ManagedProcess] = []  # every process ever started, restarts too

    # -- whole deployment --------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalFederation:
        """`server init`, `node init` per site, `server run`, `server register`, `node run`.

        Returns:
            This federation, running, with `node_ids` and `node_files` filled in.

        Raises:
            DeploymentError, ProvisioningError: The work folder holds an earlier deployment,
                or a process failed to start or register.
        """
        try:
            self._server = init_server(
                self.workdir / "server",
                hosts=[HOST],
                port=free_port(HOST),
                bind=HOST,
                federation=self.federation,
            )
            for name, spec in self.sites.items():
                self.node_files[name] = self._init_node(self.workdir / "nodes" / name, name, spec)
            self.start_superlink()
            with ThreadPoolExecutor(max_workers=len(self.sites)) as pool:  # ~2 s of imports each
                ids = pool.map(self._register, self.node_files.values())
                self.node_ids = dict(zip(self.node_files, ids, strict=True))
            started = {name: self._start_node_process(name) for name in self.sites}
            for name, process in started.items():
                wait_node_accepted(self.node_files[name], process, timeout=self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything this federation started: runs and nodes first, then the SuperLink.

        Idempotent, and safe after a failed start.
        """
        stop_processes([p for p in self._started if p is not self._superlink])
        if self._superlink is not None:
            self._superlink.stop()

    @property
    def server(self) -> ServerFile:
        """The parsed `server.toml`."""
        if self._server is None:
            raise DeploymentError("no server yet: call start() first")
        return self._server

    @property
    def port(self) -> int:
        """The SuperLink's port on 127.0.0.1."""
        return self.server.port

    @property
    def processes(self) -> list[ManagedProcess]:
        """Every process started so far (running or not; restarted ones once per start)."""
        return list(self._started)

    # -- SuperLink -----------------------------------------------------------------------------

    def start_superlink(self) -> ManagedProcess:
        """Start (or restart) the SuperLink on the same port and database (`server run`).

        Raises:
            DeploymentError: It is already running, or did not come up in time.
        """
        if self._superlink is not None and self._superlink.alive:
            raise DeploymentError(f"the SuperLink already runs (pid {self._superlink.pid})")
        process = superlink_process(self.server, base_env=self._base_env)
        self._superlink = self._start(process)
        process.wait_for_port(HOST, self.server.port, timeout=self.startup_timeout)
        return process

    def stop_superlink(self) -> None:
        """Stop the SuperLink gracefully (nodes keep running and retry to connect)."""
        if self._superlink is not None:
            self._superlink.stop()

    # -- SuperNodes ----------------------------------------------------------------------------

    def start_node(self, name: str, *, wait: bool = True) -> ManagedProcess:
        """Start (or restart) a site's SuperNode as `fedfew node run` does.

        A restart right after a crash is accepted at once: the node releases its previous
        activation first (`release_node`).

        Raises:
            KeyError: `name` is not one of the federation's sites.
            NodeRefusedError: The SuperLink refused the node (Flower exit code 305).
            DeploymentError: It already runs, or it did not connect in time.
        """
        process = self._start_node_process(name)
        if wait:
            wait_node_accepted(self.node_files[name], process, timeout=self.startup_timeout)
        return process

    def kill_node(self, name: str) -> None:
        """SIGKILL the node `name` and its children at once, as a crash of its host would."""
        self.node_process(name).kill()

    def node_process(self, name: str) -> ManagedProcess:
        """Return the latest process of a node.

        Raises:
            KeyError: The node was never started.
        """
        if name not in self._node_processes:
            raise KeyError(
                f"node {name!r} was never started; started: {sorted(self._node_processes)}"
            )
        return self._node_processes[name]

    def start_unregistered_node(self, name: str) -> ManagedProcess:
        """Provision a site (`node init`) whose key is never registered, and start its node.

        Returns:
            The process, started. The SuperLink refuses it: it exits with status 1 and logs
            Flower's exit code 305 (read it with `flower_exit_code(process.read_log())`).
        """
        folder = self.workdir / _UNREGISTERED_DIR / name
        data = write_synthetic_npz(folder / "data.npz", n_classes=2, per_class=2, seed=0)
        node_file = self._init_node(folder / "node", name, SiteSpec(data, budget_epsilon=1.0))
        return self._start(supernode_process(node_file, base_env=self._base_env))

    # -- runs ----------------------------------------------------------------------------------

    def run(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float,
    ) -> RunResult:
        """Run a Flower app as `fedfew server start-run` does and return its outcome.

        Args:
            app_dir: Folder with the app's `pyproject.toml` (see `write_app_project`).
            run_config: Overrides of the app's run config.
            timeout: Seconds the run may take, from `flwr run` start to exit.

        Raises:
            DeploymentError: The run did not finish within `timeout`; `flwr run` and the run
                itself (`flwr stop`) were stopped first.
        """
        process = run_process(
            self.server, dict(run_config or {}), app=app_dir, base_env=self._base_env
        )
        self._started.append(process)
        return wait_run(self.server, process, timeout=timeout)

    def run_status(self, run_id: int) -> tuple[str, str]:
        """A run's status (e.g. `finished:completed`) and Flower's details (`flwr ls`)."""
        return run_status(self.server, run_id)

    # -- helpers -------------------------------------------------------------------------------

    def _init_node(self, folder: Path, name: str, spec: SiteSpec) -> NodeFile:
        return init_node(
            folder,
            site=name,
            data=spec.data,
            superlink=self.server.address,
            ca=self.server.ca_cert,
            budget_epsilon=spec.budget_epsilon,
            budget_delta=spec.budget_delta,
            port=free_port(HOST),
            state_dir=spec.state_dir,
            policy=spec.policy,
        ).node_file

    def _register(self, node_file: NodeFile) -> int:
        key = node_file.connection.public_key
        arguments = [
            "supernode",
            "register",
            str(key),
            CONNECTION,
            "--name",
            node_file.node.site_id,
        ]
        return int(str(flwr_json(self.server, arguments)["node-id"]))

    def _start_node_process(self, name: str) -> ManagedProcess:
        if name not in self.sites:
            raise KeyError(f"unknown node {name!r}; nodes are {sorted(self.sites)}")
        running = self._node_processes.get(name)
        if running is not None and running.alive:
            raise DeploymentError(f"node {name} already runs (pid {running.pid})")
        node_file = self.node_files[name]
        release_node(node_file)
        process = supernode_process(node_file, base_env=self._base_env)
        self._node_processes[name] = self._start(process)
        return process

    def _start(self, process: ManagedProcess) -> ManagedProcess:
        self._started.append(process)
        return process.start()
