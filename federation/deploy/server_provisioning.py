"""The federation server's deployment files: what `fedfew server init` writes and what
`fedfew server run | register | start-run` read.

`server init --out DIR` writes:

- `certs/`: the CA (`ca.crt`, `ca.key`: keep the key offline once certificates are issued) and
  the SuperLink's certificate (`server.pem`, `server.key`) for the given host names plus
  127.0.0.1 and localhost (the SuperLink's own helpers dial 127.0.0.1);
- `server.toml`: a `[superlink]` table: bind address, port, host names, certificate paths,
  database, app folder, run config, `FLWR_HOME`; relative paths are relative to its folder;
- `app/pyproject.toml`: the Flower app (`federation.server_app:app`, `federation.client_app:app`);
- `run.toml`: the federation's run config (`ServerConfig`, kebab-case), which the operator edits;
- `state/` (or `--state`): the SuperLink's database, the server's checkpoint and registry, logs,
  and `flwr-home/` (`FLWR_HOME`: Flower's installed apps and the `flwr` CLI's connection,
  rewritten by every command that calls `flwr`). Only this folder must be writable at run time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509

from federation.deploy.certificates import (
    CA_KEY_FILE,
    DEFAULT_VALIDITY_DAYS,
    check_certificate,
    check_validity,
    make_ca,
    make_server_certificate,
)
from federation.deploy.deployment_checks import (
    CONNECTION,
    FLOWER_HOME_DIR,
    LOG_DIR,
    check_ca_certificate,
    flower_env,
    flower_program,
    read_toml,
    relative_path,
    resolve_path,
)
from federation.deploy.flower_project import (
    ConfigValue,
    config_args,
    flower_config_toml,
    parse_cli_json,
    write_app_project,
)
from federation.errors import CertificateError, DeploymentError, ProvisioningError
from federation.server_config import ServerConfig
from models.run_config import flatten_tables, nest_keys

SERVER_FILE = "server.toml"
SERVER_TABLE = "superlink"
RUN_CONFIG_FILE = "run.toml"
APP_DIR = "app"
CERTS_DIR = "certs"
STATE_DIR = "state"
DATABASE_FILE = "superlink.db"
SERVER_WORKDIR = "server"  # ServerConfig.workdir: checkpoint, registry, status.json
SERVER_APP = "federation.server_app:app"
CLIENT_APP = "federation.client_app:app"
DEFAULT_SUPERLINK_PORT = 9092  # Flower's historic Fleet API port; 1.42 serves every API on it
DEFAULT_BIND = "0.0.0.0"  # SuperNodes dial in from other hosts; Flower's default is 127.0.0.1
LOCAL_HOSTS = ("127.0.0.1", "localhost")  # the SuperLink's helpers and the flwr CLI dial these
CLI_TIMEOUT_S = 120.0  # one `flwr` command imports Flower (2-5 s) and makes one call


@dataclass(frozen=True)
class ServerFile:
    """A parsed `server.toml` (every path absolute)."""

    path: Path
    bind: str
    port: int
    hosts: tuple[str, ...]
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    database: Path
    app: Path
    run_config: Path
    flwr_home: Path

    @property
    def address(self) -> str:
        """Where the `flwr` CLI on the SuperLink's host dials it."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        """Logs of the SuperLink and of `flwr` commands, beside the database."""
        return self.database.parent / LOG_DIR


def init_server(
    out_dir: Path,
    *,
    hosts: Sequence[str] = (),
    port: int = DEFAULT_SUPERLINK_PORT,
    bind: str = DEFAULT_BIND,
    state_dir: Path | None = None,
    federation: str = ServerConfig.federation,
) -> ServerFile:
    """Create the CA, the SuperLink's certificate, server.toml, the app and its run config.

    Args:
        out_dir: The server's folder (refused if it already holds a server.toml).
        hosts: Names and addresses SuperNodes dial; 127.0.0.1 and localhost are always added.
        port: The SuperLink's port (all its APIs).
        bind: The address it listens on.
        state_dir: Folder of the database, the server's checkpoint and registry, and logs
            (default `out_dir/state`).
        federation: The federation's name (ledger charges and checkpoints carry it).

    Returns:
        The written server file, parsed.

    Raises:
        ProvisioningError: `out_dir` already holds a server, or the port is out of range.
    """
    if not 0 < port < 65536:
        raise ProvisioningError(f"--port {port} is not a TCP port (1-65535)")
    out = Path(out_dir).absolute()
    config_path = out / SERVER_FILE
    if config_path.exists() or (out / CERTS_DIR / CA_KEY_FILE).exists():
        raise ProvisioningError(
            f"{out} already holds a server (server.toml or a CA key): its CA signs every "
            "node's trust; renew only the server certificate with `fedfew server renew-cert "
            f"--config {config_path}`, or give a new --out to start a new federation"
        )
    names = tuple(dict.fromkeys([*hosts, *LOCAL_HOSTS]))  # given names first: CN = hosts[0]
    ca_cert, ca_key = make_ca(out / CERTS_DIR, common_name=f"{federation} CA")
    server_cert, server_key = make_server_certificate(
        out / CERTS_DIR, ca_cert=ca_cert, ca_key=ca_key, hosts=names
    )
    state = Path(state_dir).absolute() if state_dir is not None else out / STATE_DIR
    run = ServerConfig(federation=federation, workdir=str(state / SERVER_WORKDIR)).to_dict()
    write_app_project(out / APP_DIR, serverapp=SERVER_APP, clientapp=CLIENT_APP, config=run)
    run_header = (
        "# The federation's run config (ServerConfig in federation/server_config.py).\n"
        "# Edit it, then `fedfew server start-run`; every key is checked before the run starts.\n"
    )
    (out / RUN_CONFIG_FILE).write_text(run_header + tomli_w.dumps(nest_keys(run)), encoding="utf-8")
    values: dict[str, Any] = {
        "bind": bind,
        "port": port,
        "hosts": list(names),
        "ca-cert": relative_path(ca_cert, out),
        "ca-key": relative_path(ca_key, out),
        "server-cert": relative_path(server_cert, out),
        "server-key": relative_path(server_key, out),
        "database": relative_path(state / DATABASE_FILE, out),
        "app": APP_DIR,
        "run-config": RUN_CONFIG_FILE,
        "flwr-home": relative_path(state / FLOWER_HOME_DIR, out),  # Flower writes FABs there
    }
    header = "# Written by `fedfew server init`; relative paths are relative to this folder.\n"
    config_path.write_text(header + tomli_w.dumps({SERVER_TABLE: values}), encoding="utf-8")
    server = read_server_file(config_path)
    write_flower_home(server)
    return server


