"""``fedfew node ...`` and ``fedfew server ...``: provision and run a real deployment.

The logic lives in ``federation/deploy/provisioning.py`` (a hospital node) and
``federation/deploy/server_provisioning.py`` (the SuperLink); this module wires it to Typer and runs
Flower's processes in the foreground: their output goes to stdout (and to a log file), and
Ctrl-C or SIGTERM stops them with every child they started (``federation/deploy/processes.py``).

Registered in ``app/cli.py`` as ``fedfew node`` and ``fedfew server``.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import typer
from flwr.common.config import parse_config_args

from federation.deploy.certificates import NODE_PUBLIC_KEY_SUFFIX
from federation.deploy.deployment_checks import CONNECTION, inspect_data
from federation.deploy.flower_project import STATUS_COMPLETED, flower_exit_code
from federation.deploy.processes import ManagedProcess
from federation.deploy.provisioning import (
    DEFAULT_BUDGET_DELTA,
    DEFAULT_NODE_PORT,
    check_node_file,
    init_node,
    rotate_node_key,
)
from federation.deploy.server_provisioning import (
    DEFAULT_BIND,
    DEFAULT_SUPERLINK_PORT,
    SERVER_FILE,
    check_server_file,
    flwr_json,
    init_server,
    read_server_file,
    renew_server_certificate,
    run_config_values,
)
from federation.deploy.services import (
    NODE_READY,
    check_node_exit,
    follow,
    release_node,
    remember_node_id,
    run_process,
    superlink_process,
    supernode_process,
    wait_run,
)
from federation.errors import DeploymentError

KEY_PREFIX = "ecdsa-sha2-nistp384 "  # an OpenSSH P-384 public key line

node_app = typer.Typer(
    help="A hospital node: provision it (config, key, data check), check it, run its SuperNode.",
    no_args_is_help=True,
)
server_app = typer.Typer(
    help="The federation server: CA and certificates, SuperLink, node registration, runs.",
    no_args_is_help=True,
)

NodeConfigOption = typer.Option(..., "--config", help="The node.toml written by `node init`.")
ServerConfigOption = typer.Option(
    ..., "--config", help=f"The {SERVER_FILE} written by `fedfew server init`."
)


# -- node ---------------------------------------------------------------------------------------


@node_app.command("init")
def node_init(
    site: str = typer.Option(..., "--site", help="This site's name, e.g. hospital-a."),
    data: Path = typer.Option(..., "--data", help=".npz, folder of class subfolders, or CSV."),
    superlink: str = typer.Option(..., "--superlink", help="The SuperLink's HOST:PORT."),
    ca: Path = typer.Option(..., "--ca", help="The federation's ca.crt (from the operator)."),
    budget_epsilon: float | None = typer.Option(
        None, "--budget-epsilon", help="Required: the site's total epsilon cap (no default)."
    ),
    budget_delta: float = typer.Option(
        DEFAULT_BUDGET_DELTA, "--budget-delta", help="Delta of every charge; < 1/patients."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for node.toml, ca.crt and the key pair."),
    state: Path | None = typer.Option(
        None, "--state", help="Folder of ledger, registry and logs (default OUT/state)."
    ),
    node_port: int = typer.Option(
        DEFAULT_NODE_PORT, "--node-port", help="This SuperNode's local Runtime API port."
    ),
    allowed_mechanisms: str | None = typer.Option(
        None,
        "--allowed-mechanisms",
        help="DP mechanisms this site runs, comma-separated (default: dp-episodic only).",
    ),
    max_sample_rate: float | None = typer.Option(
        None, "--max-sample-rate", help="Largest sampling rate q a plan may use (default 0.2)."
    ),
    secure_aggregation: str | None = typer.Option(
        None,
        "--secure-aggregation",
        help="allowed (default) | required | forbidden: secure aggregation of this site's updates.",
    ),
) -> None:
    """Write a site's node.toml and key pair, check its data, and print what to register."""
    given = {
        "allowed-mechanisms": allowed_mechanisms,
        "max-sample-rate": max_sample_rate,
        "secure-aggregation": secure_aggregation,
    }
    made = init_node(
        out,
        site=site,
        data=data,
        superlink=superlink,
        ca=ca,
        budget_epsilon=budget_epsilon,
        budget_delta=budget_delta,
        port=node_port,
        state_dir=state,
        policy={key: value for key, value in given.items() if value is not None},
    )
    node_file = made.node_file
    summary = made.data
    classes = ", ".join(f"{name} {count}" for name, count in summary.counts.items())
    key = node_file.connection.key
    typer.echo(
        f"data {summary.path}: {summary.total} images of {summary.patients} patients in "
        f"{len(summary.counts)} classes ({classes})"
    )
    typer.echo(
        f"ledger {node_file.node.ledger}: cap epsilon {node_file.node.budget_epsilon:g} at "
        f"delta {node_file.node.budget_delta:g} (fixed for this ledger)"
    )
    typer.echo(f"wrote {node_file.path}, {node_file.connection.ca} and key {key} (+ .pub)")
    _echo_registration(site, made.public_key_line, key)
    typer.echo(f"then start the node:\n  fedfew node run --config {node_file.path}")


