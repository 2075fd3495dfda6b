"""deploy/: the compose file, the Dockerfile and the systemd units are well formed, run only
commands and options that exist, name only files that exist, and keep secrets out of the image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from app.cli import COMMANDS, load_command

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
SECRET = re.compile(r"(KEY|PASSWORD|SECRET|TOKEN|CREDENTIAL)", re.IGNORECASE)
DOCKER_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip


def fedfew_command(args: list[str]) -> click.Command:
    """The click command an argument list runs, checking every `--option` it passes exists."""
    rest = list(args)
    assert rest[0] in COMMANDS, f"`fedfew {' '.join(args)}`: no command {rest[0]!r}"
    command = load_command(rest.pop(0))  # the root group loads its commands when they run
    while isinstance(command, click.Group):
        name = rest.pop(0)
        found = command.commands.get(name)
        assert found is not None, f"`fedfew {' '.join(args)}`: no command {name!r}"
        command = found
    options = {opt for param in command.params for opt in param.opts}
    for word in rest:
        if word.startswith("--"):
            assert word in options, f"`fedfew {' '.join(args)}`: no option {word}"
    return command


# -- compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_has_a_superlink_two_hospitals_and_a_dashboard_each(compose):
    services = compose["services"]
    running = {name for name, s in services.items() if "init" not in s.get("profiles", [])}
    assert running == {"superlink", "hospital-a", "hospital-b", "dashboard-a", "dashboard-b"}
    assert set(compose["volumes"]) == {"superlink-state", "hospital-a-state", "hospital-b-state"}
    for name, service in services.items():
        fedfew_command(service["command"])
        if name in running:
            probe = service["healthcheck"]["test"]
            assert probe[:3] == ["CMD", "python", "-c"] and "create_connection" in probe[3]


def test_compose_mounts_certificates_read_only_and_state_in_named_volumes(compose):
    services = compose["services"]
    for name in ("superlink", "hospital-a", "hospital-b"):
        volumes = services[name]["volumes"]
        config_mounts = [v for v in volumes if ":/etc/fedfew/" in v]
        assert config_mounts and all(v.endswith(":ro") for v in config_mounts), name
        assert f"{name}-state:/var/lib/fedfew" in volumes
    assert "hospital-a-state:/var/lib/fedfew" in services["dashboard-a"]["volumes"]
    for name in ("hospital-a", "hospital-b"):
        data = [v for v in services[name]["volumes"] if v.endswith(":/data:ro")]
        assert data and ":?" in data[0], "a hospital's data path has no default"
        assert services[name]["depends_on"]["superlink"]["condition"] == "service_healthy"


def test_compose_requires_each_cap_and_uses_tls_names_the_certificate_covers(compose):
    services = compose["services"]
    server_init = services["server-init"]["command"]
    hosts = [server_init[i + 1] for i, word in enumerate(server_init) if word == "--host"]
    for site in ("a", "b"):
        command = services[f"hospital-{site}-init"]["command"]
        cap = command[command.index("--budget-epsilon") + 1]
        assert cap.startswith(f"${{HOSPITAL_{site.upper()}_EPSILON:?"), "the cap has no default"
        superlink = command[command.index("--superlink") + 1]
        assert superlink.split(":")[0] in hosts
    for service in services.values():
        assert "--insecure" not in service["command"]
        assert not [k for k in service.get("environment", {}) if SECRET.search(k)]


def test_compose_names_only_files_that_exist(compose):
    for service in compose["services"].values():
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).is_file()


def test_docker_compose_config_accepts_the_file_where_the_client_exists(tmp_path):
    docker = shutil.which("docker")
    has_compose = docker is not None and (
        subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode
        == 0
    )
    if not has_compose:
        pytest.skip("no `docker compose` on this machine (YAML checks above still ran)")
    env = {"HOSPITAL_A_DATA": "/srv/a", "HOSPITAL_B_DATA": "/srv/b", "PATH": "/usr/bin:/bin"}
    env |= {"HOSPITAL_A_EPSILON": "8", "HOSPITAL_B_EPSILON": "8"}
    done = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "--profile", "init", "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# -- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)  # continuation lines
    lines = [line.strip() for line in joined.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_parses_runs_as_non_root_and_bakes_in_no_secret():
    steps = dockerfile_instructions()
    assert {name for name, _ in steps} <= DOCKER_INSTRUCTIONS
    # The base and torch's index are build arguments whose defaults are the real-world ones.
    assert steps[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in steps
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ("ARG", f"FEDFEW_VERSION={version}") in steps, "the version label's default"
    names = [name for name, _ in steps]
    user = names.index("USER")
    assert steps[user][1] not in {"root", "0"} and user < names.index("ENTRYPOINT")
    assert steps[names.index("ENTRYPOINT")][1] == '["fedfew"]'
    runs = [arg for name, arg in steps if name == "RUN"]
    torch = next(i for i, arg in enumerate(runs) if "torch==" in arg)
    assert '--index-url "$TORCH_INDEX_URL"' in runs[torch]
    assert any(re.search(r"pip install [^&]*\s\.(\s|$)", arg) for arg in runs[torch + 1 :])
    for run in runs:  # bind mounts read from the build context: the folder must exist
        for source in re.findall(r"--mount=type=bind,source=([^,\s]+)", run):
            assert (ROOT / source).is_dir(), source
    for name, arg in steps:
        if name in {"ENV", "ARG"}:
            assert not SECRET.search(arg.split("=")[0]), arg
        if name in {"COPY", "ADD"}:
            sources = arg.split()[:-1]
            assert all((ROOT / source).exists() for source in sources), arg
            assert not any(s.endswith((".key", ".pem", ".crt", ".toml")) for s in sources[1:])


def test_the_build_context_keeps_keys_and_the_venv_out():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") :][0] == "*"  # allow-list: everything else is excluded
    for pattern in ("**/*.key", "**/*.pem", "**/*.crt"):
        assert pattern in ignore
    assert "!.venv" not in ignore


def test_pip_install_carries_the_dashboard_streamlit_config():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools.get("package-data", {}).get("app", [])
    assert "dashboard/.streamlit/*.toml" in patterns or "dashboard/.streamlit/config.toml" in (
        patterns
    )


# -- systemd ------------------------------------------------------------------------------------


def unit(name: str) -> dict[str, list[str]]:
    """`Section.Key` -> values (keys may repeat in systemd units)."""
    values: dict[str, list[str]] = {}
    section = ""
    text = re.sub(r"\\\n\s*", " ", (UNITS / name).read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}.{key}", []).append(value)
    return values


@pytest.mark.parametrize(
    ("name", "writable"),
    [
        ("fedfew-superlink.service", "/var/lib/fedfew/server"),
        ("fedfew-node@.service", "/var/lib/fedfew/%i"),
        ("fedfew-dashboard@.service", "/var/lib/fedfew/%i"),
    ],
)
def test_units_run_as_fedfew_hardened_with_only_their_state_writable(name, writable):
    values = unit(name)
    service = {key.split(".", 1)[1]: v for key, v in values.items() if key.startswith("Service.")}
    assert service["User"] == ["fedfew"] and service["Restart"] == ["on-failure"]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]
    assert service["ReadWritePaths"] == [writable]
    assert values["Install.WantedBy"] == ["multi-user.target"]
    program, *args = service["ExecStart"][0].split()
    assert program == "/opt/fedfew/venv/bin/fedfew"
    fedfew_command([arg for arg in args if not arg.startswith("${")])


def test_systemd_analyze_verifies_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here (the structural checks above still ran)")
    fedfew = Path(sys.executable).parent / "fedfew"
    for path in UNITS.glob("*.service"):
        text = path.read_text().replace("/opt/fedfew/venv/bin/fedfew", str(fedfew))
        (tmp_path / path.name.replace("@.", "@hospital-a.")).write_text(text)
    done = subprocess.run(
        [analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