def read_server_file(path: Path) -> ServerFile:
    """Parse `server.toml`.

    Raises:
        ProvisioningError: missing, malformed, or a key is missing or of the wrong type.
    """
    path = Path(path).absolute()
    table = read_toml(path, made_by="fedfew server init --out DIR").get(SERVER_TABLE)
    if not isinstance(table, dict):
        raise ProvisioningError(f"{path} has no [{SERVER_TABLE}] table: rerun `fedfew server init`")
    paths = ("ca-cert", "ca-key", "server-cert", "server-key", "database", "app", "run-config")
    missing = [key for key in ("port", "hosts", *paths, "flwr-home") if key not in table]
    if missing:
        raise ProvisioningError(
            f"{path}: [{SERVER_TABLE}] lacks {', '.join(missing)}: add them or rerun "
            "`fedfew server init` in a new folder"
        )
    port = table["port"]
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ProvisioningError(f"{path}: port {port!r} is not a TCP port (1-65535)")
    hosts = table["hosts"]
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise ProvisioningError(f"{path}: hosts {hosts!r} must be a list of names")
    folder = path.parent
    return ServerFile(
        path=path,
        bind=str(table.get("bind", DEFAULT_BIND)),
        port=port,
        hosts=tuple(hosts),
        ca_cert=resolve_path(table["ca-cert"], folder),
        ca_key=resolve_path(table["ca-key"], folder),
        server_cert=resolve_path(table["server-cert"], folder),
        server_key=resolve_path(table["server-key"], folder),
        database=resolve_path(table["database"], folder),
        app=resolve_path(table["app"], folder),
        run_config=resolve_path(table["run-config"], folder),
        flwr_home=resolve_path(table["flwr-home"], folder),
    )


def check_server_file(path: Path, *, now: dt.datetime | None = None) -> ServerFile:
    """Everything `fedfew server run` checks before it starts `flower-superlink`.

    Raises:
        ProvisioningError, CertificateError: the first problem found, with its fix.
    """
    server = read_server_file(path)
    check_ca_certificate(server.ca_cert, now=now)
    renew = (
        f"run `fedfew server renew-cert --config {server.path}` where the CA key is, then "
        "start the SuperLink again"
    )
    moment = now or dt.datetime.now(dt.UTC)
    issued = _readable_certificate(server.server_cert)
    if issued is not None:  # an unreadable one: check_certificate says why
        check_validity(
            issued, server.server_cert, now=moment, what="server certificate", renew=renew
        )
    try:
        check_certificate(server.server_cert, ca=server.ca_cert, now=moment)
    except CertificateError as err:
        raise CertificateError(f"{err}; or {renew}") from err
    if not server.server_key.is_file():
        raise CertificateError(
            f"server key {server.server_key} does not exist: run `fedfew server renew-cert "
            f"--config {server.path}` to issue a new certificate and key"
        )
    server.database.parent.mkdir(parents=True, exist_ok=True)
    return server


def renew_server_certificate(
    path: Path, *, validity_days: int = DEFAULT_VALIDITY_DAYS
) -> tuple[Path, Path]:
    """Issue a new SuperLink certificate and key for the same hosts with the same CA.

    Raises:
        CertificateError: the CA key is not on this machine.
    """
    server = read_server_file(path)
    if not server.ca_key.is_file():
        raise CertificateError(
            f"CA key {server.ca_key} is not here: renew on the machine that keeps the CA key "
            "and copy server.pem and server.key back"
        )
    return make_server_certificate(
        server.server_cert.parent,
        ca_cert=server.ca_cert,
        ca_key=server.ca_key,
        hosts=server.hosts,
        validity_days=validity_days,
    )