@node_app.command("check")
def node_check(config: Path = NodeConfigOption) -> None:
    """Check node.toml, CA, key, ledger, and load the data once (images per class)."""
    node_file = check_node_file(config)
    summary = inspect_data(node_file.node.data)
    classes = ", ".join(f"{name} {count}" for name, count in summary.counts.items())
    typer.echo(
        f"node {node_file.node.site_id} ok: CA, key and ledger checked; data "
        f"{summary.total} images in {len(summary.counts)} classes ({classes})"
    )


@node_app.command("run")
def node_run(config: Path = NodeConfigOption) -> None:
    """Check node.toml, then run the SuperNode in the foreground (Ctrl-C stops it).

    A restart right after a crash or a stop is accepted at once: the node first releases the
    activation the SuperLink still holds for it (`release_node`).
    """
    node_file = check_node_file(config)
    if release_node(node_file):
        typer.echo(f"released node {node_file.node.site_id}'s previous activation on the SuperLink")
    process = supernode_process(node_file)
    typer.echo(
        f"starting SuperNode {node_file.node.site_id} -> {node_file.connection.superlink} "
        f"(TLS, key {node_file.connection.key}); log {process.log_path}; Ctrl-C stops it"
    )
    pending: list[str] = []  # output up to this start's acceptance

    def sink(text: str) -> None:
        _echo_output(text)
        if pending is not None and NODE_READY not in "".join(pending):
            pending.append(text)
            if NODE_READY in "".join(pending):  # keep its node id for the next restart
                remember_node_id(node_file, "".join(pending))

    log = _foreground(process, sink=sink)
    check_node_exit(node_file, process, log)


@node_app.command("rotate-key")
def node_rotate_key(config: Path = NodeConfigOption) -> None:
    """Replace the node's key pair (the old one moves to retired/); register the new one."""
    connection = rotate_node_key(config)
    site = connection.key.name
    line = connection.public_key.read_text(encoding="utf-8").strip()
    typer.echo(f"new key {connection.key}; the old pair is in {connection.key.parent / 'retired'}")
    _echo_registration(site, line, connection.key)
    typer.echo(
        "then restart the node (`fedfew node run`), and have the operator remove the old "
        "registration: `fedfew server nodes` lists node ids, `fedfew server unregister ID`"
    )


def _echo_registration(site: str, line: str, key: Path) -> None:
    public = key.with_name(key.name + NODE_PUBLIC_KEY_SUFFIX)
    typer.echo(f"public key of {site} (send it to the federation operator):\n{line}")
    typer.echo(
        "the operator registers it on the SuperLink host with:\n"
        f'  fedfew server register --config {SERVER_FILE} "{line}" --name {site}\n'
        f"or with Flower's CLI (the key saved as {public.name}):\n"
        f"  flwr supernode register {public.name} {CONNECTION} --name {site}"
    )


# -- server -------------------------------------------------------------------------------------


@server_app.command("init")
def server_init(
    out: Path = typer.Option(..., "--out", help="The server's folder (certs, config, app)."),
    host: list[str] | None = typer.Option(
        None, "--host", help="A name or address nodes dial (repeat); 127.0.0.1 always added."
    ),
    port: int = typer.Option(DEFAULT_SUPERLINK_PORT, "--port", help="The SuperLink's port."),
    bind: str = typer.Option(DEFAULT_BIND, "--bind", help="The address it listens on."),
    state: Path | None = typer.Option(
        None, "--state", help="Folder of database, checkpoint, registry, logs (OUT/state)."
    ),
    federation: str = typer.Option("fedfew", "--federation", help="The federation's name."),
) -> None:
    """Create the CA, the SuperLink's certificate, server.toml, the Flower app and run.toml."""
    server = init_server(
        out, hosts=host or (), port=port, bind=bind, state_dir=state, federation=federation
    )
    typer.echo(f"CA {server.ca_cert} (give it to every site; keep {server.ca_key.name} offline)")
    typer.echo(f"server certificate {server.server_cert} for {', '.join(server.hosts)}")
    typer.echo(f"run config {server.run_config} (edit it), app {server.app}")
    typer.echo(f"start the SuperLink:\n  fedfew server run --config {server.path}")


