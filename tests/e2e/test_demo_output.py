"""What `fedfew demo` prints after its run (app/demo_cli.py prints `summary` then
`dashboard_command`): whether the rounds ran under secure aggregation, and a dashboard command
that names the SuperLink. The federated run itself is tests/e2e/test_secure_aggregation.py."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import app.demo_cli
from app.demo import DemoResult, dashboard_command, summary
from federation.deploy.flower_project import RunResult
from models.registry import Registry
from privacy.round_record import RoundRecord, SecureSum

SUPERLINK = "127.0.0.1:40123"


def _result(tmp_path: Path, *, secure: bool, mechanism: str = "dp-episodic") -> DemoResult:
    registry = Registry.open(tmp_path / "server" / "registry", create=True)
    metrics = {"accuracy-5way-5shot": 0.5, "ci95-5way-5shot": 0.02}
    start = registry.publish(Path.mkdir, kind="global", name="r0", metrics=metrics)
    model = registry.publish(
        Path.mkdir,
        kind="global",
        name="r2",
        metrics={**metrics, "accuracy-5way-5shot": 0.6},
    )
    secure_sum = SecureSum(contributors=3, sum_norm=0.1, sum_bound=1.0, bytes_received=10)
    rounds = tuple(
        RoundRecord(
            number,
            seconds=1.0,
            bytes_sent_per_node=1,
            attempts=1,
            secure_aggregation=secure_sum if secure and number > 0 else None,
        )
        for number in (0, 1, 2)
    )
    return DemoResult(
        workdir=tmp_path,
        run=RunResult(0, "", 1, "finished:completed", "", 12.0),
        model=model,
        start=start,
        site_epsilon={"hospital-a": 1.5, "hospital-b": 1.5},
        site_cap={"hospital-a": 8.0, "hospital-b": 8.0},
        superlink=SUPERLINK,
        rounds=rounds,
        mechanism=mechanism,
    )


def _printed(result: DemoResult, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the CLI's own output path on ``result`` (the run itself replaced by its result)."""
    monkeypatch.setattr(app.demo_cli, "run_demo", lambda *args, **kwargs: result)
    cli = typer.Typer()
    cli.command()(app.demo_cli.demo)
    outcome = CliRunner().invoke(cli, ["--secure-aggregation"])
    assert outcome.exit_code == 0, outcome.output
    return outcome.output


def test_a_secure_demo_says_its_rounds_ran_under_secure_aggregation(tmp_path, monkeypatch):
    result = _result(tmp_path, secure=True)
    lines = summary(result)
    secure = [line for line in lines if line.startswith("secure aggregation (SecAgg+)")]
    assert secure == [
        "secure aggregation (SecAgg+): 2 of 2 rounds ran under it; the server saw only the sum "
        "of 3 hospitals' updates, never one hospital's update"
    ]
    assert secure[0] in _printed(result, monkeypatch).replace("\n", " ")


def test_a_plain_demo_says_secure_aggregation_was_off(tmp_path):
    lines = summary(_result(tmp_path, secure=False))
    assert (
        "secure aggregation: off; the server saw each hospital's DP update in all 2 rounds" in lines
    )
    assert not any("SecAgg+" in line for line in lines)


def test_a_releasing_mechanism_is_named_a_release_not_an_update(tmp_path):
    lines = summary(_result(tmp_path, secure=False, mechanism="dp-within-class"))
    assert (
        "secure aggregation: off; the server saw each hospital's DP release in all 2 rounds"
        in lines
    )
    unknown = summary(_result(tmp_path, secure=False, mechanism="retired-mechanism"))
    assert any("each hospital's DP update" in line for line in unknown)


def test_the_dashboard_command_names_the_superlink(tmp_path, monkeypatch):
    result = _result(tmp_path, secure=True)
    command = dashboard_command(result)
    assert f"--superlink {SUPERLINK} " in command
    assert f"--federation-status {tmp_path / 'server' / 'status.json'}" in command
    assert command in _printed(result, monkeypatch).replace("\n", "")
