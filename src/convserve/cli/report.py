"""What the commands print: a training progress bar, a run's metrics and diagnosis, and what
an export published."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from convserve.cli.app import console
from convserve.redact import redact

if TYPE_CHECKING:
    from convserve.pipelines.registry import Published
    from convserve.training.diagnosis import Diagnosis
    from convserve.training.run import TrainResult

SUMMARY_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "best_val_accuracy",
    "test_loss",
    "test_accuracy",
)


class TrainProgress:
    """Training progress for a person: a live bar in a terminal, and in a log file (no
    terminal) one line at every tenth of the steps. Nothing is shown before training starts,
    so a command that trains nothing prints no empty bar. Use as a context manager; its
    ``callbacks`` drive it."""

    def __init__(self, label: str) -> None:
        from convserve.training.run import Callbacks

        self.label = label
        self.live = console.is_terminal
        self.total: int | None = None
        self._next_tenth = 1
        self._bar: Progress | None = None
        self._task: Any = None
        self.callbacks = Callbacks(
            on_start=self._on_start, on_step=self._on_step, on_epoch=self._on_epoch
        )

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _on_start(self, total: int) -> None:
        self.total, self._next_tenth = total, 1
        if self.live and self._bar is None:
            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self._task = self._bar.add_task(self.label, total=total, status="")
            self._bar.start()

    def _on_step(self, step: int, loss: float, accuracy: float) -> None:
        status = f"loss {loss:.4f} acc {accuracy:.3f}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, status=status)
            return
        if self.total and step * 10 >= self._next_tenth * self.total:
            percent = 100 * step // self.total
            console.print(f"{self.label}: step {step}/{self.total} ({percent}%) {status}")
            self._next_tenth = step * 10 // self.total + 1

    def _on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        console.print(
            f"epoch {epoch}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} | val loss {metrics['val_loss']:.4f} "
            f"acc {metrics['val_accuracy']:.4f}"
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
    url = run_url(published.run_id) if published.run_id else None
    if url:
        console.print(f"MLflow run: {url}")
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
    if table.row_count:
        console.print(table)
    else:  # diverged in its first epoch: no epoch was measured
        console.print(f"training {result.status}: no epoch finished, so no metric to show")
    report_diagnosis(result.diagnosis)
    if result.message:
        console.print(f"note: {result.message}")
    if result.best_checkpoint is not None:
        console.print(f"best checkpoint: {result.best_checkpoint}")
    if result.run_id:
        console.print(f"MLflow run id: {result.run_id}")
        url = run_url(result.run_id)
        if url:
            console.print(f"MLflow run: {url}")


def report_diagnosis(diagnosis: Diagnosis) -> None:
    """The cause, its evidence, what follows from it and the advice, one line each."""
    colour = "green" if diagnosis.verdict == "healthy" else "yellow"
    console.print(
        f"diagnosis: [{colour}]{diagnosis.verdict}[/{colour}] ({escape(diagnosis.summary)})"
    )
    if diagnosis.evidence:
        console.print(f"  evidence: {escape(diagnosis.evidence)}")
    for consequence in diagnosis.consequences:
        console.print(f"  consequence: {escape(consequence)}")
    if diagnosis.knob:
        console.print(f"  knob: {diagnosis.knob}, because {escape(diagnosis.attribution)}")
    if diagnosis.advice:
        console.print(f"  advice: {escape(diagnosis.advice)}")


def run_url(run_id: str) -> str | None:
    """The run's page in the MLflow UI, when the tracking URI is a server."""
    import mlflow

    from convserve.training.tracking import mlflow_client

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        experiment = mlflow_client(uri).get_run(run_id).info.experiment_id
    except Exception:  # the server may be gone by now; the run id was printed above
        return None
    return redact(f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}")