def superlink_command(server: ServerFile) -> list[str]:
    """The `flower-superlink` command line: TLS, node authentication, a database, no uv sync."""
    return [
        flower_program("flower-superlink"),
        "--ssl-ca-certfile", str(server.ca_cert),
        "--ssl-certfile", str(server.server_cert),
        "--ssl-keyfile", str(server.server_key),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(server.database),
        "--host", server.bind,
        "--port", str(server.port),
    ]  # fmt: skip


def write_flower_home(server: ServerFile) -> Path:
    """Write `$FLWR_HOME/config.toml` with the connection `fedfew` to this SuperLink."""
    server.flwr_home.mkdir(parents=True, exist_ok=True)
    text = flower_config_toml(CONNECTION, address=server.address, root_certificates=server.ca_cert)
    target = server.flwr_home / "config.toml"
    # Atomic: `flwr` commands started at the same time read it while the next one rewrites it.
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)
    return target


def server_env(server: ServerFile, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the SuperLink and of `flwr` commands for this server.

    Args:
        server: The server file.
        base: Environment to start from (default: this process's).
    """
    return flower_env(server.flwr_home, base)


def run_config_values(
    server: ServerFile, overrides: Mapping[str, ConfigValue] | None = None
) -> dict[str, ConfigValue]:
    """The run config to send: `run.toml` with `overrides`, checked against `ServerConfig`.

    Raises:
        ProvisioningError: unreadable file or an unknown key.
        ValueError: a value of the wrong type or out of range (names the key).
    """
    values = flatten_tables(read_toml(server.run_config, made_by="fedfew server init"))
    values.update(overrides or {})
    known = ServerConfig().to_dict()
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ProvisioningError(
            f"{server.run_config} or --run-config: unknown run config key(s) "
            f"{', '.join(unknown)}; known: {', '.join(known)}"
        )
    ServerConfig.from_run_config(values)  # raises ValueError naming the key
    return {key: value for key, value in values.items() if isinstance(value, ConfigValue)}


def run_command(
    server: ServerFile, values: Mapping[str, ConfigValue], *, app: Path | None = None
) -> list[str]:
    """The `flwr run <app> fedfew --stream --run-config ...` command line.

    Args:
        server: The server file.
        values: The run config to send (none: the app's defaults).
        app: The Flower app folder (default: the server's `app/`).
    """
    folder = server.app if app is None else app
    command = [flower_program("flwr"), "run", str(folder), CONNECTION, "--stream"]
    return [*command, "--run-config", config_args(values)] if values else command


def flwr_json(server: ServerFile, arguments: Sequence[str]) -> dict[str, object]:
    """Run one `flwr` command against this SuperLink with `--format json`; return its JSON.

    Args:
        server: The server file (its `FLWR_HOME` config is rewritten first).
        arguments: What follows `flwr`, e.g. `["supernode", "list", "fedfew"]`.

    Raises:
        DeploymentError: it failed (Flower's message included) or ran over time.
    """
    write_flower_home(server)
    command = [flower_program("flwr"), *arguments, "--format", "json"]
    try:
        done = subprocess.run(
            command,
            env=server_env(server),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(
            f"`flwr {' '.join(arguments)}` did not answer within {CLI_TIMEOUT_S:g} s: is the "
            f"SuperLink running (`fedfew server run --config {server.path}`)?"
        ) from err
    output = done.stdout + done.stderr
    try:
        return parse_cli_json(output, returncode=done.returncode, command=f"flwr {arguments[0]}")
    except DeploymentError as err:
        reason = _flower_error(output)
        if reason is None:
            raise
        raise DeploymentError(
            f"`flwr {' '.join(arguments)}` failed: {reason} (is the SuperLink running: "
            f"`fedfew server run --config {server.path}`?)"
        ) from err


def _readable_certificate(path: Path) -> x509.Certificate | None:
    """The certificate in ``path``, or None if it cannot be read (check_certificate says why)."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _flower_error(output: str) -> str | None:
    """Flower's `error-message` from a failed `--format json` command, on one line."""
    start = output.find("{")
    try:
        result = json.JSONDecoder().raw_decode(output, start)[0] if start >= 0 else None
    except json.JSONDecodeError:
        return None
    message = result.get("error-message") if isinstance(result, dict) else None
    return " ".join(str(message).split()) if message else None


def run_status(server: ServerFile, run_id: int) -> tuple[str, str]:
    """A run's status (e.g. `finished:completed`) and Flower's details, from `flwr ls`."""
    output = flwr_json(server, ["ls", CONNECTION, "--run-id", str(run_id)])
    runs = output.get("runs")
    if not isinstance(runs, list) or not runs:
        raise DeploymentError(f"flwr ls printed no run {run_id}: {output}")
    details = str(runs[0].get("status-details", ""))
    return str(runs[0]["status"]), "" if details == "N/A" else details
