"""The ``convserve`` Typer app, its global options and the consoles every command prints to."""

from __future__ import annotations

import logging
from typing import Annotated

import typer
from rich.console import Console

from convserve import __version__

app = typer.Typer(
    help="Train CNNs whose initialisation and activations come from a config, see why they "
    "train well or badly, track every run in MLflow, and serve the best over REST.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr; the caller raises what this returns."""
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        console.print(f"convserve {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
