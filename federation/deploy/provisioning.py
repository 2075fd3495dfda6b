"""A hospital node's deployment files: what `fedfew node init` writes and `fedfew node run` checks.

`node init` writes one folder per site:

- `node.toml`: a `[node]` table that the ClientApp reads itself (`NodeConfig.from_mapping` with
  `config-file`; it reads nothing else of the file) and a `[connection]` table for
  `flower-supernode`: the SuperLink's address, the CA, the node's key and its Runtime API port;
- `ca.crt`: a copy of the federation's CA, so the folder does not depend on where it came from;
- `<site>` and `<site>.pub`: the node's ECDSA P-384 key pair (OpenSSH formats).

`[node]` paths are absolute (the ClientApp resolves them against a working directory that
Flower chooses); `[connection]` paths are relative to the file's folder, so the folder can be
mounted anywhere (a container, `/etc/fedfew`).

Every check raises a typed error whose message names the file, the value and the fix: the
runbook (`deploy/README.md`) quotes them.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.deploy.certificates import NODE_PUBLIC_KEY_SUFFIX, make_node_keypair
from federation.deploy.deployment_checks import (
    FLOWER_HOME_DIR,
    LOG_DIR,
    DataSummary,
    check_address,
    check_ca_certificate,
    check_site_name,
    flower_env,
    flower_program,
    inspect_data,
    read_toml,
    relative_path,
    resolve_path,
)
from federation.deploy.flower_project import ConfigValue, config_args
from federation.errors import NodeConfigError, ProvisioningError
from federation.node import open_ledger
from federation.node_config import CONFIG_FILE_KEY, NodeConfig
from models.errors import DataError

NODE_FILE = "node.toml"
NODE_TABLE = "node"  # read by NodeConfig.from_mapping
CONNECTION_TABLE = "connection"  # read here only
NODE_CA_FILE = "ca.crt"
LEDGER_FILE = "ledger.db"
REGISTRY_DIR = "registry"
REPLIES_DIR = "node-state"
DEFAULT_BUDGET_DELTA = 1e-5  # below 1/n for any site under 100,000 patients
# The [node] keys of the site's DP policy that `node init` may set (federation/node_config.py
# gives each one's default and meaning); the rest of [node] is made by `node init` itself.
POLICY_KEYS = (
    "allowed-mechanisms",
    "max-sample-rate",
    "min-noise",
    "max-steps-per-round",
    "secure-aggregation",
)
DEFAULT_NODE_PORT = 9094  # flower-supernode's own default Runtime API port


@dataclass(frozen=True)
class NodeConnection:
    """How `flower-supernode` reaches the SuperLink (the `[connection]` table).

    Attributes:
        superlink: The SuperLink's `host:port`, a name its certificate covers.
        ca: The federation's CA certificate.
        key: The node's private key (OpenSSH).
        port: This SuperNode's Runtime API port on 127.0.0.1 (distinct per node on one host).
    """

    superlink: str
    ca: Path
    key: Path
    port: int = DEFAULT_NODE_PORT

    @property
    def public_key(self) -> Path:
        """The public key file beside the private key."""
        return self.key.with_name(self.key.name + NODE_PUBLIC_KEY_SUFFIX)


@dataclass(frozen=True)
class NodeFile:
    """A parsed `node.toml`."""

    path: Path
    node: NodeConfig
    connection: NodeConnection

    @property
    def state_dir(self) -> Path:
        """Folder of the ledger: logs and Flower's own files go beside it."""
        return self.node.ledger.parent


def write_node_file(
    path: Path, *, node: Mapping[str, ConfigValue], connection: NodeConnection
) -> Path:
    """Write `node.toml` (`[node]` and `[connection]`); connection paths relative to its folder.

    Returns:
        The path written.
    """
    path = Path(path)
    folder = path.parent.absolute()
    connection_values: dict[str, ConfigValue] = {
        "superlink": connection.superlink,
        "ca": relative_path(connection.ca, folder),
        "key": relative_path(connection.key, folder),
        "port": connection.port,
    }
    header = (
        "# Written by `fedfew node init`. [node] is this site's own policy: the ClientApp reads\n"
        "# it (budget-epsilon is the site's total privacy cap; the server cannot raise it).\n"
        "# [connection] is read by `fedfew node run`; its paths are relative to this folder.\n"
    )
    tables = {NODE_TABLE: dict(node), CONNECTION_TABLE: connection_values}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + tomli_w.dumps(tables), encoding="utf-8")
    return path