@server_app.command("run")
def server_run(config: Path = ServerConfigOption) -> None:
    """Check certificates, then run the SuperLink in the foreground (Ctrl-C stops it)."""
    server = check_server_file(config)
    process = superlink_process(server)
    typer.echo(
        f"starting the SuperLink on {server.bind}:{server.port} (TLS, node authentication, "
        f"database {server.database}); log {process.log_path}; Ctrl-C stops it"
    )
    log = _foreground(process, sink=_echo_output)
    if process.returncode != 0:
        raise DeploymentError(
            f"flower-superlink exited with status {process.returncode} (Flower exit code "
            f"{flower_exit_code(log)}); see the output above or {process.log_path}"
        )


@server_app.command("register")
def server_register(
    public_key: str = typer.Argument(..., help="The node's .pub file, or the key line itself."),
    name: str = typer.Option(..., "--name", help="The site's name."),
    config: Path = ServerConfigOption,
) -> None:
    """Register a node's public key on the running SuperLink (`flwr supernode register`)."""
    server = read_server_file(config)
    with tempfile.TemporaryDirectory() as folder:
        key_file = _public_key_file(public_key, Path(folder), name)
        result = flwr_json(
            server, ["supernode", "register", str(key_file), CONNECTION, "--name", name]
        )
    typer.echo(f"registered {name} as node {result.get('node-id')}; it may connect now")


@server_app.command("nodes")
def server_nodes(config: Path = ServerConfigOption) -> None:
    """List the registered nodes (`flwr supernode list`)."""
    result = flwr_json(read_server_file(config), ["supernode", "list", CONNECTION])
    nodes = result.get("nodes")
    for node in nodes if isinstance(nodes, list) else []:
        typer.echo(
            f"node {node.get('node-id')}  {node.get('owner-name') or '-'}  {node.get('status')}"
            f"  registered {node.get('created-at')}  online since {node.get('online-at') or '-'}"
        )


@server_app.command("unregister")
def server_unregister(
    node_id: int = typer.Argument(..., help="The node id (`fedfew server nodes`)."),
    config: Path = ServerConfigOption,
) -> None:
    """Remove a node's registration (e.g. after a key rotation)."""
    flwr_json(read_server_file(config), ["supernode", "unregister", str(node_id), CONNECTION])
    typer.echo(f"node {node_id} unregistered")


@server_app.command("renew-cert")
def server_renew_cert(
    config: Path = ServerConfigOption,
    days: int = typer.Option(365, "--days", help="Validity of the new certificate."),
) -> None:
    """Issue a new SuperLink certificate (same CA, same hosts); restart the SuperLink after."""
    cert, _ = renew_server_certificate(config, validity_days=days)
    typer.echo(f"new server certificate {cert}: restart the SuperLink (`fedfew server run`)")


@server_app.command("start-run")
def server_start_run(
    config: Path = ServerConfigOption,
    run_config: str | None = typer.Option(
        None, "--run-config", help="Overrides of run.toml, e.g. 'num-rounds=5 local-steps=20'."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", help="Seconds before the run is stopped (default: none)."
    ),
) -> None:
    """Start a federated run (`flwr run --stream`) and report its real final status."""
    server = read_server_file(config)
    values = run_config_values(server, parse_config_args([run_config]) if run_config else None)
    process = run_process(server, values)
    try:
        result = wait_run(server, process, timeout=timeout, sink=_echo_output)
    except KeyboardInterrupt:
        typer.echo(f"{process.name} stopped", err=True)
        raise typer.Exit(130) from None
    if result.run_id is None:
        raise DeploymentError(
            f"flwr run started no run (exit status {result.returncode}); see the output above"
        )
    if result.status != STATUS_COMPLETED:
        raise DeploymentError(
            f"run {result.run_id} ended with status {result.status!r}: "
            f"{result.status_details or 'no details'}; see the output above and "
            f"{server.log_dir / 'superlink.log'}"
        )
    typer.echo(f"run {result.run_id} {result.status}")


def _public_key_file(value: str, folder: Path, name: str) -> Path:
    if value.startswith(KEY_PREFIX):
        path = folder / f"{name}{NODE_PUBLIC_KEY_SUFFIX}"
        path.write_text(value.strip() + "\n", encoding="utf-8")
        return path
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(
            f"public key {value!r} is neither a file nor a key line starting with "
            f"'{KEY_PREFIX.strip()}': give the .pub file the site sent, or paste its line"
        )
    return path


# -- foreground processes -----------------------------------------------------------------------


def _echo_output(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _foreground(process: ManagedProcess, *, sink: Callable[[str], None]) -> str:
    """`follow` a service in the foreground; Ctrl-C stops it with its children (exit 130)."""
    try:
        return follow(process, sink=sink)
    except KeyboardInterrupt:
        typer.echo(f"{process.name} stopped", err=True)
        raise typer.Exit(130) from None
