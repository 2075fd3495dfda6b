"""A real Flower deployment on 127.0.0.1 (TLS, node keys, separate processes), and its parts.

The slow tests share one deployment (starting Flower processes costs seconds each on 2 cores):
the module fixture plays one scenario and records what happened; each test checks one part.
The echo app's folder holds only `pyproject.toml`: its module is importable from the processes'
environment (PYTHONPATH), not shipped in the FAB, as the installed `federation.*` apps are.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

from federation.deploy.certificates import (
    check_certificate,
    make_ca,
    make_node_keypair,
    make_server_certificate,
)
from federation.deploy.flower_project import (
    EXIT_CODE_NODE_REFUSED,
    RunResult,
    config_args,
    flower_exit_code,
    write_app_project,
)
from federation.deploy.local_deployment import LocalFederation, SiteSpec
from federation.deploy.processes import ManagedProcess, ProcessId, group_exists, process_exists
from federation.errors import CertificateError, DeploymentError, NodeRefusedError
from models.synthetic import write_synthetic_npz

E2E_DIR = Path(__file__).resolve().parent
ECHO_MODULE = E2E_DIR / "echo_app.py"
SITES = ("hospital-a", "hospital-b")  # each answers with its site-id from node.toml


# -- certificates (no processes) ----------------------------------------------------------------


@pytest.fixture
def authority(tmp_path: Path) -> tuple[Path, Path]:
    return make_ca(tmp_path / "ca")


def test_server_certificate_is_signed_and_names_every_host(authority, tmp_path):
    ca_cert, ca_key = authority
    cert, key = make_server_certificate(
        tmp_path / "server", ca_cert=ca_cert, ca_key=ca_key, hosts=["127.0.0.1", "localhost"]
    )

    parsed = check_certificate(cert, ca=ca_cert)

    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca_key.stat().st_mode) == 0o600


def test_expired_certificate_is_refused(authority, tmp_path):
    ca_cert, ca_key = authority
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert, _ = make_server_certificate(
        tmp_path,
        ca_cert=ca_cert,
        ca_key=ca_key,
        hosts=["127.0.0.1"],
        validity_days=1,
        not_valid_before=long_ago,
    )

    with pytest.raises(CertificateError, match="expired"):
        check_certificate(cert, ca=ca_cert)


def test_certificate_of_another_ca_is_refused(authority, tmp_path):
    ca_cert, _ = authority
    other_cert, other_key = make_ca(tmp_path / "other", common_name="fedfew CA")
    cert, _ = make_server_certificate(
        tmp_path / "server", ca_cert=other_cert, ca_key=other_key, hosts=["127.0.0.1"]
    )

    with pytest.raises(CertificateError, match="not signed by the CA"):
        check_certificate(cert, ca=ca_cert)


def test_file_that_is_not_a_certificate_is_refused(authority, tmp_path):
    ca_cert, ca_key = authority
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        check_certificate(ca_key, ca=ca_cert)
    with pytest.raises(CertificateError, match="does not exist"):
        check_certificate(tmp_path / "missing.pem", ca=ca_cert)


def test_node_keys_load_the_way_flower_loads_them(tmp_path):
    private_path, public_path = make_node_keypair(tmp_path, "hospital-a")

    private = load_ssh_private_key(private_path.read_bytes(), None)  # flower-supernode
    public = load_ssh_public_key(public_path.read_bytes())  # flwr supernode register

    assert private.public_key() == public
    assert public.curve.name == "secp384r1"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


# -- Flower syntax (no processes) ---------------------------------------------------------------


def test_config_args_round_trip_through_flowers_parser():
    from flwr.common.config import parse_config_args

    config = {
        "site-id": "a b",
        "path": "C:\\data\\it's",
        "rounds": 3,
        "lr": 0.01,
        "dp": True,
        "name": 'say "hi"',
    }

    assert parse_config_args([config_args(config)]) == config


def test_config_args_refuse_what_flower_cannot_carry():
    with pytest.raises(ValueError, match="both"):
        config_args({"k": 'it\'s "x"'})
    with pytest.raises(ValueError, match="key"):
        config_args({"bad key": 1})


def test_app_project_passes_flowers_validation(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    pyproject = write_app_project(
        tmp_path / "app",
        serverapp="echo_app:serverapp",
        clientapp="echo_app:clientapp",
        config={"expected-nodes": 2, "wait-timeout": 1.5, "result-path": "/x y", "dp": False},
        modules=[ECHO_MODULE],
    )

    config, _ = load_and_validate(pyproject)

    assert config["tool"]["flwr"]["app"]["publisher"] == "fedfew"
    assert config["tool"]["flwr"]["app"]["config"]["result-path"] == "/x y"
    assert (tmp_path / "app" / "echo_app.py").read_text() == ECHO_MODULE.read_text()


# -- processes (small Python children, under a second each) -------------------------------------

# A parent that starts a child in a new session, as flower-superlink starts flower-superexec.
_SPAWNER = (
    "import subprocess, sys, time; "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "start_new_session=True); print('ready', flush=True); time.sleep(60)"
)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_process_and_its_detached_child_are_gone(tmp_path, how):
    process = ManagedProcess(
        [sys.executable, "-c", _SPAWNER], name="spawner", log_path=tmp_path / "spawner.log"
    ).start()
    process.wait_for_log("ready", timeout=10)
    children = process.descendants()
    assert len(children) == 1

    if how == "stop":
        process.stop(grace=5)
    else:
        process.kill()

    assert not group_exists(process.pid)
    assert not any(process_exists(p) for p in process.seen)
    assert process.returncode == (-signal.SIGTERM if how == "stop" else -signal.SIGKILL)


# The child leads a new session (as flower-superexec does), starts a grandchild in it later
# (as it starts flwr-serverapp) and exits at once: the grandchild is orphaned, out of the tree.
_ORPHANER = (
    "import subprocess, sys, time; "
    'code = "import subprocess, sys, time; time.sleep(1.5); '
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\"; "
    "subprocess.Popen([sys.executable, '-c', code], start_new_session=True); "
    "print('ready', flush=True); time.sleep(60)"
)


def test_a_grandchild_orphaned_after_it_was_last_looked_for_is_stopped_too(tmp_path):
    process = ManagedProcess(
        [sys.executable, "-c", _ORPHANER], name="orphaner", log_path=tmp_path / "orphaner.log"
    ).start()
    process.wait_for_log("ready", timeout=10)
    (leader,) = process.descendants()  # the child is seen before it starts the grandchild
    deadline = time.monotonic() + 20
    while process_exists(leader) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_exists(leader)  # it started the grandchild and exited
    orphans = [
        pid
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if _session(pid) == leader.pid
    ]
    assert len(orphans) == 1

    process.stop(grace=5)

    assert _session(orphans[0]) is None
    assert not any(process_exists(p) for p in process.seen)


def _session(pid: int) -> int | None:
    """The session of a live process (None: gone or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[3])


