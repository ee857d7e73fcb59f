"""The ``convserve`` Typer app, its global options and the consoles every command prints to."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console

from convserve import __version__, logs

app = typer.Typer(
    help="Train CNNs whose initialisation and activations come from a config, see why they "
    "train well or badly, track every run in MLflow, and serve the best over REST.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",  # docstrings reflow to the terminal's width
)
# soft_wrap: lines are never broken by rich (paths, URLs and tokens stay whole in logs)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


_display_type = typer.core.TyperOption.display_type_rich


def _no_type_for_flags(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """A flag takes no value: show no ``<bool>`` type beside ``--quick`` or ``--help``."""
    return None if self.is_flag else _display_type(self, ctx)


typer.core.TyperOption.display_type_rich = _no_type_for_flags  # type: ignore[method-assign,assignment]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises what this returns."""
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def bad_settings(err: Any, options: tuple[str, ...] = ()) -> typer.Exit:
    """``fail`` with one line per wrong setting of a pydantic ``ValidationError``, named as
    the user sets it: its environment variable (``CONVSERVE_WORKERS``, ``REDIS_URL``), and
    its command-line option where ``options`` names the field (``--workers``)."""
    lines = []
    for e in err.errors():
        name = ".".join(str(p) for p in e["loc"])
        env = name if name.isupper() else f"CONVSERVE_{name.upper()}"
        where = f"--{name.replace('_', '-')} ({env})" if name in options else env
        lines.append(f"  {where}: {e['msg']}")
    return fail("bad setting" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(lines))


def _version(value: bool) -> None:
    if value:
        console.print(f"convserve {__version__}")
        raise typer.Exit()


# Commands that track runs or run jobs; with no MLFLOW_TRACKING_URI they share one store in
# the folder they start in, ./runs, beside the runs' checkpoints.
_TRACKING_COMMANDS = {
    "train",
    "sweep",
    "export",
    "bootstrap",
    "experiments",
    "worker",
    "serve",
    "data",
}
LOCAL_STORE = Path("runs")


def _default_tracking(command: str | None) -> None:
    if command in _TRACKING_COMMANDS and not os.environ.get("MLFLOW_TRACKING_URI"):
        LOCAL_STORE.mkdir(exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{LOCAL_STORE.resolve() / 'mlflow.db'}"


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    # MLflow prints "View run ... at" on every run it ends, and logs INFO lines through its own
    # handler; the commands report runs once themselves, and MLflow's lines go through the
    # same console as the progress bars (or nowhere below --verbose).
    _default_tracking(ctx.invoked_subcommand)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if not console.is_terminal:  # a log: no download bar drawn into it with carriage returns
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        handler = logs.handler()
    except ValueError as err:  # CONVSERVE_LOG_FORMAT
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    if console.is_terminal and logs.log_format() == "text":
        from rich.logging import RichHandler  # imported for terminals only

        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logs.Formatter(kind="message"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