def read_node_file(path: Path) -> NodeFile:
    """Parse `node.toml`.

    Raises:
        ProvisioningError: The file is missing or malformed, or `[connection]` lacks a key.
        NodeConfigError: `[node]` lacks the privacy cap or holds an invalid value.
    """
    path = Path(path).absolute()
    tables = read_toml(path, made_by="fedfew node init --out DIR")
    node_table = tables.get(NODE_TABLE)
    if not isinstance(node_table, dict):
        raise ProvisioningError(f"{path} has no [{NODE_TABLE}] table: rerun `fedfew node init`")
    if "budget-epsilon" not in node_table:
        raise NodeConfigError(
            f"{path}: [{NODE_TABLE}] has no budget-epsilon, the site's total privacy cap; there "
            "is no default: add `budget-epsilon = <epsilon>` (e.g. 8.0) as agreed with the "
            "site's privacy officer"
        )
    node = NodeConfig.from_mapping({CONFIG_FILE_KEY: str(path)})
    table = tables.get(CONNECTION_TABLE)
    if not isinstance(table, dict):
        raise ProvisioningError(
            f"{path} has no [{CONNECTION_TABLE}] table: rerun `fedfew node init`"
        )
    missing = [key for key in ("superlink", "ca", "key") if key not in table]
    if missing:
        raise ProvisioningError(
            f"{path}: [{CONNECTION_TABLE}] lacks {', '.join(missing)}: rerun `fedfew node init`"
        )
    port = table.get("port", DEFAULT_NODE_PORT)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ProvisioningError(f"{path}: [{CONNECTION_TABLE}] port {port!r} is not a TCP port")
    connection = NodeConnection(
        superlink=check_address(str(table["superlink"]), what=f"{path}: superlink"),
        ca=resolve_path(table["ca"], path.parent),
        key=resolve_path(table["key"], path.parent),
        port=port,
    )
    return NodeFile(path=path, node=node, connection=connection)


def check_node_key(key: Path) -> None:
    """Check that the node's private key exists and is an ECDSA P-384 OpenSSH key.

    Raises:
        ProvisioningError: missing, unreadable or another kind of key.
    """
    if not key.is_file():
        raise ProvisioningError(
            f"node key {key} does not exist: run `fedfew node rotate-key --config <node.toml>` "
            "to make a new one, then have the operator register its public key"
        )
    try:
        loaded = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        raise ProvisioningError(
            f"node key {key} is not an unencrypted OpenSSH private key ({err}): make a new one "
            "with `fedfew node rotate-key`"
        ) from err
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp384r1":
        raise ProvisioningError(
            f"node key {key} is not ECDSA P-384, which Flower's node authentication needs: make "
            "a new one with `fedfew node rotate-key`"
        )


def check_node_file(path: Path, *, now: dt.datetime | None = None) -> NodeFile:
    """Everything `fedfew node run` checks before it starts `flower-supernode`.

    The cap is present and valid, the CA is a current CA certificate, the key is usable, the
    data path exists and is readable, and the ledger (created on first use) has this cap.

    Raises:
        ProvisioningError, NodeConfigError, CertificateError, DataError: the first problem found.
    """
    node_file = read_node_file(path)
    check_ca_certificate(node_file.connection.ca, now=now)
    check_node_key(node_file.connection.key)
    data = node_file.node.data
    if not data.exists():
        raise DataError(
            f"data path {data} (data in {node_file.path}) does not exist: mount or copy the "
            "site's training set there, or correct the path in the file"
        )
    if not os.access(data, os.R_OK):
        raise DataError(
            f"data path {data} is not readable by this user (uid {os.getuid()}): grant read "
            "access to the user the node runs as"
        )
    open_ledger(node_file.node)
    return node_file


@dataclass(frozen=True)
class NodeInit:
    """What `init_node` made: the parsed file, the data it checked and the public key line."""

    node_file: NodeFile
    data: DataSummary
    public_key_line: str


