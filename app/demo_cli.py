"""``fedfew demo``: three hospitals federated on this machine (the logic lives in ``app/demo.py``).

Registered lazily in ``app/cli.py``: ``app.demo`` brings Flower and the training stack, so it is
imported only when the demo runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from app.demo import DemoSettings, dashboard_command, run_demo, summary


def demo(
    data: str | None = typer.Option(
        None,
        help="Real sets instead of the synthetic data: one .npz split across 3 hospitals, "
        "or one .npz per hospital (comma-separated).",
    ),
    eval_data: str = typer.Option(
        "synthetic", help="The server's public evaluation set (.npz) of classes no site has."
    ),
    rounds: int = typer.Option(DemoSettings.rounds, help="Federated rounds."),
    local_steps: int = typer.Option(DemoSettings.local_steps, help="DP steps per site per round."),
    public_steps: int = typer.Option(
        DemoSettings.public_steps,
        help="The operator's non-private pre-training steps on public synthetic classes.",
    ),
    workdir: Path = typer.Option(Path("fedfew-demo"), help="Where the demo keeps everything."),
    secure_aggregation: bool = typer.Option(
        False,
        "--secure-aggregation",
        help="Secure aggregation (Flower's SecAgg+): the server learns only the sum of the "
        "hospitals' updates; each hospital clips its update before masking it.",
    ),
) -> None:
    """Federated DP meta-training of 3 hospitals: SuperLink + SuperNodes on 127.0.0.1 over TLS.

    The operator first pre-trains the starting model on public synthetic classes that no
    hospital holds (not private, no hospital data); the hospitals then train it under DP.
    """
    if public_steps < 1:
        raise typer.BadParameter("--public-steps must be >= 1")
    settings = dataclasses.replace(
        DemoSettings(), rounds=rounds, local_steps=local_steps, public_steps=public_steps
    )
    sets = [Path(p) for p in data.split(",")] if data else None
    result = run_demo(
        workdir,
        data=sets,
        eval_data=eval_data,
        settings=settings,
        echo=typer.echo,
        secure_aggregation=secure_aggregation,
    )
    for line in summary(result):
        typer.echo(line)
    typer.echo(dashboard_command(result))
