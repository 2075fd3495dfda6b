"""The container image IT runs, built and run for real: `deploy/build-image-offline.sh` builds
deploy/Dockerfile with buildah (a local Debian base, the host's wheels, no registry, no index),
then the runbook's container steps run from it, each service as deploy/compose.yaml declares it
(tests/e2e/containers.py): `server-init`, `hospital-a-init`, `hospital-b-init`, the `superlink`,
two registrations and a `start-run` in the SuperLink's container (`docker compose exec`), the
`hospital-a` and `hospital-b` SuperNodes; one DP round, both ledgers charged, the model
published, every process stopped, and nothing written outside the declared mounts.

The base tarball and the wheels are cached in FEDFEW_IMAGE_CACHE (default
~/.cache/fedfew-image), the image's layers in buildah's store: a second run rebuilds only the
layers of the code that changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from federation.deploy.processes import ManagedProcess, free_port, group_exists, process_exists
from models.registry import Registry
from models.synthetic import synthetic_arrays
from privacy.ledger import Ledger
from tests.e2e.containers import (
    BUILD_SCRIPT,
    ROOT,
    Container,
    ImageConfig,
    Service,
    image_config,
    load_service,
    missing_tools,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools())),
]
IMAGE = "localhost/fedfew:test"
SITES = ("hospital-a", "hospital-b")
TINY_RUN = (
    "federation='container' num-rounds=1 steps=2 dp.episodes=2 backbone.width=8 "
    "backbone.image-size=32 eval.episodes=5 min-nodes=2 min-replies=2 node-wait=120 "
    "round-timeout=240 max-retries=0"
)
BUILD_TIMEOUT_S = 1200  # cold: mmdebstrap about 1 min, wheels, `buildah bud` about 2-3 min
STARTUP_S = 180.0  # a cold `fedfew` in a container imports torch and Flower on a loaded box
ONE_SHOT_S = 300.0
RUN_TIMEOUT_S = 600
# Files that must never be in the image: keys, certificates of a deployment, patient data,
# ledgers and registries (the build context's allow-list keeps them out; this checks it).
FORBIDDEN_SUFFIXES = (".key", ".pem", ".crt", ".npz", ".db", ".sqlite", ".dcm", ".nii", ".csv")


@dataclass(frozen=True)
class BuiltImage:
    """The image the build script made, and how long it took."""

    tag: str
    config: ImageConfig
    build_s: float
    build_output: str


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    began = time.monotonic()
    done = subprocess.run(
        [str(BUILD_SCRIPT), IMAGE],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout.strip().splitlines()[-1]
    built = BuiltImage(IMAGE, image_config(IMAGE), time.monotonic() - began, output)
    print(f"image build: {built.build_s:.0f} s; {output}")
    return built


@pytest.fixture
def container(image: BuiltImage) -> Iterator[Container]:
    made = Container(image.tag, name=f"fedfew-test-{os.getpid()}", hosts={})
    yield made
    made.remove()


def test_image_labels_name_the_code_version(image):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    labels = image.config.labels
    revision = labels["org.opencontainers.image.revision"]

    # HEAD may have moved on since the build (others commit meanwhile): an ancestor is right.
    ancestor = subprocess.run(
        ["git", "merge-base", "--is-ancestor", revision, "HEAD"], cwd=ROOT, check=False
    )

    assert labels["org.opencontainers.image.version"] == version
    assert revision in image.build_output
    assert ancestor.returncode == 0, f"label revision {revision} is not a commit of this checkout"


def test_fedfew_runs_in_the_image_as_the_unprivileged_user(image, container, tmp_path):
    probe = Service("probe", ["--help"], [], True, ["/tmp"], None, ["ALL"])

    help_text = _check_output(container.run_args(probe, volumes=tmp_path))
    identity = _check_output(
        container.run_args(probe, volumes=tmp_path, command=["id", "-u"], entrypoint=False)
    )

    assert image.config.entrypoint == ["fedfew"]
    assert image.config.user == "fedfew"
    assert "Usage: fedfew" in help_text and "server" in help_text and "node" in help_text
    assert identity.strip() == "10001"


def test_image_holds_no_key_certificate_or_patient_file(container):
    with container.mounted() as root:
        app = root / "opt" / "fedfew"
        ours = [p for p in app.rglob("*") if "venv" not in p.relative_to(app).parts[:1]]
        forbidden = [str(p) for p in ours if p.name.endswith(FORBIDDEN_SUFFIXES)]
        assert not forbidden
        # deploy/wheels is bind-mounted while pip runs, never copied: at most its mount point
        assert not (app / "deploy").exists()
        assert not list((root / "wheels").glob("*"))
        assert sorted(p.name for p in (app / "venv").iterdir())  # the venv is there
        assert not list((root / "etc" / "fedfew").iterdir())
        assert not list((root / "var" / "lib" / "fedfew").iterdir())


def test_a_write_outside_the_mounts_is_seen(container, tmp_path):
    service = Service("probe", [], [], True, ["/tmp"], None, ["ALL"])
    write = ["sh", "-c", "touch /tmp/in-tmpfs /var/tmp/in-layer"]

    _check_output(container.run_args(service, volumes=tmp_path, command=write, entrypoint=False))

    assert container.root_writes(service) == ["/var/tmp/in-layer"]


def test_federation_runs_from_the_image_as_compose_declares(image, tmp_path):
    started: list[ManagedProcess] = []
    containers: list[Container] = []
    try:
        _play(image, tmp_path, started, containers)
    finally:
        for process in reversed(started):
            process.stop()
        for made in containers:
            made.remove()
    for process in started:
        assert not group_exists(process.pid), f"{process.name} left its process group"
        assert not [p for p in process.seen if process_exists(p)], f"{process.name} left some"


def _play(
    image: BuiltImage, root: Path, started: list[ManagedProcess], containers: list[Container]
) -> None:
    port = free_port()
    fedfew_root = root / "srv"
    volumes = root / "volumes"
    env = {"FEDFEW_ROOT": str(fedfew_root), "SUPERLINK_PUBLIC_NAME": "localhost"}
    for i, site in enumerate(SITES):
        letter = site[-1].upper()
        env[f"HOSPITAL_{letter}_DATA"] = str(_image_folder(root / "data" / site, seed=i))
        env[f"HOSPITAL_{letter}_EPSILON"] = "8"
    env["FEDFEW_CA"] = str(fedfew_root / "server" / "certs" / "ca.crt")
    for folder in ("server", *SITES):  # runbook: sudo install -d -o 10001 -g 10001 -m 0750
        (fedfew_root / folder).mkdir(parents=True)
        os.chown(fedfew_root / folder, 10001, 10001)
        (fedfew_root / folder).chmod(0o750)

    def container(name: str) -> Container:
        made = Container(
            image.tag, name=f"fedfew-test-{os.getpid()}-{name}", hosts={"superlink": "127.0.0.1"}
        )
        containers.append(made)
        return made

    def one_shot(name: str, extra: list[str], replace: dict[str, str] | None = None) -> str:
        service = load_service(name, env)
        command = [(replace or {}).get(word, word) for word in service.command] + extra
        made = container(name)
        output = _check_output(made.run_args(service, volumes=volumes, command=command))
        _assert_read_only_holds(made, service)
        return output

    # Provisioning (runbook, "Containers": `docker compose --profile init run --rm ...`).
    one_shot("server-init", ["--port", str(port)])
    keys, node_ports = {}, {}
    for site in SITES:
        node_ports[site] = free_port()
        output = one_shot(
            f"{site}-init",
            ["--node-port", str(node_ports[site])],
            replace={"superlink:9092": f"superlink:{port}"},
        )
        assert "in 4 classes" in output
        keys[site] = (fedfew_root / site / f"{site}.pub").read_text().strip()

    # `docker compose up -d superlink`, then registrations by `docker compose exec superlink`.
    superlink = load_service("superlink", env)
    server = container("superlink")
    process = _start(server.run_args(superlink, volumes=volumes), "superlink", root, started)
    process.wait_for_port("127.0.0.1", port, timeout=STARTUP_S)
    _health(server, superlink, volumes, ("9092", port))
    config = superlink.command[superlink.command.index("--config") + 1]
    for site in SITES:
        command = ["server", "register", "--config", config, keys[site], "--name", site]
        output = _check_output(server.run_args(superlink, volumes=volumes, command=command))
        assert f"registered {site} as node" in output

    # `docker compose up -d`: the SuperNodes.
    nodes = {}
    for site in SITES:
        service = load_service(site, env)
        made = container(site)
        nodes[site] = (service, made)
        node = _start(made.run_args(service, volumes=volumes), site, root, started)
        node.wait_for_log("SuperNode ID:", timeout=STARTUP_S)
        _health(made, service, volumes, ("9094", node_ports[site]))

    # `docker compose exec superlink fedfew server start-run ...`: one DP round.
    command = ["server", "start-run", "--config", config, "--run-config", TINY_RUN]
    command += ["--timeout", str(RUN_TIMEOUT_S)]
    output = _check_output(
        server.run_args(superlink, volumes=volumes, command=command), timeout=RUN_TIMEOUT_S + 60
    )
    assert "finished:completed" in output, output[-3000:]

    published = Registry.open(volumes / "superlink-state" / "server" / "registry")
    assert [v.info["round"] for v in published.entries(kind="global")][-1] == 1
    for site in SITES:
        ledger = Ledger.open(volumes / f"{site}-state" / "ledger.db")
        assert [e.round for e in ledger.entries() if e.kind == "charge"] == [1]
        assert ledger.verify() >= 1

    # `docker compose down`: SIGTERM to every service; nothing may be left behind.
    for process in reversed(started):
        process.stop()
        assert not [p for p in process.seen if process_exists(p)], process.name
    _assert_read_only_holds(server, superlink)
    for service, made in nodes.values():
        _assert_read_only_holds(made, service)


def _health(container: Container, service: Service, volumes: Path, port: tuple[str, int]) -> None:
    """Run the service's compose health check in its container (`port`: compose's, ours)."""
    assert service.healthcheck, f"{service.name} has no health check"
    probe = [word.replace(port[0], str(port[1])) for word in service.healthcheck]
    _check_output(container.run_args(service, volumes=volumes, command=probe, entrypoint=False))


def _assert_read_only_holds(container: Container, service: Service) -> None:
    """Under compose's `read_only: true`, nothing may have been written outside the mounts."""
    if service.read_only:
        written = container.root_writes(service)
        assert written == [], f"{service.name} wrote outside its mounts (read_only): {written}"


def _image_folder(folder: Path, *, seed: int) -> Path:
    """A hospital's training set as IT mounts it: one folder of PNGs per class, world-readable."""
    arrays = synthetic_arrays(n_classes=4, per_class=10, size=32, seed=seed)
    for i, (pixels, label) in enumerate(zip(arrays["images"], arrays["labels"], strict=True)):
        path = folder / str(arrays["classes"][label]) / f"image-{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(pixels)).save(path)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def _start(args: list[str], name: str, root: Path, started: list[ManagedProcess]) -> ManagedProcess:
    process = ManagedProcess(args, name=name, log_path=root / "logs" / f"{name}.log", cwd=root)
    started.append(process)
    return process.start()


def _check_output(args: list[str], *, timeout: float = ONE_SHOT_S) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, (
        f"{args[-6:]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout + done.stderr
