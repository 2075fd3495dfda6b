"""deploy/compose.yaml's services run from the built image with buildah, as compose would.

`podman run` and compose cannot run here (the sandbox refuses the resource limits containers
set), but `buildah run --isolation chroot --network host` can. A `Service` is read from the
compose file (command, volumes, read-only root, tmpfs, user, dropped capabilities,
environment) with compose's variable syntax, and `Container.run_args` applies each of them to
`buildah run`, so a change to the compose file or the image that breaks the other breaks the
test. What buildah cannot apply is checked instead: a read-only root by listing, after the
fact, what the container wrote into its own layer (`Container.root_writes`);
`no-new-privileges` is not applied (the processes run unprivileged and with no capability).
The image's `VOLUME`s are taken off each working container and mounted by the test instead (a
service's own mount, else an anonymous folder, as Docker does): with several mounts, buildah
1.28 lets the image's volume hide a `--volume` on the same path now and then.
Host networking means one network for all services: each gets its own free port (compose gives
each its own network namespace), and the `superlink` service name resolves to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
BUILD_SCRIPT = ROOT / "deploy" / "build-image-offline.sh"
_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")
_BUILDAH_OWN = {"/run/.containerenv"}  # written by `buildah run` itself, not by the service


def missing_tools() -> str | None:
    """Why the image cannot be built and run here, or None when it can."""
    for tool in ("buildah", "mmdebstrap"):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (`apt-get install -y buildah mmdebstrap`; .ci/run does)"
            )
    if os.geteuid() != 0:
        return "buildah runs containers as root here (no user namespaces for rootless buildah)"
    return None


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: `${NAME}`, `${NAME:-default}`, `${NAME:?message}`.

    Raises:
        KeyError: a `${NAME:?message}` variable is unset or empty (compose refuses to start).
    """

    def value(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VARIABLE.sub(value, text)


@dataclass(frozen=True)
class Mount:
    """One `SOURCE:TARGET[:ro]` entry of a service's `volumes`."""

    source: str
    target: str
    read_only: bool
    named: bool  # a named volume (compose's top-level `volumes`), else a host path


@dataclass(frozen=True)
class Service:
    """What the compose file declares for one service, its variables filled in."""

    name: str
    command: list[str]
    mounts: list[Mount]
    read_only: bool
    tmpfs: list[str]
    user: str | None
    cap_drop: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    healthcheck: list[str] = field(default_factory=list)  # the `test` command, after "CMD"


def load_service(name: str, env: Mapping[str, str], compose: Path = COMPOSE) -> Service:
    """Read service `name` from the compose file, interpolating its variables from `env`."""
    document = yaml.safe_load(compose.read_text())  # resolves the `<<: *fedfew` merges
    spec: dict[str, Any] = document["services"][name]
    named = set(document.get("volumes") or {})
    mounts = []
    for entry in spec.get("volumes", []):
        source, target, *options = interpolate(entry, env).split(":")
        mounts.append(Mount(source, target, "ro" in options, source in named))
    return Service(
        name=name,
        command=[interpolate(word, env) for word in spec["command"]],
        mounts=mounts,
        read_only=bool(spec.get("read_only", False)),
        tmpfs=list(spec.get("tmpfs", [])),
        user=spec.get("user"),
        cap_drop=list(spec.get("cap_drop", [])),
        environment={k: interpolate(str(v), env) for k, v in spec.get("environment", {}).items()},
        healthcheck=list(spec.get("healthcheck", {}).get("test", []))[1:],
    )


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image's configuration that `docker run` applies."""

    entrypoint: list[str]
    user: str
    labels: dict[str, str]
    volumes: list[str]


def image_config(image: str) -> ImageConfig:
    """Read `image`'s entrypoint, user and labels from buildah's store."""
    done = subprocess.run(
        ["buildah", "inspect", "--type", "image", image],
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(done.stdout)["OCIv1"]["config"]
    return ImageConfig(
        entrypoint=list(config.get("Entrypoint") or []),
        user=config.get("User") or "root",
        labels=dict(config.get("Labels") or {}),
        volumes=sorted(config.get("Volumes") or {}),
    )


class Container:
    """One working container of the image (`buildah from`), as compose makes one per service.

    Args:
        image: The image to start from (never pulled).
        name: The container's name (unique on this host while it exists).
        hosts: Extra `/etc/hosts` entries, name -> address.
    """

    def __init__(self, image: str, *, name: str, hosts: Mapping[str, str]) -> None:
        self.image = image
        self.config = image_config(image)
        add_hosts = [f"--add-host={host}:{address}" for host, address in hosts.items()]
        subprocess.run(["buildah", "rm", name], capture_output=True, check=False)  # a leftover
        self.name = subprocess.run(
            ["buildah", "from", "--pull=never", "--quiet", "--name", name, *add_hosts, image],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for volume in self.config.volumes:  # mounted by run_args instead (module docstring)
            subprocess.run(["buildah", "config", "--volume", f"{volume}-", self.name], check=True)

    def run_args(
        self,
        service: Service,
        *,
        volumes: Path,
        command: list[str] | None = None,
        entrypoint: bool = True,
    ) -> list[str]:
        """The `buildah run` command line that starts `service` (or `command` in its place).

        The image's entrypoint comes first, as `docker run` does, unless `entrypoint` is False.

        Named volumes are folders under `volumes`, created on first use the way Docker
        initialises a volume: owned like the image's folder at the mount point. An image
        `VOLUME` the service does not mount gets an anonymous one, as with `docker run`.
        """
        args = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        args += ["--user", service.user or self.config.user]
        for capability in service.cap_drop:
            args += ["--cap-drop", capability]
        for key, value in service.environment.items():
            args += ["--env", f"{key}={value}"]
        for target in service.tmpfs:
            args += ["--mount", f"type=tmpfs,destination={target}"]
        targets = {mount.target for mount in service.mounts}
        anonymous = [
            Mount(f"anonymous-{self.name}-{i}", target, read_only=False, named=True)
            for i, target in enumerate(self.config.volumes)
            if target not in targets
        ]
        for mount in [*service.mounts, *anonymous]:
            source = self._volume(volumes, mount) if mount.named else Path(mount.source)
            args += ["--volume", f"{source}:{mount.target}{':ro' if mount.read_only else ''}"]
        words = service.command if command is None else command
        program = self.config.entrypoint if entrypoint else []
        return [*args, self.name, "--", *program, *words]

    def _volume(self, volumes: Path, mount: Mount) -> Path:
        path = volumes / mount.source
        if not path.exists():
            with self.mounted() as root:
                info = (root / mount.target.lstrip("/")).stat()
            path.mkdir(parents=True)
            os.chown(path, info.st_uid, info.st_gid)
            path.chmod(info.st_mode & 0o7777)
        return path

    def mounted(self) -> _Mounted:
        """Context manager: the container's root folder on the host (`buildah mount`)."""
        return _Mounted(self.name)

    def root_writes(self, service: Service) -> list[str]:
        """Files, links and deletions the container made in its own layer (not a mount).

        Under compose's `read_only: true` each of them would have failed. Folders are left
        out: `buildah run` creates the mount points in the layer itself.
        """
        with self.mounted() as merged:
            upper = merged.parent / "diff"  # overlay: the container's own, writable layer
            targets = {m.target for m in service.mounts} | _BUILDAH_OWN
            written = []
            for path in sorted(upper.rglob("*")):
                inside = "/" + str(path.relative_to(upper))
                if (not path.is_dir() or path.is_symlink()) and inside not in targets:
                    written.append(inside)
        return written

    def remove(self) -> None:
        """Delete the container (its layer; named volumes and host folders stay)."""
        subprocess.run(["buildah", "rm", self.name], capture_output=True, check=False)


class _Mounted:
    def __init__(self, container: str) -> None:
        self.container = container

    def __enter__(self) -> Path:
        done = subprocess.run(
            ["buildah", "mount", self.container], capture_output=True, text=True, check=True
        )
        return Path(done.stdout.strip())

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["buildah", "umount", self.container], capture_output=True, check=False)