def test_waiting_for_a_process_that_exits_fails_with_its_log(tmp_path):
    process = ManagedProcess(
        [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
        name="short",
        log_path=tmp_path / "short.log",
    ).start()

    with pytest.raises(DeploymentError, match=r"(?s)exited with status 3.*boom"):
        process.wait_for_port("127.0.0.1", 9, timeout=10)
    process.stop()


# -- the deployment (slow: real Flower processes) ------------------------------------------------


@dataclass
class Scenario:
    """What happened in the shared deployment, recorded for the tests below."""

    node_ids: dict[str, int]
    run: RunResult
    echo: dict[str, object]
    refused_status: int | None
    refused_code: int | None
    killed_gone: bool
    survivor_alive: bool
    status_after_restart: str
    restart_refusal: str
    timeout_error: str
    processes: list[ManagedProcess]
    seen: set[ProcessId]
    timings: dict[str, float]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    root = tmp_path_factory.mktemp("federation")
    app_dir = root / "app"
    write_app_project(
        app_dir,
        serverapp="echo_app:serverapp",
        clientapp="echo_app:clientapp",
        config={"expected-nodes": len(SITES), "wait-timeout": 60.0, "result-path": ""},
    )
    sites = {}
    for i, name in enumerate(SITES):
        data = write_synthetic_npz(root / name / "data.npz", n_classes=2, per_class=3, seed=i)
        sites[name] = SiteSpec(data=data, budget_epsilon=1.0)
    timings: dict[str, float] = {}
    began = time.monotonic()
    federation = LocalFederation(root / "fed", sites=sites, env={"PYTHONPATH": str(E2E_DIR)})
    with federation:
        timings["start"] = time.monotonic() - began
        rogue = federation.start_unregistered_node("rogue")  # tries while the run goes on
        result_path = root / "echo.json"
        run = federation.run(app_dir, run_config={"result-path": str(result_path)}, timeout=180)
        rogue.wait(timeout=60)
        timings["run"] = run.wall_s
        echo = json.loads(result_path.read_text()) if result_path.exists() else {}
        seen = {p for process in federation.processes for p in process.seen}
        seen |= {p for process in federation.processes for p in process.descendants()}

        federation.kill_node("hospital-b")
        killed = federation.node_process("hospital-b")
        killed_gone = not group_exists(killed.pid) and not any(map(process_exists, killed.seen))
        survivor_alive = federation.node_process("hospital-a").alive

        # Outcomes are recorded, not raised, so that each test below fails on its own.
        began = time.monotonic()
        try:
            federation.start_node("hospital-b")
            restart_refusal = "accepted"
        except NodeRefusedError as err:
            restart_refusal = str(err)
        timings["node restart"] = time.monotonic() - began

        began = time.monotonic()
        federation.stop_superlink()
        federation.start_superlink()
        timings["superlink restart"] = time.monotonic() - began
        status_after_restart, _ = federation.run_status(run.run_id or 0)
        try:
            federation.run(app_dir, timeout=0.5)  # `flwr run` alone needs seconds to start
            timeout_error = "finished"
        except DeploymentError as err:
            timeout_error = str(err)
        began = time.monotonic()
    timings["stop"] = time.monotonic() - began
    print("timings (s):", {key: round(value, 1) for key, value in timings.items()})
    return Scenario(
        node_ids=dict(federation.node_ids),
        run=run,
        echo=echo,
        refused_status=rogue.returncode,
        refused_code=flower_exit_code(rogue.read_log()),
        killed_gone=killed_gone,
        survivor_alive=survivor_alive,
        status_after_restart=status_after_restart,
        restart_refusal=restart_refusal,
        timeout_error=timeout_error,
        processes=federation.processes,
        seen=seen | {p for process in federation.processes for p in process.seen},
        timings=timings,
    )


@pytest.mark.slow
def test_two_authenticated_nodes_answer_the_echo_run(scenario):
    assert scenario.run.succeeded, scenario.run.output
    assert scenario.run.run_id is not None
    expected = {str(scenario.node_ids[name]): name for name in SITES}
    assert scenario.echo["answers"] == expected
    assert scenario.echo["errors"] == {}


@pytest.mark.slow
def test_unregistered_node_is_refused_and_never_in_the_run(scenario):
    # Flower logs "Exit Code: 305" but the process itself exits with status 1.
    assert scenario.refused_status == 1
    assert scenario.refused_code == EXIT_CODE_NODE_REFUSED
    registered = sorted(str(node_id) for node_id in scenario.node_ids.values())
    assert sorted(scenario.echo["node_ids"]) == registered
    assert sorted(scenario.echo["node_ids_after"]) == registered


@pytest.mark.slow
def test_killed_node_is_gone_at_once_and_the_other_keeps_running(scenario):
    assert scenario.killed_gone
    assert scenario.survivor_alive


@pytest.mark.slow
def test_superlink_restarts_on_the_same_database(scenario):
    assert scenario.status_after_restart == "finished:completed"


@pytest.mark.slow
def test_killed_node_restarted_at_once_is_accepted(scenario):
    # Flower counts a killed node online for 30-60 s more (2 missed 30 s heartbeats) and
    # refuses to activate it again; the restart releases that activation first.
    assert scenario.restart_refusal == "accepted"
    assert scenario.timings["node restart"] < 45


@pytest.mark.slow
def test_run_past_its_timeout_is_stopped_with_a_typed_error(scenario):
    assert "did not finish within 0.5 s" in scenario.timeout_error
    assert not scenario.processes[-1].alive  # the `flwr run` process itself


@pytest.mark.slow
def test_no_process_survives_the_federation(scenario):
    # superlink + its superexec, 2 nodes + their superexecs, the refused node, the `flwr` CLIs
    assert len(scenario.seen) >= 9
    assert not [p for p in scenario.seen if process_exists(p)]
    for process in scenario.processes:
        with pytest.raises(ProcessLookupError):
            os.killpg(process.pid, 0)


def test_interrupted_python_leaves_no_flower_process(tmp_path):
    """SIGTERM to a program that started Flower processes: its handler stops them all."""
    script = (
        "import sys, time; from pathlib import Path; "
        "from federation.deploy.processes import ManagedProcess; "
        f"p = ManagedProcess([sys.executable, '-c', {_SPAWNER!r}], name='child', "
        f"log_path=Path({str(tmp_path / 'child.log')!r})).start(); "
        "p.wait_for_log('ready', timeout=10); "
        "tree = set(p.descendants()) | p.seen; "
        "print(*[f'{c.pid}:{c.start_time}' for c in tree], flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert parent.stdout is not None
    tree = [ProcessId(*map(int, item.split(":"))) for item in parent.stdout.readline().split()]
    assert len(tree) == 2 and all(map(process_exists, tree))

    parent.send_signal(signal.SIGTERM)
    status = parent.wait(timeout=30)
    parent.stdout.close()

    assert status == -signal.SIGTERM  # the handler stopped the children, then re-raised
    deadline = time.monotonic() + 5  # init reaps the orphaned child's zombie
    while any(map(process_exists, tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(process_exists, tree))
