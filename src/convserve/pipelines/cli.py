"""The ``convserve`` command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from convserve import __version__
from convserve.training.config import ConfigError, load_config, shipped_configs

app = typer.Typer(
    help="Train CNNs whose initialisation and activations come from a config, see why they "
    "train well or badly, and track every run in MLflow.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


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


ConfigOption = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        help="A YAML file, or the name of a shipped config: " + ", ".join(shipped_configs()) + ".",
    ),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one field, e.g. --set model.activation=tanh "
        "--set init.name=xavier_uniform (values are YAML; list items by index).",
    ),
]


@app.command()
def train(
    config: ConfigOption = "default",
    set_: SetOption = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue from a checkpoint (last.pt); its config is used, with --set applied, "
            "and its MLflow run is continued."
        ),
    ] = None,
) -> None:
    """Train one model; print the final metrics, the diagnostics' verdicts and the run id.

    Exits 0 when training finishes, 1 when it diverges or is cancelled, 2 on a bad config.
    """
    from convserve.training.checkpoint import read_checkpoint
    from convserve.training.config import apply_overrides, validate_config
    from convserve.training.run import Callbacks
    from convserve.training.run import train as run_training

    try:
        if resume is not None:
            base = read_checkpoint(resume)["config"]
            cfg = validate_config(apply_overrides(base, set_ or []))
        else:
            cfg = load_config(config, set_ or [])
    except (ConfigError, FileNotFoundError, ValueError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("train", total=None, status="loading data")

    def on_step(step: int, loss: float, accuracy: float) -> None:
        progress.update(task, completed=step, status=f"loss {loss:.4f} acc {accuracy:.3f}")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        progress.console.print(
            f"epoch {epoch}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} | val loss {metrics['val_loss']:.4f} "
            f"acc {metrics['val_accuracy']:.4f}"
        )

    callbacks = Callbacks(
        on_start=lambda total: progress.update(task, total=total),
        on_step=on_step,
        on_epoch=on_epoch,
    )
    try:
        with progress:
            result = run_training(cfg, resume=resume, callbacks=callbacks)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        err_console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    _report(result)
    if result.status != "finished":
        raise typer.Exit(1)


def _report(result: object) -> None:
    from convserve.training.run import TrainResult

    assert isinstance(result, TrainResult)
    table = Table(title=f"training {result.status}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "best_val_accuracy",
        "test_loss",
        "test_accuracy",
    ):
        if key in result.metrics:
            table.add_row(key, f"{result.metrics[key]:.4f}")
    console.print(table)
    colour = "green" if result.verdicts == ["healthy"] else "yellow"
    console.print(f"verdicts: [{colour}]{', '.join(result.verdicts)}[/{colour}]")
    if result.message:
        console.print(f"note: {result.message}")
    if result.best_checkpoint is not None:
        console.print(f"best checkpoint: {result.best_checkpoint}")
    if result.run_id:
        console.print(f"MLflow run id: {result.run_id}")


if __name__ == "__main__":
    app()
