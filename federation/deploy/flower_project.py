"""Flower's file formats and CLI conventions: the app project that `flwr run` packs into a FAB,
`key=value` config arguments, `$FLWR_HOME/config.toml`, and what `flwr` commands print.

`flwr run <app_dir>` reads `<app_dir>/pyproject.toml`, checks that each component
(`module:attribute`) can be found from the app folder or the installed environment, builds a FAB
from the folder and sends it to the SuperLink. `flwr-serverapp` and `flwr-clientapp` then import
the components with the FAB's folder first on `sys.path`, so a component may be

- a module of an installed package (this project's `federation.*`, pip-installed in editable
  mode): the app folder then holds only `pyproject.toml`; or
- a module file copied into the app folder (`modules=`), e.g. a test app under `tests/`, which is
  not installed.

Flower's component check reads the module's source and looks for a plain assignment
(`app = ServerApp()`); an annotated one (`app: ServerApp = ...`) is not found.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from federation.errors import DeploymentError
from models.run_config import nest_keys

ConfigValue = bool | int | float | str

STATUS_COMPLETED = "finished:completed"
# Flower's exit code of a SuperNode that the SuperLink refused to activate (unregistered key).
EXIT_CODE_NODE_REFUSED = 305
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_FLOWER_EXIT_CODE = re.compile(r"Exit Code: (\d+)")

PYPROJECT_FILE = "pyproject.toml"
PUBLISHER = "fedfew"
# Flower accepts bare TOML keys, dotted for nesting; kebab-case by Flower's convention.
_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_COMPONENT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")  # Flower's FAB version pattern


def write_app_project(
    app_dir: Path,
    *,
    serverapp: str,
    clientapp: str,
    config: Mapping[str, ConfigValue],
    modules: Sequence[Path] = (),
    name: str = "fedfew",
    version: str = "1.0.0",
) -> Path:
    """Write a minimal Flower app project that `flwr run` accepts.

    Args:
        app_dir: The app folder (created if missing). Keep it small: `flwr run` packs all of it.
        serverapp: The ServerApp as `module:attribute`, e.g. `federation.server_app:app`.
        clientapp: The ClientApp as `module:attribute`.
        config: Defaults of the run config (`[tool.flwr.app.config]`); `flwr run --run-config`
            overrides them.
        modules: Module files copied into the app folder, for components that are not
            installed in the environment.
        name: The project name (part of the FAB id `fedfew/<name>`).
        version: The project version, `X.Y.Z`.

    Returns:
        The path of the written `pyproject.toml`.

    Raises:
        ValueError: A component, key, value, name or version is malformed, or a module file
            does not exist.
    """
    for role, component in (("serverapp", serverapp), ("clientapp", clientapp)):
        if not _COMPONENT.match(component):
            raise ValueError(f"{role}={component!r} must look like 'package.module:attribute'")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"name={name!r} must be letters, digits, '.', '_' or '-'")
    if not _VERSION.match(version):
        raise ValueError(f"version={version!r} must look like '1.0.0'")
    missing = [str(module) for module in modules if not Path(module).is_file()]
    if missing:
        raise ValueError(f"module files do not exist: {', '.join(missing)}")
    for key, value in config.items():
        _checked_key(key)
        toml_value(value)  # raises ValueError on a type Flower's config cannot carry
    project = {
        "build-system": {
            "requires": ["setuptools>=69"],
            "build-backend": "setuptools.build_meta",
        },
        "project": {
            "name": name,
            "version": version,
            "description": "fedfew Flower app",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": nest_keys(config),
                }
            }
        },
    }
    folder = Path(app_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for module in modules:
        shutil.copyfile(module, folder / Path(module).name)
    pyproject = folder / PYPROJECT_FILE
    pyproject.write_text(tomli_w.dumps(project), encoding="utf-8")
    return pyproject


def toml_value(value: ConfigValue) -> str:
    """Format a scalar as a TOML value.

    Args:
        value: A bool, int, float or str.

    Returns:
        The TOML text (strings as basic strings with escapes).

    Raises:
        ValueError: The value is of another type.
    """
    if not isinstance(value, bool | int | float | str):
        raise ValueError(
            f"value {value!r} of type {type(value).__name__} is not bool/int/float/str"
        )
    return tomli_w.dumps({"v": value}).removeprefix("v = ").strip()


def config_args(config: Mapping[str, ConfigValue]) -> str:
    """Format a config as Flower's `key=value` list (`--node-config`, `--run-config`).

    Flower reads each pair with the pattern `key=('...'|"..."|non-space)` and parses the value
    as TOML, so strings are quoted: single quotes (a TOML literal string, no escapes) unless the
    value holds one, else double quotes.

    Args:
        config: Keys and scalar values.

    Returns:
        The space-separated pairs, e.g. `site-id='a' epochs=2 lr=0.01 dp=true`.

    Raises:
        ValueError: A key is not a TOML bare key, or a string holds both quote kinds or a
            line break (Flower's parser cannot carry it).
    """
    pairs = []
    for key, value in config.items():
        _checked_key(key)
        if isinstance(value, str):
            if "\n" in value or "\r" in value:
                raise ValueError(f"config value of {key!r} holds a line break: not allowed")
            if "'" not in value:
                text = f"'{value}'"
            elif '"' not in value:
                text = json.dumps(value)
            else:
                raise ValueError(
                    f"config value of {key!r} holds both ' and \": Flower's parser cannot "
                    "carry it; remove one kind of quote"
                )
        else:
            text = toml_value(value)
        pairs.append(f"{key}={text}")
    return " ".join(pairs)


def _checked_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"config key {key!r} must be letters, digits, '-' or '_' (kebab-case)")
    return key


def flower_config_toml(connection: str, *, address: str, root_certificates: Path) -> str:
    """Return `$FLWR_HOME/config.toml` text with one TLS connection, also the default.

    Args:
        connection: The connection name that `flwr` commands take.
        address: The SuperLink's `host:port` (all its APIs share one port).
        root_certificates: The CA that signed the SuperLink's certificate (made absolute).

    Returns:
        The TOML text.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", connection):
        raise ValueError(f"connection={connection!r} must be letters, digits, '-' or '_'")
    return tomli_w.dumps(
        {
            "superlink": {
                "default": connection,
                connection: {
                    "address": address,
                    "root-certificates": str(Path(root_certificates).absolute()),
                },
            }
        }
    )


@dataclass(frozen=True)
class RunResult:
    """Outcome of one `flwr run`.

    Attributes:
        returncode: Exit status of `flwr run` (0 even when the ServerApp failed).
        output: Everything `flwr run --stream` printed, ServerApp logs included.
        run_id: The SuperLink's run id, None if the run never started.
        status: The run's final status, e.g. `finished:completed`; None if unknown.
        status_details: Flower's reason for a failed run (empty when it completed).
        wall_s: Seconds `flwr run` took, from start to exit.
    """

    returncode: int
    output: str
    run_id: int | None
    status: str | None
    status_details: str
    wall_s: float

    @property
    def succeeded(self) -> bool:
        """Whether `flwr run` exited 0 and the run finished as completed."""
        return self.returncode == 0 and self.status == STATUS_COMPLETED

    def check(self) -> RunResult:
        """Return self if the run succeeded.

        Raises:
            DeploymentError: The run failed; the message holds Flower's reason and output tail.
        """
        if not self.succeeded:
            raise DeploymentError(
                f"run {self.run_id} ended with status {self.status!r} (flwr run exit status "
                f"{self.returncode}): {self.status_details or 'no details'}; output ends "
                f"with:\n{self.output[-2000:]}"
            )
        return self


def parse_run_id(output: str) -> int | None:
    """Return the run id that `flwr run` printed (`Successfully started run N`), if any."""
    match = _RUN_ID.search(output)
    return int(match.group(1)) if match else None


def parse_cli_json(output: str, *, returncode: int, command: str) -> dict[str, object]:
    """Return the JSON object a `flwr ... --format json` command printed.

    Args:
        output: What the command printed (stdout and stderr).
        returncode: Its exit status.
        command: Its name, for messages.

    Returns:
        The parsed object.

    Raises:
        DeploymentError: It failed, printed no JSON, or the JSON says `"success": false`.
    """
    start = output.find("{")
    try:  # log lines may follow the JSON object in the same output: decode just the object
        result = json.JSONDecoder().raw_decode(output, start)[0] if start >= 0 else {}
    except json.JSONDecodeError as err:
        raise DeploymentError(f"{command} printed no JSON:\n{output[-2000:]}") from err
    if returncode != 0 or not isinstance(result, dict) or not result.get("success"):
        raise DeploymentError(f"{command} failed (status {returncode}):\n{output[-2000:]}")
    return result


def flower_exit_code(log: str) -> int | None:
    """Return the last Flower exit code (`Exit Code: N`) in a process log, if any.

    Flower processes exit with status 1 on every error and log the reason's code instead
    (e.g. 305: a SuperNode the SuperLink refused).

    Args:
        log: A Flower process's log text.

    Returns:
        The code, or None if the log holds none.
    """
    codes = _FLOWER_EXIT_CODE.findall(log)
    return int(codes[-1]) if codes else None
