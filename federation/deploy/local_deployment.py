"""A real Flower deployment on 127.0.0.1: one SuperLink, one SuperNode per site, TLS and keys.

What the Flower 1.42 processes need (checked against the installed `flwr`):

- `flower-superlink` serves its Fleet API (SuperNodes), Control API (`flwr` CLI) and
  ServerAppIo/Runtime API (its own `flower-superexec` and `flwr-serverapp`) over HTTPS on one
  port (`--port`, default 8000). `--enable-supernode-auth` needs TLS; `--database` keeps the
  node registrations and runs across restarts.
- `flwr` CLI commands find the SuperLink through `$FLWR_HOME/config.toml`:
  `[superlink.<name>] address = "127.0.0.1:PORT"` and `root-certificates = "<absolute CA path>"`.
- `flwr supernode register <public key> <connection> --name <site>` registers a node's OpenSSH
  public key and prints its node id (`--format json`); registering a key twice fails.
- `flower-supernode` dials the SuperLink with the CA and its private key; its own Runtime API
  (for its `flower-superexec` and `flwr-clientapp`) needs a distinct `--port` per node. It logs
  `SuperNode ID: <id>` once the SuperLink accepted it. An unregistered key exits with status 1
  after logging Flower's `Exit Code: 305`.
- `flwr run <app> <connection> --stream` exits 0 even when the ServerApp fails: the run's real
  outcome is its status (`finished:completed`, `finished:failed`) from `flwr ls --run-id`.

Every process gets this process's environment plus `FLWR_HOME`, telemetry and the update check
off, and this interpreter's folder first on `PATH` (Flower starts `flower-superexec`,
`flwr-serverapp` and `flwr-clientapp` by name).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from federation.deploy.certificates import (
    DeploymentCredentials,
    make_deployment_credentials,
    make_node_keypair,
)
from federation.errors import DeploymentError, NodeRefusedError
from federation.deploy.flower_project import (
    EXIT_CODE_NODE_REFUSED,
    ConfigValue,
    RunResult,
    config_args,
    flower_config_toml,
    flower_exit_code,
    parse_cli_json,
    parse_run_id,
)
from federation.deploy.processes import ManagedProcess, free_port, stop_processes

HOST = "127.0.0.1"
DEFAULT_CONNECTION = "fedfew-local"
# A cold start imports flwr, grpc, fastapi and uvicorn: 3-5 s here, more on a loaded machine.
DEFAULT_STARTUP_TIMEOUT_S = 60.0
_CLI_TIMEOUT_S = 60.0
_NODE_READY = "SuperNode ID:"
_REFUSED_PAUSE_S = 5.0  # a refused node costs a process start (seconds): do not spin


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 with TLS and node authentication, as processes.

    Use as a context manager; everything it started is stopped on exit, nodes first.

    Args:
        workdir: Folder for certificates, keys, `flwr-home`, the SuperLink database and logs.
        nodes: Site name -> node config (`--node-config`), e.g. `{"a": {"site-id": "a"}}`.
        connection: Name of the SuperLink connection in `$FLWR_HOME/config.toml`.
        env: Extra environment variables for every process (added to `os.environ`).
        startup_timeout: Seconds each process may take to come up.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        nodes: Mapping[str, Mapping[str, ConfigValue]],
        connection: str = DEFAULT_CONNECTION,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        if not nodes:
            raise ValueError("nodes is empty: give at least one site name and its node config")
        for name, node_config in nodes.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise ValueError(f"node name {name!r} must be letters, digits, '.', '_' or '-'")
            config_args(node_config)  # raises ValueError on keys/values Flower cannot carry
        self.workdir = Path(workdir).absolute()
        self.nodes = {name: dict(config) for name, config in nodes.items()}
        self.connection = connection
        self.startup_timeout = startup_timeout
        self.flwr_home = self.workdir / "flwr-home"
        self.port = 0
        self.node_ids: dict[str, int] = {}
        self._extra_env = dict(env or {})
        self._node_ports: dict[str, int] = {}
        self.credentials: DeploymentCredentials | None = None
        self._superlink: ManagedProcess | None = None
        self._node_processes: dict[str, ManagedProcess] = {}
        self._started: list[ManagedProcess] = []  # every process ever started, restarts too
        self._cli_calls = 0

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
        """Create keys, start the SuperLink, register every node and start it.

        Returns:
            This federation, running, with `node_ids` filled in.

        Raises:
            DeploymentError: The work folder holds an earlier deployment's database, or a
                process failed to start or register.
        """
        database = self.workdir / "superlink" / "state.db"
        if database.exists():
            raise DeploymentError(
                f"{database} already exists: a LocalFederation starts from an empty work "
                "folder; give a new one (or delete the old deployment's folder)"
            )
        try:
            self.credentials = make_deployment_credentials(
                self.workdir, hosts=[HOST, "localhost"], nodes=list(self.nodes)
            )
            self.port = free_port(HOST)
            self._write_flower_config()
            self.start_superlink()
            self._register_nodes()
            for name in self.nodes:
                self.start_node(name, wait=False)
            for name in self.nodes:
                self._wait_accepted(self.node_process(name))
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
    def processes(self) -> list[ManagedProcess]:
        """Every process started so far (running or not; restarted ones once per start)."""
        return list(self._started)

    # -- SuperLink -----------------------------------------------------------------------------

    def start_superlink(self) -> ManagedProcess:
        """Start (or restart) the SuperLink on the same port and database.

        Returns:
            The SuperLink process, listening.

        Raises:
            DeploymentError: It is already running, or did not come up in time.
        """
        if self._superlink is not None and self._superlink.alive:
            raise DeploymentError(f"the SuperLink already runs (pid {self._superlink.pid})")
        folder = self.workdir / "superlink"
        command = [
            _program("flower-superlink"),
            "--ssl-ca-certfile", str(self._creds.ca_cert),
            "--ssl-certfile", str(self._creds.server_cert),
            "--ssl-keyfile", str(self._creds.server_key),
            "--disable-runtime-dependency-installation",
            "--enable-supernode-auth",
            "--database", str(folder / "state.db"),
            "--host", HOST,
            "--port", str(self.port),
        ]  # fmt: skip
        process = ManagedProcess(
            command, name="superlink", log_path=folder / "superlink.log", env=self.env, cwd=folder
        )
        self._superlink = self._start(process)
        process.wait_for_port(HOST, self.port, timeout=self.startup_timeout)
        return process

    def stop_superlink(self) -> None:
        """Stop the SuperLink gracefully (nodes keep running and retry to connect)."""
        if self._superlink is not None:
            self._superlink.stop()

    # -- SuperNodes ----------------------------------------------------------------------------

    def start_node(
        self, name: str, *, wait: bool = True, retry_refused_s: float = 0.0
    ) -> ManagedProcess:
        """Start (or restart) the SuperNode of a registered site.

        Args:
            name: The site name given in `nodes`.
            wait: Wait until the SuperLink has accepted the node.
            retry_refused_s: Keep restarting a refused node for this many seconds: the
                SuperLink refuses a node it still counts as online (see `kill_node`).

        Returns:
            The SuperNode process.

        Raises:
            KeyError: `name` is not one of the federation's nodes.
            NodeRefusedError: The SuperLink refused the node (Flower exit code 305).
            DeploymentError: It already runs, or it did not connect in time.
        """
        if name not in self.nodes:
            raise KeyError(f"unknown node {name!r}; nodes are {sorted(self.nodes)}")
        running = self._node_processes.get(name)
        if running is not None and running.alive:
            raise DeploymentError(f"node {name} already runs (pid {running.pid})")
        deadline = time.monotonic() + retry_refused_s
        while True:
            key = self._creds.node_keys[name][0]
            process = self._supernode(name, key=key, config=self.nodes[name])
            self._node_processes[name] = self._start(process)
            if not wait:
                return process
            try:
                self._wait_accepted(process)
                return process
            except NodeRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(_REFUSED_PAUSE_S)

    def kill_node(self, name: str) -> None:
        """SIGKILL the node `name` and its children at once, as a crash of its host would.

        The SuperLink counts the node online until its heartbeats lapse (up to 2 x 30 s in
        Flower 1.42) and refuses to activate it again before then (NodeRefusedError from
        `start_node`). A graceful `stop_node` does not reliably deactivate it either.
        """
        self.node_process(name).kill()

    def stop_node(self, name: str) -> None:
        """Stop the node `name` gracefully (SIGTERM, then SIGKILL after a grace period)."""
        self.node_process(name).stop()

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

    def start_unregistered_node(
        self, name: str, *, node_config: Mapping[str, ConfigValue] | None = None
    ) -> ManagedProcess:
        """Start a SuperNode with a fresh key that was never registered (it must be refused).

        Args:
            name: A name for its key and log file.
            node_config: Its node config (default: `site-id=<name>`).

        Returns:
            The process, started. The SuperLink refuses it: it exits with status 1 and logs
            Flower's exit code 305 (read it with `flower_exit_code(process.read_log())`).
        """
        private_key, _ = make_node_keypair(self.workdir / "keys" / "unregistered", name)
        process = self._supernode(
            f"unregistered-{name}", key=private_key, config=node_config or {"site-id": name}
        )
        return self._start(process)

    # -- runs ----------------------------------------------------------------------------------

    def run(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        timeout: float,
    ) -> RunResult:
        """Run a Flower app with `flwr run --stream` and return its outcome.

        Args:
            app_dir: Folder with the app's `pyproject.toml` (see `write_app_project`).
            run_config: Overrides of the app's run config.
            timeout: Seconds the run may take, from `flwr run` start to exit.

        Returns:
            Exit status, output, run id and the run's final status.

        Raises:
            DeploymentError: The run did not finish within `timeout`; `flwr run` and the run
                itself (`flwr stop`) were stopped first.
        """
        command = [_program("flwr"), "run", str(Path(app_dir).absolute()), self.connection]
        command.append("--stream")
        if run_config:
            command += ["--run-config", config_args(run_config)]
        process = self._cli(command, name="flwr run")
        started = time.monotonic()
        try:
            returncode = process.wait(timeout=timeout)
        except DeploymentError as err:
            process.stop(grace=3.0)
            run_id = parse_run_id(process.read_log())
            if run_id is not None:  # else the ServerApp would go on running in the SuperLink
                stop = [_program("flwr"), "stop", str(run_id), self.connection]
                self._cli_output([*stop, "--format", "json"], name=f"flwr stop {run_id}")
            raise DeploymentError(
                f"flwr run of {app_dir} (run {run_id}) did not finish within {timeout:g} s "
                f"and was stopped; output ends with:\n{process.log_tail()}"
            ) from err
        wall = time.monotonic() - started
        output = process.read_log()
        run_id = parse_run_id(output)
        status, details = self.run_status(run_id) if run_id is not None else (None, "")
        return RunResult(returncode, output, run_id, status, details, wall)

    def run_status(self, run_id: int) -> tuple[str, str]:
        """Ask the SuperLink for a run's status (`flwr ls --run-id`).

        Args:
            run_id: The run id printed by `flwr run`.

        Returns:
            The status (e.g. `finished:completed`) and Flower's details (empty if none).

        Raises:
            DeploymentError: The command failed or printed no status.
        """
        command = [_program("flwr"), "ls", self.connection, "--run-id", str(run_id)]
        output = self._cli_output([*command, "--format", "json"], name=f"flwr ls {run_id}")
        runs = output.get("runs")
        if not isinstance(runs, list) or not runs:
            raise DeploymentError(f"flwr ls printed no run {run_id}: {output}")
        details = str(runs[0].get("status-details", ""))
        return str(runs[0]["status"]), "" if details == "N/A" else details

    # -- helpers -------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process this federation starts."""
        env = dict(os.environ)
        env.update(self._extra_env)
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_TELEMETRY_ENABLED"] = "0"  # no network: telemetry would only time out
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        return env

    @property
    def _creds(self) -> DeploymentCredentials:
        if self.credentials is None:
            raise DeploymentError("no credentials yet: call start() first")
        return self.credentials

    def _write_flower_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        text = flower_config_toml(
            self.connection, address=f"{HOST}:{self.port}", root_certificates=self._creds.ca_cert
        )
        (self.flwr_home / "config.toml").write_text(text, encoding="utf-8")

    def _register_nodes(self) -> None:
        # One `flwr` process per node at once: each spends about 2 s importing Flower.
        started = {}
        for name in self.nodes:
            public_key = self._creds.node_keys[name][1]
            command = [_program("flwr"), "supernode", "register", str(public_key)]
            command += [self.connection, "--name", name, "--format", "json"]
            started[name] = self._cli(command, name=f"register {name}")
        for name, process in started.items():
            result = _json_result(process, timeout=_CLI_TIMEOUT_S)
            self.node_ids[name] = int(str(result["node-id"]))

    def _supernode(
        self, name: str, *, key: Path, config: Mapping[str, ConfigValue]
    ) -> ManagedProcess:
        port = self._node_ports.setdefault(name, free_port(HOST))
        folder = self.workdir / "nodes" / name
        command = [
            _program("flower-supernode"),
            "--root-certificates", str(self._creds.ca_cert),
            "--superlink", f"{HOST}:{self.port}",
            "--host", HOST,
            "--port", str(port),
            "--auth-supernode-private-key", str(key),
        ]  # fmt: skip
        if config:
            command += ["--node-config", config_args(config)]
        return ManagedProcess(
            command,
            name=f"node {name}",
            log_path=folder / "supernode.log",
            env=self.env,
            cwd=folder,
        )

    def _wait_accepted(self, process: ManagedProcess) -> None:
        try:
            process.wait_for_log(_NODE_READY, timeout=self.startup_timeout)
        except DeploymentError as err:
            if flower_exit_code(process.read_log()) == EXIT_CODE_NODE_REFUSED:
                raise NodeRefusedError(
                    f"the SuperLink refused {process.name} (Flower exit code 305): its key is "
                    "not registered (`flwr supernode register`), or the SuperLink still counts "
                    f"it online after a crash (retry after 60 s); log: {process.log_path}"
                ) from err
            raise

    def _start(self, process: ManagedProcess) -> ManagedProcess:
        self._started.append(process)
        return process.start()

    def _cli(self, command: list[str], *, name: str) -> ManagedProcess:
        """Start a `flwr` command; each call gets its own numbered log file under `cli/`."""
        self._cli_calls += 1
        log = f"{self._cli_calls:03d}-" + re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".log"
        folder = self.workdir / "cli"
        process = ManagedProcess(
            command, name=name, log_path=folder / log, env=self.env, cwd=folder
        )
        return self._start(process)

    def _cli_output(self, command: list[str], *, name: str) -> dict[str, object]:
        return _json_result(self._cli(command, name=name), timeout=_CLI_TIMEOUT_S)


def _json_result(process: ManagedProcess, *, timeout: float) -> dict[str, object]:
    """Wait for a `flwr ... --format json` command and return the JSON it printed."""
    returncode = process.wait(timeout=timeout)
    return parse_cli_json(process.read_log(), returncode=returncode, command=process.name)


def _program(name: str) -> str:
    """The path of a Flower console script next to this interpreter, else the bare name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
