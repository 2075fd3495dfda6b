"""`wait_run` takes a run's outcome from the SuperLink, not from its log stream: a `flwr run
--stream` that exits while the run still runs is followed by status reads until it finishes
(or the deadline stops it). The SuperLink's answers are scripted here; the process is real."""

import sys

import pytest

from federation.deploy import services
from federation.deploy.processes import ManagedProcess
from federation.errors import DeploymentError


def stream_that_ends_early(tmp_path):
    """A real process (started by `wait_run`) that prints what `flwr run` prints, then exits 0."""
    command = [sys.executable, "-c", "print('Successfully started run 42')"]
    return ManagedProcess(command, name="flwr-run", log_path=tmp_path / "run.log")


def scripted_status(monkeypatch, answers):
    asked = []

    def status(server, run_id):
        asked.append(run_id)
        return answers[min(len(asked), len(answers)) - 1]

    monkeypatch.setattr(services, "run_status", status)
    monkeypatch.setattr(services, "_RUN_STATUS_POLL_S", 0.01)
    return asked


def test_a_run_still_running_after_its_stream_ended_is_awaited(tmp_path, monkeypatch):
    asked = scripted_status(
        monkeypatch, [("running", ""), ("running", ""), ("finished:completed", "")]
    )
    result = services.wait_run(None, stream_that_ends_early(tmp_path), timeout=30)
    assert (result.run_id, result.status, result.returncode) == (42, "finished:completed", 0)
    assert asked == [42, 42, 42] and result.succeeded


def test_past_the_deadline_the_run_is_stopped(tmp_path, monkeypatch):
    scripted_status(monkeypatch, [("running", "")])
    stopped = []
    monkeypatch.setattr(services, "flwr_json", lambda server, args: stopped.append(args) or {})
    with pytest.raises(DeploymentError, match=r"did not finish within 0\.5 s and was stopped"):
        services.wait_run(None, stream_that_ends_early(tmp_path), timeout=0.5)
    assert stopped and stopped[0][:2] == ["stop", "42"]
