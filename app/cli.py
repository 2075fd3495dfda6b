"""The ``fedfew`` command line.

Every command and group is listed in ``COMMANDS`` with where it lives and its one-line help, and
its module is imported only when that command runs: ``fedfew --help`` and ``fedfew budget ...``
never import torch, Opacus or MONAI (seconds each). A test checks each one-line help against the
command's own.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import click
import typer
from typer.core import TyperCommand, TyperGroup

from models.errors import FedfewError


@dataclass(frozen=True)
class LazyCommand:
    """A command (a function) or a group (a ``typer.Typer``) imported only when it runs."""

    target: str  # "module:attribute"
    help: str  # the one line ``fedfew --help`` shows: the first paragraph of the command's help
    group: bool = False  # a typer.Typer of subcommands rather than one command function

    def load(self) -> object:
        """Import the module and return the attribute."""
        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


# The order of `fedfew --help`: commands, then groups.
COMMANDS: dict[str, LazyCommand] = {
    "dashboard": LazyCommand(
        "app.dashboard_cli:dashboard",
        "Start the dashboard (Streamlit) for clinicians, administrators and IT.",
    ),
    "pretrain": LazyCommand(
        "app.model_cli:pretrain",
        "Pre-train an encoder on public data, without privacy (the federation operator's step).",
    ),
    "adapt-domain": LazyCommand(
        "app.model_cli:adapt_domain_command",
        "Prepare a model for a new modality from this hospital's own unlabelled images.",
    ),
    "train": LazyCommand(
        "app.train_cli:train",
        "Meta-train a few-shot model on one machine and write a model directory.",
    ),
    "evaluate": LazyCommand(
        "app.train_cli:evaluate", "Few-shot accuracy (95% CI) of a model on a test set."
    ),
    "demo": LazyCommand(
        "app.demo_cli:demo",
        "A federated DP run of 3 hospitals: SuperLink + SuperNodes on 127.0.0.1 over TLS.",
    ),
    "budget": LazyCommand(
        "app.budget_cli:budget_app",
        "A site's privacy budget ledger: its cap, what was spent, and a tamper check.",
        group=True,
    ),
    "users": LazyCommand(
        "app.dashboard_cli:users_app",
        "The dashboard's local accounts (salted scrypt hashes; no default account).",
        group=True,
    ),
    "node": LazyCommand(
        "app.deploy_cli:node_app",
        "A hospital node: provision it (config, key, data check), check it, run its SuperNode.",
        group=True,
    ),
    "server": LazyCommand(
        "app.deploy_cli:server_app",
        "The federation server: CA and certificates, SuperLink, node registration, runs.",
        group=True,
    ),
}


class _NotLoaded(TyperCommand):
    """Stands in for a command in the root group's listing until the command runs."""


class _NotLoadedGroup(TyperGroup):
    """Stands in for a group in the root group's listing until one of its commands runs."""


def load_command(name: str) -> click.Command:
    """The real click command of ``COMMANDS[name]``, built the way ``add_typer`` /
    ``Typer.command`` on the root app would build it."""
    lazy = COMMANDS[name]
    target = lazy.load()
    holder = typer.Typer(add_completion=False)
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    elif callable(target):
        holder.command(name)(target)
    else:
        raise TypeError(f"{lazy.target} is neither a typer.Typer nor a command function")
    return typer.main.get_group(holder).commands[name]


class LazyGroup(TyperGroup):
    """The root group: lists the stand-ins (help needs nothing else) and swaps in the real
    command when one is run (click resolves every command it runs through ``resolve_command``)."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """Resolve as click does, then import the command if only its stand-in is loaded."""
        name, command, rest = super().resolve_command(ctx, args)
        if name is not None and isinstance(command, _NotLoaded | _NotLoadedGroup):
            command = self.commands[name] = load_command(name)
        return name, command, rest


def _not_loaded() -> None:
    # The stand-ins' callback: never runs, since LazyGroup swaps in the real command first.
    raise RuntimeError("a fedfew command ran before it was loaded")


app = typer.Typer(
    help="fedfew: privacy-preserving federated few-shot medical image diagnosis.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)
for _name, _lazy in COMMANDS.items():
    if _lazy.group:
        app.add_typer(typer.Typer(), name=_name, help=_lazy.help, cls=_NotLoadedGroup)
    else:
        app.command(_name, help=_lazy.help, cls=_NotLoaded)(_not_loaded)


def exit_status(returned: object) -> int:
    """The process exit status for what ``app(standalone_mode=False)`` returned.

    In non-standalone mode click does not exit: a ``typer.Exit(n)`` / ``ctx.exit(n)`` anywhere in a
    command comes back as the *return value* ``n``, and a command that finishes normally returns its
    own value (``None`` for every fedfew command). Only an integer is an exit status.
    """
    if isinstance(returned, int) and not isinstance(returned, bool):
        return returned
    return 0


def main() -> None:
    """Entry point: every expected failure is one line on stderr and a non-zero exit."""
    try:
        returned = app(standalone_mode=False)
    except click.exceptions.Exit as exc:  # raised outside a command (e.g. by a parameter callback)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        message = exc.format_message()
        if message.strip():  # empty for a group called without a command: typer printed its help
            typer.echo(f"error: {message}", err=True)
        sys.exit(exc.exit_code)
    except (FedfewError, ValueError, OSError, FloatingPointError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    sys.exit(exit_status(returned))


if __name__ == "__main__":
    main()