def init_node(
    out_dir: Path,
    *,
    site: str,
    data: Path,
    superlink: str,
    ca: Path,
    budget_epsilon: float | None,
    budget_delta: float = DEFAULT_BUDGET_DELTA,
    port: int = DEFAULT_NODE_PORT,
    state_dir: Path | None = None,
    policy: Mapping[str, ConfigValue] | None = None,
    now: dt.datetime | None = None,
) -> NodeInit:
    """Provision a site: check everything first, then create the ledger, key pair and node.toml.

    Args:
        out_dir: Folder for `node.toml`, `ca.crt` and the key pair (refused if it holds a node).
        site: The site's name (also the key's file name and its name on the SuperLink).
        data: The site's training set.
        superlink: The SuperLink's `host:port`.
        ca: The federation's CA certificate (copied into `out_dir`).
        budget_epsilon: The site's total epsilon cap; None is refused (no default cap).
        budget_delta: Delta of every charge; must be below 1 / (patients in the set).
        port: The SuperNode's Runtime API port.
        state_dir: Folder of the ledger, registry and replies (default `out_dir/state`).
        policy: The site's DP policy where it departs from the defaults (:data:`POLICY_KEYS`).
        now: Time for certificate checks (tests).

    Returns:
        The node file, the data summary and the public key line to send to the operator.

    Raises:
        NodeConfigError: no cap, or a cap/delta out of range or unlike an existing ledger's.
        CertificateError: the CA is missing, not a CA, or expired.
        DataError: the data path is missing, empty, unreadable or holds unreadable images.
        ProvisioningError: a bad site name or address, or `out_dir` already holds a node.
    """
    check_site_name(site)
    unknown = sorted(set(policy or {}) - set(POLICY_KEYS))
    if unknown:
        raise ProvisioningError(
            f"{', '.join(unknown)} is not a policy key `node init` sets; it sets "
            f"{', '.join(POLICY_KEYS)}"
        )
    if budget_epsilon is None:
        raise NodeConfigError(
            "no privacy cap given: pass --budget-epsilon E, the total epsilon this site allows "
            "over the whole study (e.g. 8.0), as agreed with its privacy officer; there is no "
            "default, because a default would decide the site's privacy for it"
        )
    check_address(superlink)
    check_ca_certificate(Path(ca), now=now)
    out = Path(out_dir).absolute()
    config_path, key_path = out / NODE_FILE, out / site
    for existing in (config_path, key_path):
        if existing.exists():
            raise ProvisioningError(
                f"{existing} already exists: this folder holds a node already; to replace its "
                "key run `fedfew node rotate-key --config "
                f"{config_path}`, or give another --out"
            )
    summary = inspect_data(Path(data))
    if budget_delta * summary.patients >= 1:
        raise NodeConfigError(
            f"--budget-delta {budget_delta:g} is not below 1/{summary.patients} (1 / patients in "
            f"{summary.path}): such a delta allows a whole record to leak; give a smaller one"
        )
    state = Path(state_dir).absolute() if state_dir is not None else out / "state"
    node_values: dict[str, ConfigValue] = {
        "site-id": site,
        "data": str(summary.path),
        "ledger": str(state / LEDGER_FILE),
        "registry": str(state / REGISTRY_DIR),
        "state-dir": str(state / REPLIES_DIR),
        "budget-epsilon": float(budget_epsilon),
        "budget-delta": float(budget_delta),
        # The SuperNode's private key: the ClientApp signs each ledger head with it.
        "node-key": str(key_path),
        **(policy or {}),
    }
    open_ledger(NodeConfig.from_mapping(node_values))  # fixes the cap, or finds it differs
    out.mkdir(parents=True, exist_ok=True)
    node_ca = out / NODE_CA_FILE
    if Path(ca).absolute() != node_ca:
        shutil.copyfile(ca, node_ca)
    private_key, public_key = make_node_keypair(out, site)
    connection = NodeConnection(superlink=superlink, ca=node_ca, key=private_key, port=port)
    write_node_file(config_path, node=node_values, connection=connection)
    return NodeInit(
        node_file=read_node_file(config_path),
        data=summary,
        public_key_line=public_key.read_text(encoding="utf-8").strip(),
    )


def retire_key(key: Path, *, now: dt.datetime | None = None) -> Path:
    """Move a node's key pair to `retired/` beside it, stamped with the time.

    Returns:
        The folder that holds the retired pair.
    """
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y%m%dT%H%M%SZ")
    retired = key.parent / "retired"
    retired.mkdir(mode=0o700, exist_ok=True)
    for old in (key, key.with_name(key.name + NODE_PUBLIC_KEY_SUFFIX)):
        if old.exists():
            shutil.move(old, retired / f"{old.name}.{stamp}")
    return retired


def rotate_node_key(path: Path) -> NodeConnection:
    """Replace the key pair that `node.toml` names by a new one; the old pair is retired.

    Returns:
        The connection, whose `key` / `public_key` are the new pair.
    """
    node_file = read_node_file(path)
    key = node_file.connection.key
    retire_key(key)
    make_node_keypair(key.parent, key.name)
    return node_file.connection


def supernode_command(node_file: NodeFile) -> list[str]:
    """The `flower-supernode` command line: TLS with the CA, the node's key, and
    `--node-config "config-file='<node.toml>'"` so the ClientApp reads the site's own file."""
    connection = node_file.connection
    return [
        flower_program("flower-supernode"),
        "--root-certificates", str(connection.ca),
        "--superlink", connection.superlink,
        "--host", "127.0.0.1",
        "--port", str(connection.port),
        "--auth-supernode-private-key", str(connection.key),
        "--node-config", config_args({CONFIG_FILE_KEY: str(node_file.path)}),
    ]  # fmt: skip


def node_env(node_file: NodeFile, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The SuperNode's environment: `FLWR_HOME` from `base` if set, else beside the ledger."""
    source = dict(os.environ if base is None else base)
    home = source.get("FLWR_HOME") or str(node_file.state_dir / FLOWER_HOME_DIR)
    return flower_env(Path(home), source)


def node_log(node_file: NodeFile) -> Path:
    """Where `fedfew node run` keeps the SuperNode's log."""
    return node_file.state_dir / LOG_DIR / "supernode.log"
