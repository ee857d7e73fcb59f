"""What the commands print: a training progress bar, a run's metrics and verdicts, and what
an export published."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from convserve.cli.app import console

if TYPE_CHECKING:
    from convserve.pipelines.registry import Published
    from convserve.training.run import Callbacks, TrainResult

SUMMARY_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "best_val_accuracy",
    "test_loss",
    "test_accuracy",
)


def progress_callbacks(label: str) -> tuple[Progress, Callbacks]:
    """A rich progress bar (steps, loss, accuracy) and the training callbacks that drive it."""
    from convserve.training.run import Callbacks

    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task(label, total=None, status="")

    def on_step(step: int, loss: float, accuracy: float) -> None:
        progress.update(task, completed=step, status=f"loss {loss:.4f} acc {accuracy:.3f}")

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        progress.console.print(
            f"epoch {epoch}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} | val loss {metrics['val_loss']:.4f} "
            f"acc {metrics['val_accuracy']:.4f}"
        )

    return progress, Callbacks(
        on_start=lambda total: progress.update(task, total=total),
        on_step=on_step,
        on_epoch=on_epoch,
    )


def report_published(published: Published | None) -> None:
    if published is None:
        return
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in published.parity.max_abs_diff.items())
    console.print(
        f"ONNX: {published.onnx_path} (opset {published.parity.opset}; max |onnx - "
        f"torch| at batch {published.parity.batch_sizes}: {diffs})"
    )
    if published.version is not None:
        console.print(f"registered: models:/{published.model_name}/{published.version}")
    if published.decision is not None:
        d = published.decision
        console.print(f"alias: {d.alias} ({d.reason})")


def report_run(result: TrainResult) -> None:
    table = Table(title=f"training {result.status}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_METRICS:
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
